"""PoolFormer (MetaFormer baseline, Yu et al., CVPR 2022) for dense prediction.

Layout of the network (``C_i`` = ``embed_dims[i]``, input ``B x 3 x H x W``)::

    stem            conv k7 s4 p2           -> B x C_0 x H/4  x W/4
    stages[0]       blocks                  -> B x C_0 x H/4  x W/4   (stride 4)
    stages[1]       conv k3 s2 p1, blocks   -> B x C_1 x H/8  x W/8   (stride 8)
    stages[2]       conv k3 s2 p1, blocks   -> B x C_2 x H/16 x W/16  (stride 16)
    stages[3]       conv k3 s2 p1, blocks   -> B x C_3 x H/32 x W/32  (stride 32)
    norm{i}         GroupNorm(1, C_i) on each stage i in ``out_indices``

Sizes round as convolutions do (``ceil`` for the stride-2 layers), so any
input of at least ``stem_patch_size - 2 * stem_padding`` pixels (3 by
default) per side works; it need not be a multiple of 32.

A block is ``x + ls1 * (pool(n1(x)) - n1(x))`` then ``x + ls2 * mlp(n2(x))``,
with ``pool`` a 3x3 average that excludes padding, ``n1``/``n2``
GroupNorm(1, C), ``mlp`` two 1x1 convolutions with GELU, and ``ls1``/``ls2``
per-channel layer scales.

Weights of every published layout (sail-sg, mmpretrain/mmseg, timm, HF
transformers) load through ``init_cfg=dict(type='Pretrained', checkpoint=...)``;
see :mod:`poolformer_seg.utils.layouts` for the key mapping.
"""
import copy
import difflib
from typing import Dict, List, Sequence, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks import DropPath
from mmengine.logging import print_log
from mmseg.registry import MODELS

from ...compat import (pool_excluding_padding,
                       register_load_state_dict_pre_hook)
from ...utils.layouts import conversion_message, convert_prefixed_keys
from ...utils.loading import load_pretrained
from .base import (NUM_STAGES, StagedBackbone, check_drop_path_rate,
                   check_frozen_stages, check_impl, check_out_indices,
                   impl_memory_format)
from .fast_ops import fused_block, runs_fused

# Published variants. `layer_scale_init_value` is 1e-6 for the deeper ones.
ARCH_SETTINGS: Dict[str, dict] = {
    's12': dict(layers=[2, 2, 6, 2], embed_dims=[64, 128, 320, 512],
                layer_scale_init_value=1e-5),
    's24': dict(layers=[4, 4, 12, 4], embed_dims=[64, 128, 320, 512],
                layer_scale_init_value=1e-5),
    's36': dict(layers=[6, 6, 18, 6], embed_dims=[64, 128, 320, 512],
                layer_scale_init_value=1e-6),
    'm36': dict(layers=[6, 6, 18, 6], embed_dims=[96, 192, 384, 768],
                layer_scale_init_value=1e-6),
    'm48': dict(layers=[8, 8, 24, 8], embed_dims=[96, 192, 384, 768],
                layer_scale_init_value=1e-6),
}

# Values used when a custom arch dict leaves a key out.
ARCH_DEFAULTS = dict(
    mlp_ratios=[4, 4, 4, 4], layer_scale_init_value=1e-5, pool_size=3,
    stem_patch_size=7, stem_stride=4, stem_padding=2,
    down_patch_size=3, down_stride=2, down_padding=1)
ARCH_REQUIRED = ('layers', 'embed_dims')


