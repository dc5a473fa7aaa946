"""A stand-in ``mmcv.ops`` for mmcv-lite, importable before anything else.

mmcv-lite ships the Python files of ``mmcv/ops`` but not the compiled
``mmcv._ext``, and mmseg 1.2.2 imports ``mmcv.ops`` unconditionally, so
``from mmseg.apis import init_model`` fails on mmcv-lite
(open-mmlab/mmsegmentation#871) unless something replaces ``mmcv.ops`` first.
:mod:`poolformer_seg.compat` does that when ``poolformer_seg`` is imported;
this module does it for programs that import mmseg first.

It is a top-level module, not part of the ``poolformer_seg`` package,
because importing anything from the package runs its ``__init__``, which
imports mmseg. It imports nothing but the standard library until ``mmcv.ops``
is asked for. Installing the package also installs
``poolformer_seg_mmcv_lite.pth`` into site-packages, whose one line calls
:func:`install_finder` at interpreter start: a finder at the head of
``sys.meta_path`` that answers only for ``mmcv.ops``, and only when
``mmcv._ext`` is missing (with full mmcv it steps aside and mmcv's own ops
load).

The stand-in: ``point_sample`` is pure PyTorch in mmcv and is loaded from
mmcv's own source file; every other op is an :class:`UnavailableOp` that
imports fine and raises :class:`MissingMmcvOpError` when it is used, so a
model that needs a compiled op fails loudly at build time, never at import
time, and never computes a wrong result.
"""
import importlib.abc
import importlib.util
import os
import sys
import types
import warnings

# mmcv.ops functions that are plain PyTorch and safe to load from source.
PURE_PYTORCH_OPS = ('point_sample', )
STAND_IN_DOC = ('poolformer_seg stand-in for mmcv.ops on mmcv-lite; see '
                'poolformer_seg.compat')


class MissingMmcvOpError(RuntimeError):
    """Raised when a compiled mmcv op is used while only mmcv-lite exists."""


class UnavailableOp:
    """Stand-in for a compiled ``mmcv.ops`` symbol missing from mmcv-lite.

    Importing it works; calling it (a function, or instantiating a class)
    raises :class:`MissingMmcvOpError` naming the op and the fix.
    """

    def __init__(self, name: str):
        self.__name__ = self.__qualname__ = name

    def __call__(self, *args, **kwargs):
        raise MissingMmcvOpError(
            f'mmcv.ops.{self.__name__} needs the compiled mmcv ops, but only '
            'mmcv-lite is installed. Install full mmcv 2.1.0 (see README, '
            '"Full mmcv") to use it.')

    def __repr__(self):
        return f'<unavailable mmcv.ops.{self.__name__} (mmcv-lite)>'


def full_mmcv_available() -> bool:
    """True when mmcv's compiled extension ``mmcv._ext`` can be imported."""
    try:
        return importlib.util.find_spec('mmcv._ext') is not None
    except ModuleNotFoundError:  # mmcv itself is missing
        return False


def build_stand_in() -> types.ModuleType:
    """The stand-in ``mmcv.ops`` module (not yet in ``sys.modules``)."""
    import mmcv
    ops_dir = os.path.join(os.path.dirname(mmcv.__file__), 'ops')
    stub = types.ModuleType('mmcv.ops', doc=STAND_IN_DOC)
    stub.__path__ = []  # submodules other than the ones registered below
    stub.__file__ = os.path.join(ops_dir, '__init__.py')
    for name in PURE_PYTORCH_OPS:
        spec = importlib.util.spec_from_file_location(
            f'mmcv.ops.{name}', os.path.join(ops_dir, f'{name}.py'))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(stub, name, getattr(module, name))

    def __getattr__(name):
        # Dunder look-ups (inspect.getmodule, copy, pickle) must see a
        # normal AttributeError, or mmengine's scope inference breaks.
        if name.startswith('__'):
            raise AttributeError(name)
        op = UnavailableOp(name)
        setattr(stub, name, op)
        return op

    stub.__getattr__ = __getattr__
    # mmcv.cnn's transformer module warns once that it cannot import
    # MultiScaleDeformableAttention; using the op raises anyway.
    warnings.filterwarnings(
        'ignore', message='Fail to import ``MultiScaleDeformableAttention',
        category=UserWarning)
    return stub


def install_stand_in() -> None:
    """Put the stand-in in place of ``mmcv.ops`` now."""
    import mmcv
    stub = build_stand_in()
    sys.modules['mmcv.ops'] = stub
    mmcv.ops = stub


class _StandInLoader(importlib.abc.Loader):

    def create_module(self, spec):
        return build_stand_in()

    def exec_module(self, module):
        pass


class MmcvOpsFinder(importlib.abc.MetaPathFinder):
    """Serves the stand-in for ``import mmcv.ops`` when ``mmcv._ext`` is
    missing; every other import, and full mmcv, goes to the normal finders.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'mmcv.ops' or full_mmcv_available():
            return None
        return importlib.util.spec_from_loader(fullname, _StandInLoader())


def install_finder() -> None:
    """Called by ``poolformer_seg_mmcv_lite.pth`` at interpreter start."""
    if not any(isinstance(f, MmcvOpsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MmcvOpsFinder())
