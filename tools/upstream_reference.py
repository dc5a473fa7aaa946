"""MMPretrain 1.2.0's PoolFormer as a reference implementation.

The upstream route (mmseg's FPN over ``mmpretrain.PoolFormer``) is what our
backbone is measured and checked against. ``import mmpretrain`` needs
torchvision (its package ``__init__`` pulls in data transforms), which has no
CPU build here, so :func:`load_module` executes only the module file
``mmpretrain/models/backbones/poolformer.py``. That file needs two names from
the package: ``mmpretrain.registry.MODELS`` (only for its decorator; a private
registry stands in) and ``.base_backbone.BaseBackbone`` (loaded from its own
file, it imports only mmengine). The stand-ins live in ``sys.modules`` only
while the file executes, so a real ``import mmpretrain`` later is unaffected.

Module-name mapping (ours -> mmpretrain, stage ``i`` = 0..3)::

    stem.proj                      patch_embed.proj
    stages.{i}.downsample.proj     network.{2i-1}.proj      (i >= 1)
    stages.{i}.blocks.{j}.X        network.{2i}.{j}.X
    ... .layer_scale1 / 2          ... .layer_scale_1 / _2
    norm{i}                        norm{2i}
"""
import importlib.util
import os
import re
import sys
import types
from typing import Dict

import torch
import torch.nn as nn

__all__ = ['load_module', 'to_mmpretrain_state_dict', 'build_reference']

_module = None


def _source_dir() -> str:
    spec = importlib.util.find_spec('mmpretrain')
    if spec is None or not spec.submodule_search_locations:
        raise ImportError('the reference PoolFormer needs the mmpretrain '
                          'package (pip install mmpretrain==1.2.0)')
    return os.path.join(spec.submodule_search_locations[0], 'models',
                        'backbones')


def _exec_file(name: str, path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_module() -> types.ModuleType:
    """Return mmpretrain's ``backbones/poolformer.py`` as a module object.

    Its ``PoolFormer`` class is the unmodified upstream code. Loaded once and
    cached.
    """
    global _module
    if _module is not None:
        return _module
    from mmengine.registry import Registry
    src = _source_dir()
    package = '_mmpretrain_backbones'  # private name: never shadows the real
    names = ('mmpretrain', 'mmpretrain.registry', package,
             f'{package}.base_backbone', f'{package}.poolformer')
    saved = {name: sys.modules.get(name) for name in names}
    try:
        registry = types.ModuleType('mmpretrain.registry')
        registry.MODELS = Registry('upstream model', scope='mmpretrain_ref')
        root = types.ModuleType('mmpretrain')
        root.__path__ = []
        root.registry = registry
        pkg = types.ModuleType(package)
        pkg.__path__ = [src]
        sys.modules.update({'mmpretrain': root,
                            'mmpretrain.registry': registry, package: pkg})
        _exec_file(f'{package}.base_backbone',
                   os.path.join(src, 'base_backbone.py'))
        _module = _exec_file(f'{package}.poolformer',
                             os.path.join(src, 'poolformer.py'))
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return _module


_RULES = [
    (re.compile(r'^stem\.'), lambda m: 'patch_embed.'),
    (re.compile(r'^stages\.(\d+)\.downsample\.'),
     lambda m: f'network.{2 * int(m[1]) - 1}.'),
    (re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.layer_scale(\d)$'),
     lambda m: f'network.{2 * int(m[1])}.{m[2]}.layer_scale_{m[3]}'),
    (re.compile(r'^stages\.(\d+)\.blocks\.'),
     lambda m: f'network.{2 * int(m[1])}.'),
    (re.compile(r'^norm(\d+)\.'), lambda m: f'norm{2 * int(m[1])}.'),
]


def to_mmpretrain_state_dict(
        state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a state dict of our ``PoolFormer`` to mmpretrain's names.

    Raises ``KeyError`` for a key that belongs to neither layout.
    """
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _RULES:
            new, count = pattern.subn(repl, key)
            if count:
                out[new] = value
                break
        else:
            raise KeyError(f'no mmpretrain name for PoolFormer key {key!r}')
    return out


def build_reference(ours: nn.Module) -> nn.Module:
    """mmpretrain ``PoolFormer`` with the same arch, options and weights.

    ``ours`` is a :class:`poolformer_seg.models.PoolFormer`. The result has
    mmpretrain's ``out_indices`` (``2 * i``) and the ``frozen_stages`` value
    that freezes the same parameters, and it is in the same train/eval mode.
    """
    a = ours.arch
    dims = a['embed_dims']
    if ours.in_channels != 3:
        raise ValueError('mmpretrain PoolFormer has 3 input channels, ours '
                         f'has in_channels={ours.in_channels}')
    if any(dims[i] == dims[i + 1] for i in range(3)):
        raise ValueError('mmpretrain PoolFormer skips the downsampling layer '
                         f'between stages of equal width; embed_dims={dims}')
    norm = ours.stages[0].blocks[0].norm1
    if not isinstance(norm, nn.GroupNorm):
        raise ValueError('build_reference supports GroupNorm norms only, '
                         f'got {type(norm).__name__}')
    norm_cfg = dict(type='GN', num_groups=norm.num_groups, eps=norm.eps)
    k = ours.frozen_stages
    rates = [m.drop_prob for m in ours.modules() if hasattr(m, 'drop_prob')]
    ref = load_module().PoolFormer(
        arch=dict(layers=a['layers'], embed_dims=dims,
                  mlp_ratios=a['mlp_ratios'],
                  layer_scale_init_value=a['layer_scale_init_value']),
        pool_size=a['pool_size'], norm_cfg=norm_cfg,
        in_patch_size=a['stem_patch_size'], in_stride=a['stem_stride'],
        in_pad=a['stem_padding'], down_patch_size=a['down_patch_size'],
        down_stride=a['down_stride'], down_pad=a['down_padding'],
        drop_path_rate=max(rates, default=0.),
        out_indices=[2 * i for i in ours.out_indices],
        frozen_stages=k if k <= 0 else 2 * k - 1)
    ref.load_state_dict(to_mmpretrain_state_dict(ours.state_dict()))
    ref.train(ours.training)
    return ref.to(next(ours.parameters()).device)
