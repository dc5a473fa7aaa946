"""Upstream references that the tests compare poolformer_seg against.

* :func:`mmpretrain_poolformer_module` -- MMPretrain 1.2.0's
  ``mmpretrain/models/backbones/poolformer.py``, executed from its file
  without mmpretrain's package ``__init__`` (which imports torchvision).
  :func:`mmpretrain_poolformer` builds its ``PoolFormer``.
* :func:`mmpretrain_stage_outputs` -- raw (pre-norm) outputs of its four
  stages, i.e. of ``network[0, 2, 4, 6]``.
* :func:`upstream_segmentor_cfg` / :func:`build_upstream_segmentor` -- mmseg's
  ``fpn_poolformer_s12`` model (EncoderDecoder, mmpretrain PoolFormer, FPN,
  FPNHead) with the backbone class passed directly as ``type``.
* :func:`our_segmentor_cfg` -- the same model on our ``PoolFormer``.
* :func:`randomize_` -- non-trivial random values in every parameter and
  buffer (norms, layer scales and BN statistics included).
* Key writers from the mapping table in ``shared/reference/upstream.md`` §7,
  written independently of :mod:`poolformer_seg.utils.layouts`:
  :func:`official_from_ours`, :func:`official_cls_from_feat`,
  :func:`timm_from_official`, :func:`timm_features_only`.
"""
import functools
import importlib.util
import re
import types
from pathlib import Path

import torch

import poolformer_seg  # noqa: F401  (compat must precede mmseg.models)

REFERENCE = Path(__file__).resolve().parents[2] / 'tools' / \
    'upstream_reference.py'


@functools.lru_cache(maxsize=None)
def upstream_reference() -> types.ModuleType:
    """``tools/upstream_reference.py``, loaded once from its file."""
    spec = importlib.util.spec_from_file_location('upstream_reference',
                                                  REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mmpretrain_poolformer_module() -> types.ModuleType:
    """MMPretrain 1.2.0's ``backbones/poolformer.py``, executed from its file
    without mmpretrain's package ``__init__`` (which needs torchvision).

    The loader lives in ``tools/upstream_reference.py`` (shared with
    ``tools/benchmark.py``, outside the installed package): stand-ins for
    ``mmpretrain.registry`` (a private registry) and the parent package exist
    only while the file executes.
    """
    return upstream_reference().load_module()


def mmpretrain_poolformer(**kwargs) -> torch.nn.Module:
    """``mmpretrain.PoolFormer(**kwargs)`` built from the upstream source."""
    return mmpretrain_poolformer_module().PoolFormer(**kwargs)


def mmpretrain_stage_outputs(backbone, x) -> list:
    """Raw outputs of mmpretrain's four stages (``network[0, 2, 4, 6]``)."""
    x = backbone.forward_embeddings(x)
    outputs = []
    for index, layer in enumerate(backbone.network):
        x = layer(x)
        if index % 2 == 0:
            outputs.append(x)
    return outputs


# ----------------------------------------------------------------------------
# Segmentors

_DATA_PREPROCESSOR = dict(
    type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0, seg_pad_val=255)


def _segmentor_cfg(backbone: dict, in_channels, num_classes: int) -> dict:
    """mmseg's fpn_poolformer model (1.x, merged) with another backbone."""
    return dict(
        type='EncoderDecoder',
        data_preprocessor=dict(_DATA_PREPROCESSOR),
        backbone=backbone,
        neck=dict(type='FPN', in_channels=list(in_channels), out_channels=256,
                  num_outs=4),
        decode_head=dict(
            type='FPNHead', in_channels=[256] * 4, in_index=[0, 1, 2, 3],
            feature_strides=[4, 8, 16, 32], channels=128, dropout_ratio=0.1,
            num_classes=num_classes,
            norm_cfg=dict(type='SyncBN', requires_grad=True),
            align_corners=False,
            loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                             loss_weight=1.0)),
        train_cfg=dict(), test_cfg=dict(mode='whole'))


_S12_DIMS = (64, 128, 320, 512)


def upstream_segmentor_cfg(arch='s12', num_classes=150) -> dict:
    """mmseg 1.x ``fpn_poolformer_s12`` over mmpretrain's PoolFormer."""
    backbone = dict(
        type=mmpretrain_poolformer_module().PoolFormer, arch=arch,
        in_patch_size=7, in_stride=4, in_pad=2, down_patch_size=3,
        down_stride=2, down_pad=1, drop_rate=0., drop_path_rate=0.,
        out_indices=(0, 2, 4, 6), frozen_stages=-1)
    return _segmentor_cfg(backbone, _S12_DIMS, num_classes)


def our_segmentor_cfg(arch='s12', num_classes=150) -> dict:
    """The same segmentor on poolformer_seg's PoolFormer."""
    backbone = dict(type='PoolFormer', arch=arch, out_indices=(0, 1, 2, 3))
    return _segmentor_cfg(backbone, _S12_DIMS, num_classes)