def resolve_arch(arch: Union[str, dict]) -> dict:
    """Return the full arch dict for a variant name or a custom dict.

    Raises ``ValueError``/``TypeError`` naming the offending key or value.
    """
    if isinstance(arch, str):
        if arch.lower() not in ARCH_SETTINGS:
            raise ValueError(f'arch={arch!r} is not a PoolFormer variant; '
                             f'choose one of {sorted(ARCH_SETTINGS)} or pass '
                             'a dict')
        arch = ARCH_SETTINGS[arch.lower()]
    if not isinstance(arch, dict):
        raise TypeError(f'arch must be a str or dict, got {type(arch)}')
    missing = [key for key in ARCH_REQUIRED if key not in arch]
    unknown = sorted(set(arch) - set(ARCH_REQUIRED) - set(ARCH_DEFAULTS))
    if unknown:  # first: a typo also makes the intended key look missing
        allowed = list(ARCH_REQUIRED) + sorted(ARCH_DEFAULTS)
        close = [f'{match!r} for {key!r}' for key in unknown
                 for match in difflib.get_close_matches(key, allowed, 1)]
        hint = f' (did you mean {", ".join(close)}?)' if close else ''
        raise ValueError(f'custom arch has unknown keys {unknown}{hint}; '
                         f'allowed: {allowed}')
    if missing:
        raise ValueError(f'custom arch is missing {missing}; it needs '
                         f'{list(ARCH_REQUIRED)}')
    full = {**copy.deepcopy(ARCH_DEFAULTS), **copy.deepcopy(arch)}
    for key in ('layers', 'embed_dims', 'mlp_ratios'):
        value = full[key]
        if (not isinstance(value, (list, tuple)) or len(value) != NUM_STAGES
                or not all(v > 0 for v in value)):
            raise ValueError(f'arch[{key!r}] must list {NUM_STAGES} positive '
                             f'numbers (one per stage), got {value!r}')
    if full['pool_size'] % 2 != 1:
        raise ValueError('arch["pool_size"] must be odd so that pooling keeps '
                         f'the size, got {full["pool_size"]}')
    return full


class PatchEmbed(nn.Module):
    """Strided convolution: ``B x C_in x H x W -> B x C_out x H' x W'``."""

    def __init__(self, in_channels, out_channels, patch_size, stride,
                 padding):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, patch_size, stride,
                              padding)

    def forward(self, x):
        return self.proj(x)


class Pooling(nn.Module):
    """Token mixer ``avg_pool(x) - x`` (padding excluded from the average).

    The block adds the input back through its residual, so subtracting ``x``
    here makes the mixer a pure neighbourhood difference, as in the paper.
    """

    def __init__(self, pool_size=3):
        super().__init__()
        self.pool_size = pool_size

    def forward(self, x):
        return pool_excluding_padding(x, self.pool_size) - x


class Mlp(nn.Module):
    """1x1 conv (C -> hidden), GELU, dropout-free 1x1 conv (hidden -> C)."""

    def __init__(self, channels, hidden_channels):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden_channels, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_channels, channels, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PoolFormerBlock(nn.Module):
    """One MetaFormer block with pooling as token mixer; shape-preserving.

    With ``fused=True`` (GroupNorm(1) norms only; set by the backbone's
    ``impl='fast'``) the same function is computed by
    :func:`.fast_ops.fused_block`: the token-mixer half as one
    pooling and one ``lerp``, the norm affines and layer scales folded into
    the 1x1 convolutions, and a backward that keeps only the block input
    (on the CPU; elsewhere a block that needs gradients runs the formulas,
    :func:`.fast_ops.runs_fused`).
    """

    def __init__(self, channels, mlp_ratio, pool_size, norm_cfg,
                 layer_scale_init_value, drop_path, fused=False):
        super().__init__()
        self.fused = fused
        self.norm1 = build_norm_layer(norm_cfg, channels)[1]
        self.token_mixer = Pooling(pool_size)
        self.norm2 = build_norm_layer(norm_cfg, channels)[1]
        self.mlp = Mlp(channels, int(channels * mlp_ratio))
        self.layer_scale1 = nn.Parameter(
            torch.full((channels, ), float(layer_scale_init_value)))
        self.layer_scale2 = nn.Parameter(
            torch.full((channels, ), float(layer_scale_init_value)))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else \
            nn.Identity()

    def forward(self, x):
        if self.fused and runs_fused(x):
            return self._forward_fused(x)
        scale1 = self.layer_scale1.view(-1, 1, 1)
        scale2 = self.layer_scale2.view(-1, 1, 1)
        x = x + self.drop_path(scale1 * self.token_mixer(self.norm1(x)))
        return x + self.drop_path(scale2 * self.mlp(self.norm2(x)))

    def _forward_fused(self, x):
        drop = None
        if self.training and isinstance(self.drop_path, DropPath):
            # DropPath scales a whole branch per sample: the factors go into
            # the fused block, drawn as DropPath draws them (same stream)
            keep = 1 - self.drop_path.drop_prob
            drop = [(keep + torch.rand(x.shape[0], device=x.device,
                                       dtype=self.layer_scale1.dtype)
                     ).floor_() / keep for _ in range(2)]
        return fused_block(x, self.norm1, self.norm2, self.mlp.fc1,
                           self.mlp.fc2, self.layer_scale1, self.layer_scale2,
                           self.token_mixer.pool_size, drop)


