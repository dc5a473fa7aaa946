"""Workarounds for the pinned OpenMMLab stack, kept in one place.

Everything here exists because of a defect in a dependency, not because of a
design choice of ours. Each workaround says which versions need it, so that it
can be deleted when the dependency is fixed.

1. ``mmcv.ops`` without compiled ops (mmcv-lite 2.1.0, mmseg 1.2.2).
   mmcv-lite ships the Python files of ``mmcv/ops`` but not the compiled
   ``mmcv._ext``; importing ``mmcv.ops`` therefore fails. mmseg 1.2.2 imports
   ``mmcv.ops`` unconditionally from ``mmseg.utils``, ``mmseg.models.utils``,
   ``mmseg.models.losses`` and ``san_head``, so nothing of mmseg's models,
   datasets or runner imports on mmcv-lite (open-mmlab/mmsegmentation#871).
   :func:`apply` installs a stand-in ``mmcv.ops`` module before mmseg is
   imported. ``point_sample`` is pure PyTorch in mmcv and is loaded from mmcv's
   own source file; every other op is an :class:`UnavailableOp` that imports
   fine and raises :class:`MissingMmcvOpError` when it is used, so a model that
   needs a compiled op fails loudly at build time instead of at import time,
   and never computes a wrong result. With full mmcv installed nothing is done.

2. ``torch.load`` in mmengine 0.10.7 (torch >= 2.6).
   mmengine calls ``torch.load`` without ``weights_only``, so torch's default
   (``True``) refuses mmengine's own training checkpoints. Fixed on mmengine
   main (PR #1670) but unreleased. :func:`apply` routes mmengine's local and
   http checkpoint loaders through :func:`poolformer_seg.utils.safe_load.load`,
   which keeps ``weights_only=True`` with a minimal allowlist.

3. The import warning of ``mmcv.cnn`` on mmcv-lite (mmcv-lite 2.1.0).
   Every import of ``mmcv.cnn`` warns that ``MultiScaleDeformableAttention``
   cannot be imported; nothing here uses it, and the stand-in of 1. raises
   if a model does. :func:`apply` filters this one message, so that a tool's
   error is not preceded by two lines of unrelated advice.

Call :func:`apply` before the first import of ``mmseg.models``; importing
``poolformer_seg`` does it, and so do the scripts in ``tools/``.
"""
import importlib.util
import os
import sys
import types
import warnings

__all__ = ['apply', 'full_mmcv_available', 'MissingMmcvOpError',
           'UnavailableOp']

# mmcv.ops functions that are plain PyTorch and safe to load from source.
_PURE_PYTORCH_OPS = ('point_sample',)


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


def _stub_mmcv_ops() -> None:
    import mmcv
    ops_dir = os.path.join(os.path.dirname(mmcv.__file__), 'ops')
    stub = types.ModuleType('mmcv.ops', doc='poolformer_seg stand-in for '
                            'mmcv.ops on mmcv-lite; see poolformer_seg.compat')
    stub.__path__ = []  # submodules other than the ones registered below
    stub.__file__ = os.path.join(ops_dir, '__init__.py')
    for name in _PURE_PYTORCH_OPS:
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
    sys.modules['mmcv.ops'] = stub
    mmcv.ops = stub


def _route_mmengine_loading() -> None:
    from poolformer_seg.utils.safe_load import register_mmengine_loaders
    register_mmengine_loaders()


_applied = False


def apply() -> None:
    """Apply every workaround once; safe to call repeatedly."""
    global _applied
    if _applied:
        return
    if not full_mmcv_available():
        warnings.filterwarnings(
            'ignore', message='Fail to import '
            '``MultiScaleDeformableAttention`` from '
            '``mmcv.ops.multi_scale_deform_attn``')
        if 'mmcv.ops' not in sys.modules:
            _stub_mmcv_ops()
    _route_mmengine_loading()
    _applied = True