def build_segmentor(cfg: dict) -> torch.nn.Module:
    """Build an mmseg model dict (in eval mode)."""
    import mmseg.models  # noqa: F401  (registers EncoderDecoder, FPN, ...)
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    # BaseModel builds its data_preprocessor from the default scope's registry
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(cfg).eval()


def build_upstream_segmentor(arch='s12', num_classes=150, seed=0):
    """The upstream segmentor with random non-trivial weights."""
    return randomize_(build_segmentor(upstream_segmentor_cfg(arch,
                                                             num_classes)),
                      seed)


# ----------------------------------------------------------------------------
# Random weights


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter and buffer with random, well-scaled values.

    Convolutions/linears get ``N(0, 1/fan_in)``; norm weights ``1 + N(0,
    .3)``; layer scales ``U(.2, 1)``; biases and running means ``N(0, .1)``;
    running variances ``U(.5, 2)``. Non-trivial everywhere, so that a tensor
    loaded into the wrong place (or not at all) changes the outputs.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    for name, tensor in tensors:
        if not tensor.is_floating_point():
            continue
        shape = tensor.shape
        if 'layer_scale' in name:
            value = torch.rand(shape, generator=gen) * .8 + .2
        elif name.endswith('running_var'):
            value = torch.rand(shape, generator=gen) * 1.5 + .5
        elif tensor.dim() > 1:
            fan_in = shape[1:].numel()
            value = torch.randn(shape, generator=gen) / fan_in ** .5
        elif name.endswith('weight'):
            value = 1 + .3 * torch.randn(shape, generator=gen)
        else:
            value = .1 * torch.randn(shape, generator=gen)
        tensor.copy_(value)
    return module


# ----------------------------------------------------------------------------
# Key writers (upstream.md section 7), independent of the converter


def official_from_ours(state_dict: dict, prefix: str = '') -> dict:
    """Our backbone keys under ``prefix`` -> sail-sg fork_feat names.

    ``stem.proj`` -> ``patch_embed.proj``; ``stages.{s}.downsample.proj`` ->
    ``network.{2s-1}.proj``; ``stages.{s}.blocks.{j}`` -> ``network.{2s}.{j}``
    with ``layer_scale{k}`` -> ``layer_scale_{k}``; ``norm{s}`` ->
    ``norm{2s}``. Keys outside ``prefix`` are kept.
    """
    def rename(key):
        key = re.sub(r'^stem\.proj\.', 'patch_embed.proj.', key)
        key = re.sub(r'^stages\.(\d)\.downsample\.proj\.',
                     lambda m: f'network.{2 * int(m[1]) - 1}.proj.', key)
        key = re.sub(r'^stages\.(\d)\.blocks\.',
                     lambda m: f'network.{2 * int(m[1])}.', key)
        key = re.sub(r'\.layer_scale(\d)$', r'.layer_scale_\1', key)
        return re.sub(r'^norm(\d)\.', lambda m: f'norm{2 * int(m[1])}.', key)

    return {(prefix + rename(k[len(prefix):]) if k.startswith(prefix)
             else k): v for k, v in state_dict.items()}


def official_cls_from_feat(state_dict: dict, num_classes: int = 1000,
                           seed: int = 0) -> dict:
    """fork_feat names -> sail-sg classifier checkpoint.

    Drops ``norm0/2/4``, renames ``norm6`` -> ``norm`` and adds a random
    ``head`` (Linear C_3 -> num_classes).
    """
    out = {k: v for k, v in state_dict.items()
           if not re.match(r'norm\d\.', k)}
    out.update({k.replace('norm6.', 'norm.'): v for k, v in state_dict.items()
                if k.startswith('norm6.')})
    dim = out['norm.weight'].shape[0]
    gen = torch.Generator().manual_seed(seed)
    out['head.weight'] = torch.randn(num_classes, dim, generator=gen)
    out['head.bias'] = torch.randn(num_classes, generator=gen)
    return out


def timm_from_official(state_dict: dict) -> dict:
    """sail-sg classifier names -> timm ``metaformer`` (PoolFormer v1)."""
    def rename(key):
        key = re.sub(r'^patch_embed\.proj\.', 'stem.conv.', key)
        key = re.sub(r'^network\.(\d)\.proj\.',
                     lambda m: f'stages.{(int(m[1]) + 1) // 2}.downsample.'
                     'conv.', key)
        key = re.sub(r'^network\.(\d)\.(\d+)\.',
                     lambda m: f'stages.{int(m[1]) // 2}.blocks.{m[2]}.', key)
        key = re.sub(r'\.layer_scale_(\d)$', r'.layer_scale\1.scale', key)
        key = re.sub(r'^norm\.', 'head.norm.', key)
        return re.sub(r'^head\.(weight|bias)$', r'head.fc.\1', key)

    return {rename(k): v for k, v in state_dict.items()}


def timm_features_only(state_dict: dict) -> dict:
    """timm names -> ``features_only=True`` names (``stages_{s}``, no head)."""
    return {re.sub(r'^stages\.(\d)\.', r'stages_\1.', k): v
            for k, v in state_dict.items() if not k.startswith('head.')}
