"""timm 1.0's ``metaformer.py``: the reference for the MetaFormer backbone.

Why a stand-in: ``import timm`` imports ``torchvision`` at module level
(``timm.layers.create_norm``, ``timm.layers.norm_act``, ``timm.utils.model``
for ``FrozenBatchNorm2d``; ``timm.data`` for transforms and datasets), and
there is no working CPU build of torchvision for our torch pin. Nothing of
that is used by ``timm.models.metaformer``: its layers are plain torch. So
:func:`timm_metaformer` imports timm behind a stand-in that answers every
``torchvision.*`` import with an empty module whose attributes are inert
placeholder classes. The stand-in is in ``sys.modules`` only while timm
imports, so that other libraries that look for torchvision later (e.g.
transformers' availability checks) still see that it is absent.

timm is installed without its dependencies (``pip install --no-deps
timm==1.0.31``: its metadata requires torchvision, which would pull another
torch). Tests that need it skip with that hint when it is missing.
"""
import importlib
import importlib.abc
import importlib.machinery
import sys
import types

import pytest
import torch

# timm 1.0.31 ``features_only`` parameter counts (stem + stages, no head,
# no output norms): shared/reference/metaformer-and-speed.md section 2; the
# backbone tests re-check them against the live timm models.
TIMM_FEATURE_PARAMS = {
    'poolformerv2_s12': 11_377_688, 'poolformerv2_s24': 20_827_440,
    'poolformerv2_s36': 30_277_192, 'poolformerv2_m36': 55_306_632,
    'poolformerv2_m48': 72_575_520,
    'convformer_s18': 23_669_704, 'convformer_s36': 36_907_408,
    'convformer_m36': 53_411_472, 'convformer_b36': 94_439_568,
    'caformer_s18': 23_236_912, 'caformer_s36': 36_192_358,
    'caformer_m36': 52_564_710, 'caformer_b36': 93_310_566,
}
TIMM_INSTALL_HINT = ('timm is not installed; install it without its '
                     'dependencies: python -m pip install --no-deps '
                     'timm==1.0.31')


class _Placeholder(type):
    """Metaclass: any attribute of a placeholder class is another one."""

    def __getattr__(cls, name):
        if name.startswith('__'):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _StandInModule(types.ModuleType):

    def __getattr__(self, name):
        if name.startswith('__'):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finder/loader answering ``torchvision`` and all its submodules."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == 'torchvision' or fullname.startswith('torchvision.'):
            return importlib.machinery.ModuleSpec(fullname, self,
                                                  is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _import_timm_metaformer() -> types.ModuleType:
    if 'timm.models.metaformer' in sys.modules:
        return sys.modules['timm.models.metaformer']
    finder = _TorchvisionStandIn()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module('timm.models.metaformer')
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules
                     if n == 'torchvision' or n.startswith('torchvision.')]:
            if isinstance(sys.modules[name], _StandInModule):
                del sys.modules[name]


def timm_metaformer() -> types.ModuleType:
    """``timm.models.metaformer``; fails the test if timm is missing
    (``scripts/setup_env.sh`` installs it), so a lost install step shows."""
    if importlib.util.find_spec('timm') is None:
        pytest.fail(TIMM_INSTALL_HINT)
    return _import_timm_metaformer()


def timm_model(name: str, **kwargs):
    """A timm MetaFormer built by its registered function, e.g.
    ``timm_model('caformer_s18', features_only=True)``; random init."""
    module = timm_metaformer()
    import timm
    assert timm.__version__.startswith('1.0.'), timm.__version__
    return getattr(module, name)(pretrained=False, **kwargs)


@torch.no_grad()
def randomize_metaformer_(module: torch.nn.Module, seed: int = 0
                          ) -> torch.nn.Module:
    """Non-trivial random values in every parameter of a MetaFormer (timm's
    or ours): weights ``N(0, 1/fan_in)``; res/layer scales and StarReLU
    scales ``U(.5, 1.5)``; norm weights ``1 + N(0, .3)``; biases (StarReLU's
    included) ``N(0, .1)``. A tensor loaded into the wrong place, or not at
    all, changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in module.named_parameters():
        shape = tensor.shape
        if tensor.dim() > 1:
            value = torch.randn(shape, generator=gen) / shape[1:].numel() ** .5
        elif name.endswith('.scale'):
            value = torch.rand(shape, generator=gen) + .5
        elif name.endswith('weight'):
            value = 1 + .3 * torch.randn(shape, generator=gen)
        else:
            value = .1 * torch.randn(shape, generator=gen)
        tensor.copy_(value)
    return module


def float64_inputs(ours: torch.nn.Module, timm: torch.nn.Module, sizes,
                   batch: int = 1):
    """Turn both models to float64, then yield a random ``batch x 3 x H x W``
    float64 input per size.

    The fidelity tests compare architectures and loaded weights, not
    summation orders: fp32 kernels sum in CPU-dependent orders (timm's and
    ours were up to 2.2e-5 apart on AVX2, over a 1e-5 tolerance), while in
    float64 a wrong wiring or weight still shows as an O(1) difference."""
    ours.double()
    timm.double()
    for size in sizes:
        yield torch.randn(batch, 3, *size, dtype=torch.float64)