class PoolFormerStage(nn.Module):
    """Optional downsampling conv followed by a sequence of blocks."""

    def __init__(self, downsample: nn.Module, blocks: List[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x, with_cp=False):
        x = self.downsample(x)
        for block in self.blocks:
            if with_cp and x.requires_grad:
                x = cp.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


@MODELS.register_module()
class PoolFormer(StagedBackbone):
    """PoolFormer backbone returning multi-scale features.

    Args:
        arch (str | dict): ``'s12'``, ``'s24'``, ``'s36'``, ``'m36'``,
            ``'m48'`` or a custom dict. A dict needs ``layers`` (blocks per
            stage) and ``embed_dims`` (channels per stage), each a list of 4;
            optional keys and defaults: ``mlp_ratios=[4, 4, 4, 4]``,
            ``layer_scale_init_value=1e-5``, ``pool_size=3``,
            ``stem_patch_size=7``, ``stem_stride=4``, ``stem_padding=2``,
            ``down_patch_size=3``, ``down_stride=2``, ``down_padding=1``.
            Unknown keys are rejected.
        in_channels (int): channels of the input image. Default 3.
        out_indices (Sequence[int]): which of the four stages to return,
            counted 0..3 (strides 4, 8, 16, 32); negatives count from the
            end (-1 is stage 3). Each returned stage gets its own
            GroupNorm(1, C) output norm ``norm{i}``. Default ``(0, 1, 2, 3)``.
        frozen_stages (int): ResNet convention. -1 freezes nothing; 0
            freezes the stem; ``k >= 1`` freezes the stem and stages
            ``0..k-1`` (their downsampling convs, blocks and output norms):
            no gradients, and kept in eval mode. Default -1.
        norm_eval (bool): keep every norm layer in eval mode during
            training (matters for norms with running statistics, e.g. a
            BN ``norm_cfg``). Default False.
        norm_cfg (dict): norm inside the blocks and on the outputs. Default
            ``dict(type='GN', num_groups=1)``, the published models.
        drop_path_rate (float): stochastic depth, rising linearly from 0 at
            the first block to this value at the last. Default 0.
        with_cp (bool): gradient checkpointing per block: saves activation
            memory at the cost of a second forward. Default False. (With
            ``impl='fast'`` a block already keeps only its input.)
        impl (str): how the same function is computed (the weights and
            state-dict keys are the same):

            - ``'fast'`` (default): each block through the fused operations
              of :mod:`.fast_ops` (fewer passes over memory, and, on the
              CPU, a backward that keeps only the block input and
              recomputes the rest, one extra 1x1 convolution; on other
              devices training runs the formulas), in the channels_last
              memory format
              (weights converted, the input converted on entry; the outputs
              stay channels_last, so the neck and head run in it too).
              Needs GroupNorm(1) norms with affine parameters (the default
              ``norm_cfg``).
            - ``'plain'``: module by module, NCHW: the reference, and the
              choice for any other ``norm_cfg``.

            :meth:`set_impl` switches a built backbone (e.g. to ``'plain'``
            for tracing).
        init_cfg (dict | list[dict], optional): ``dict(type='Pretrained',
            checkpoint=PATH_OR_URL)`` loads weights of any published layout
            (converted on the fly; missing and unexpected keys reported).
            Default: truncated-normal (std .02) convs, unit norms.

    Input: ``B x in_channels x H x W`` float tensor.
    Output: tuple with one ``B x C_i x H_i x W_i`` tensor per stage in
    ``out_indices``, in increasing stage order.
    """

    resolve_arch = staticmethod(resolve_arch)
    EVAL_NORMS = (nn.GroupNorm, nn.LayerNorm,
                  nn.modules.batchnorm._BatchNorm)

    def __init__(self,
                 arch: Union[str, dict] = 's12',
                 in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 norm_cfg: dict = dict(type='GN', num_groups=1),
                 drop_path_rate: float = 0.,
                 with_cp: bool = False,
                 impl: str = 'fast',
                 init_cfg=None):
        if init_cfg is None:
            init_cfg = [
                dict(type='TruncNormal', layer='Conv2d', std=.02, bias=0.),
                dict(type='Constant', layer=['GroupNorm', '_BatchNorm'],
                     val=1., bias=0.)]
        super().__init__(init_cfg=init_cfg)
        self.arch = resolve_arch(arch)
        self.out_indices = check_out_indices(out_indices)
        check_frozen_stages(frozen_stages)
        check_drop_path_rate(drop_path_rate)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.in_channels = in_channels
        check_impl(impl, 'PoolFormer')
        self.norm_cfg = norm_cfg

        a = self.arch
        dims = a['embed_dims']
        self.stem = PatchEmbed(in_channels, dims[0], a['stem_patch_size'],
                               a['stem_stride'], a['stem_padding'])
        rates = torch.linspace(0, drop_path_rate, sum(a['layers']),
                               device='cpu').tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(a['layers']):
            downsample = nn.Identity() if i == 0 else PatchEmbed(
                dims[i - 1], dims[i], a['down_patch_size'], a['down_stride'],
                a['down_padding'])
            first = sum(a['layers'][:i])
            blocks = [
                PoolFormerBlock(dims[i], a['mlp_ratios'][i], a['pool_size'],
                                norm_cfg, a['layer_scale_init_value'],
                                rates[first + j])
                for j in range(depth)]
            self.stages.append(PoolFormerStage(downsample, blocks))
        for i in self.out_indices:
            self.add_module(f'norm{i}', build_norm_layer(norm_cfg, dims[i])[1])
        self.out_channels = [dims[i] for i in self.out_indices]
        self.set_impl(impl)
        self._freeze_stages()
        # Whole-segmentor checkpoints of mmseg/mmpretrain and sail-sg name
        # our weights differently; convert them wherever load_state_dict runs
        # (tools/test.py, load_from, resume, inference API).
        register_load_state_dict_pre_hook(self, self._convert_on_load)

    def set_impl(self, impl: str) -> 'PoolFormer':
        """Compute with ``impl`` (``'fast'`` or ``'plain'``, see the class
        docstring) from now on: sets every block's ``fused`` and converts
        the weights' memory format in place. Returns the backbone."""
        check_impl(impl, 'PoolFormer')
        norm = self.stages[0].blocks[0].norm1
        if impl == 'fast' and not (isinstance(norm, nn.GroupNorm)
                                   and norm.num_groups == 1 and norm.affine):
            raise ValueError(
                f"impl='fast' needs GroupNorm(1) block norms with affine "
                f"parameters (norm_cfg=dict(type='GN', num_groups=1)), but "
                f"norm_cfg={self.norm_cfg!r} builds {norm}; set "
                f"impl='plain' for other norms")
        for stage in self.stages:
            for block in stage.blocks:
                block.fused = impl == 'fast'
        self.impl = impl
        self.to(memory_format=impl_memory_format(impl))
        return self

    @property
    def min_input_size(self) -> int:
        """Smallest height/width the stem accepts."""
        return max(1, self.arch['stem_patch_size'] -
                   2 * self.arch['stem_padding'])

    def stage_features(self, x) -> List[torch.Tensor]:
        """Raw outputs (before ``norm{i}``) of the stages in out_indices."""
        self._check_input(x)
        if self.impl == 'fast':
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        features = []
        for i, stage in enumerate(self.stages[:self.out_indices[-1] + 1]):
            x = stage(x, with_cp=self.with_cp and self.training)
            if i in self.out_indices:
                features.append(x)
        return features

    @staticmethod
    def convert_checkpoint_keys(state_dict: dict, prefix: str = ''):
        """Rename, in place, upstream PoolFormer keys under ``prefix`` to ours.

        Returns ``(layout, count, dropped)`` as
        :func:`~poolformer_seg.utils.layouts.convert_prefixed_keys`; the
        strict segmentor loader calls it for every backbone of a model.
        """
        return convert_prefixed_keys(state_dict, prefix)

    def _convert_on_load(self, module, state_dict, prefix, local_metadata,
                         strict, missing_keys, unexpected_keys, error_msgs):
        """``load_state_dict`` pre-hook: :meth:`convert_checkpoint_keys`.

        Torch and mmengine call it before the module's own keys are matched,
        with the (copied) state dict of the whole load, so converting in place
        is what the rest of the load sees. Dropped tensors (classifier heads)
        are reported as unexpected keys under their original names.
        """
        layout, count, dropped = self.convert_checkpoint_keys(state_dict,
                                                              prefix)
        if layout is not None:
            unexpected_keys.extend(dropped)
            print_log(conversion_message(layout, count, prefix),
                      logger='current')

    def init_weights(self):
        if isinstance(self.init_cfg, dict) and \
                self.init_cfg.get('type') == 'Pretrained':
            load_pretrained(self, self.init_cfg['checkpoint'],
                            prefix=self.init_cfg.get('prefix'))
            self._is_init = True
            return
        super().init_weights()

