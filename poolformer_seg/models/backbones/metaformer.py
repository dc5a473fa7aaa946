"""MetaFormer baselines (Yu et al., TPAMI 2023, arXiv 2210.13452) for dense
prediction: PoolFormerV2, IdentityFormer, ConvFormer, CAFormer and hybrids.

Layout (``C_i`` = ``embed_dims[i]``, input ``B x 3 x H x W``)::

    stem         conv k7 s4 p2, then LN          -> B x C_0 x H/4  x W/4
    stages[0]    blocks                          -> B x C_0 x H/4  x W/4
    stages[i]    LN, conv k3 s2 p1, blocks       -> B x C_i x H/2^(i+2) ...
    norm{i}      LayerNorm (with bias) over the channels of each returned stage

Sizes round as convolutions do, so any input of at least 3 px per side works.
"LN" above is a bias-free LayerNorm over channels (eps 1e-6).

A block (``mixer`` one of :data:`TOKEN_MIXERS`, ``rs``/``ls`` optional
res-scale/layer-scale vectors, absent = 1)::

    x = rs1 * x + ls1 * mixer(norm1(x))
    x = rs2 * x + ls2 * mlp(norm2(x))      mlp: C -> r*C, StarReLU, -> C

with StarReLU ``s * relu(x)**2 + b`` (learned scalars ``s``, ``b``), no bias
in the MLP, the separable convolution or the attention projections, and
bias-free block norms: ``'gn'`` (GroupNorm with one group, PoolFormerV2 and
IdentityFormer) or ``'ln'`` (LayerNorm over channels, ConvFormer/CAFormer).
Attention stages run on a ``B x N x C`` token sequence (``nn.Linear`` MLP),
all other stages on ``B x C x H x W`` (1x1 convolutions), as timm does.

Parameter names are timm 1.0's ``timm/models/metaformer.py`` names, plus the
output norms ``norm{i}``; the original sail-sg checkpoints are converted by
:mod:`poolformer_seg.utils.metaformer_layouts`.
"""
import copy
import difflib
from typing import Dict, List, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn.bricks import DropPath
from mmseg.registry import MODELS

from ...compat import pool_excluding_padding
from ...utils.loading import load_pretrained_metaformer
from .base import (NUM_STAGES, StagedBackbone, check_drop_path_rate,
                   check_frozen_stages, check_impl, check_out_indices,
                   impl_memory_format)

TOKEN_MIXERS = ('identity', 'pool', 'sepconv', 'attention')
BLOCK_NORMS = ('gn', 'ln')
_S, _M = [64, 128, 320, 512], [96, 192, 384, 768]
# sizes: name -> (layers, embed_dims)
_V2_SIZES = {'s12': ([2, 2, 6, 2], _S), 's24': ([4, 4, 12, 4], _S),
             's36': ([6, 6, 18, 6], _S), 'm36': ([6, 6, 18, 6], _M),
             'm48': ([8, 8, 24, 8], _M)}
_CA_SIZES = {'s18': ([3, 3, 9, 3], _S), 's36': ([3, 12, 18, 3], _S),
             'm36': ([3, 12, 18, 3], [96, 192, 384, 576]),
             'b36': ([3, 12, 18, 3], [128, 256, 512, 768])}
# family -> (sizes, token mixers, block norms)
_FAMILIES = {
    'poolformerv2': (_V2_SIZES, ['pool'] * 4, ['gn'] * 4),
    'identityformer': (_V2_SIZES, ['identity'] * 4, ['gn'] * 4),
    'convformer': (_CA_SIZES, ['sepconv'] * 4, ['ln'] * 4),
    'caformer': (_CA_SIZES, ['sepconv', 'sepconv', 'attention', 'attention'],
                 ['ln'] * 4),
}
# Published variants (timm 1.0 and sail-sg/metaformer), e.g.
# 'caformer_s18'. Keys not given here take ARCH_DEFAULTS.
ARCH_SETTINGS: Dict[str, dict] = {
    f'{family}_{size}': dict(layers=layers, embed_dims=dims,
                             token_mixers=mixers, norms=norms)
    for family, (sizes, mixers, norms) in _FAMILIES.items()
    for size, (layers, dims) in sizes.items()
}
# The MetaFormer-baselines defaults, shared by every published variant.
ARCH_DEFAULTS = dict(
    norms=['ln'] * 4,
    mlp_ratios=[4] * 4,
    layer_scale_init_values=[None] * 4,
    res_scale_init_values=[None, None, 1.0, 1.0])
ARCH_REQUIRED = ('layers', 'embed_dims', 'token_mixers')
# fixed by the published models
POOL_SIZE, SEPCONV_KERNEL, SEPCONV_EXPANSION, HEAD_DIM = 3, 7, 2, 32
NORM_EPS = 1e-6


def _per_stage(key: str, value, choices=None) -> list:
    """``value`` as a list of NUM_STAGES entries, checked; error names key."""
    if key.endswith('_init_values') and not isinstance(value, (list, tuple)):
        value = [value] * NUM_STAGES  # one scale for every stage
    if not isinstance(value, (list, tuple)) or len(value) != NUM_STAGES:
        raise ValueError(f'arch[{key!r}] must list {NUM_STAGES} entries (one '
                         f'per stage), got {value!r}')
    for entry in value:
        if choices is not None:
            if entry not in choices:
                close = difflib.get_close_matches(str(entry), choices, 1)
                hint = f' (did you mean {close[0]!r}?)' if close else ''
                raise ValueError(f'arch[{key!r}] has unknown entry '
                                 f'{entry!r}{hint}; choose from {choices}')
        elif key.endswith('_init_values'):
            if entry is not None and not isinstance(entry, (int, float)):
                raise ValueError(f'arch[{key!r}] entries must be numbers or '
                                 f'None (no scale), got {entry!r}')
        elif not (isinstance(entry, int if key in ARCH_REQUIRED else
                             (int, float)) and entry > 0):
            kind = 'integers' if key in ARCH_REQUIRED else 'numbers'
            raise ValueError(f'arch[{key!r}] entries must be positive '
                             f'{kind}, got {value!r}')
    return list(value)


def resolve_arch(arch: Union[str, dict]) -> dict:
    """The full arch dict of a variant name or a custom dict.

    Raises ``ValueError``/``TypeError`` naming the offending key or value.
    """
    if isinstance(arch, str):
        if arch.lower() not in ARCH_SETTINGS:
            close = difflib.get_close_matches(arch.lower(), ARCH_SETTINGS, 1)
            hint = f' (did you mean {close[0]!r}?)' if close else ''
            raise ValueError(f'arch={arch!r} is not a MetaFormer variant'
                             f'{hint}; choose one of {sorted(ARCH_SETTINGS)} '
                             'or pass a dict')
        arch = ARCH_SETTINGS[arch.lower()]
    if not isinstance(arch, dict):
        raise TypeError(f'arch must be a str or dict, got {type(arch)}')
    allowed = list(ARCH_REQUIRED) + list(ARCH_DEFAULTS)
    unknown = sorted(set(arch) - set(allowed))
    if unknown:  # first: a typo also makes the intended key look missing
        close = [f'{match!r} for {key!r}' for key in unknown
                 for match in difflib.get_close_matches(key, allowed, 1)]
        hint = f' (did you mean {", ".join(close)}?)' if close else ''
        raise ValueError(f'custom arch has unknown keys {unknown}{hint}; '
                         f'allowed: {allowed}')
    missing = [key for key in ARCH_REQUIRED if key not in arch]
    if missing:
        raise ValueError(f'custom arch is missing {missing}; it needs '
                         f'{list(ARCH_REQUIRED)}')
    full = {**copy.deepcopy(ARCH_DEFAULTS), **copy.deepcopy(arch)}
    choices = dict(token_mixers=TOKEN_MIXERS, norms=BLOCK_NORMS)
    return {key: _per_stage(key, value, choices.get(key))
            for key, value in full.items()}


# ----------------------------------------------------------------------------
# Layers. ``tokens=True``: the input is B x N x C (attention stages);
# otherwise B x C x H x W.


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``B x C x H x W`` map (the output
    norms; weight and bias, eps 1e-6 as the classifiers' final norm)."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=NORM_EPS)

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape,
                         self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class BlockNorm(nn.Module):
    """Bias-free norm with a per-channel weight, eps 1e-6.

    ``kind='ln'`` normalises the channels of each position; ``kind='gn'``
    all channels and positions of a sample together (GroupNorm(1)).
    """

    def __init__(self, channels: int, kind: str, tokens: bool):
        super().__init__()
        self.kind, self.tokens = kind, tokens
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        if self.kind == 'gn':
            if self.tokens:  # B x N x C: all of N x C, then the weight
                return F.layer_norm(x, x.shape[1:], eps=NORM_EPS) * self.weight
            return F.group_norm(x, 1, self.weight, None, NORM_EPS)
        if self.tokens:
            return F.layer_norm(x, self.weight.shape, self.weight, None,
                                NORM_EPS)
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape,
                         self.weight, None, NORM_EPS)
        return x.permute(0, 3, 1, 2)


class Scale(nn.Module):
    """Learned per-channel factor (res-scale or layer-scale)."""

    def __init__(self, channels: int, init_value: float, tokens: bool):
        super().__init__()
        self.shape = (channels, ) if tokens else (channels, 1, 1)
        self.scale = nn.Parameter(torch.full((channels, ), float(init_value)))

    def forward(self, x):
        return x * self.scale.view(self.shape)

    def add_scaled_(self, out, x):
        """``out + self(x)`` written into ``out`` (one pass)."""
        return out.addcmul_(x, self.scale.view(self.shape))


class StarReLU(nn.Module):
    """``scale * relu(x) ** 2 + bias`` with two learned scalars."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return _StarReLUFunction.apply(x, self.scale, self.bias)

    def forward_(self, x):
        """The same values computed in ``x``'s memory and dtype (no
        autograd): for a fresh tensor that nothing else reads."""
        x = _relu_squared_in_place(x)
        return x.mul_(self.scale).add_(self.bias)


def _relu_squared_in_place(x):
    x = F.relu_(x)
    return x.mul_(x)


def relu_squared(x):
    """``relu(x) ** 2`` of a fresh tensor that nothing else reads: in its
    memory without autograd; with autograd, keeping ``relu(x)`` only."""
    if torch.is_grad_enabled():
        return _ReLUSquaredFunction.apply(x)
    return _relu_squared_in_place(x)


class _ReLUSquaredFunction(torch.autograd.Function):
    """``relu(x) ** 2``, keeping ``relu(x)`` for ``d/dx = 2 relu(x)``."""

    @staticmethod
    def forward(ctx, x):
        relu = F.relu(x)
        ctx.save_for_backward(relu)
        return relu * relu

    @staticmethod
    def backward(ctx, grad):
        relu, = ctx.saved_tensors
        return grad.mul(relu).mul_(2)


class _StarReLUFunction(torch.autograd.Function):
    """StarReLU with the formula's values and dtype (promoted with the
    scalars, so fp32 under autocast) and a shorter backward.

    Autograd of the formula keeps ``relu(x)`` and ``relu(x) ** 2`` and runs
    the power's and the ReLU's backward as separate passes; this keeps
    ``relu(x)`` only and needs no ReLU mask (``d/dx = 2 * scale * relu(x)``
    is already zero where ``x <= 0``): about 9% of a ConvFormer-S18
    training step (docs/metaformer.md).
    """

    @staticmethod
    def forward(ctx, x, scale, bias):
        relu = F.relu(x)
        ctx.save_for_backward(relu, scale)
        y = relu * relu
        # in place only where the formula's type promotion keeps the dtype
        y = y.mul_(scale) if y.dtype == scale.dtype else y * scale
        return y.add_(bias)

    @staticmethod
    def backward(ctx, grad):
        relu, scale = ctx.saved_tensors
        grad_relu = grad * relu
        grad_scale = (grad_relu * relu).sum().reshape(1) \
            if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum().reshape(1) if ctx.needs_input_grad[2] else None
        return grad_relu.mul_(2 * scale), grad_scale, grad_bias


def _pointwise(in_channels: int, out_channels: int, tokens: bool):
    """Bias-free per-position linear map: Linear on tokens, 1x1 conv on
    maps."""
    if tokens:
        return nn.Linear(in_channels, out_channels, bias=False)
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


class Mlp(nn.Module):
    """``fc2(StarReLU(fc1(x)))``, C -> hidden -> C, no biases."""

    def __init__(self, channels: int, hidden: int, tokens: bool):
        super().__init__()
        self.fc1 = _pointwise(channels, hidden, tokens)
        self.act = StarReLU()
        self.fc2 = _pointwise(hidden, channels, tokens)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def forward_folded(self, x):
        """The same function with StarReLU's scalars folded into fc2,
        ``W (s r + b) = (s W) r + b W 1``, so that the hidden map holds
        ``relu(h) ** 2`` only (:func:`relu_squared`) and the scalars'
        gradients come from fc2's weight gradient, not from passes over
        the hidden map."""
        hidden = relu_squared(self.fc1(x))
        weight = self.fc2.weight
        folded_weight = weight * self.act.scale
        folded_bias = self.act.bias * weight.sum(tuple(range(1, weight.dim())))
        if weight.dim() == 2:
            return F.linear(hidden, folded_weight, folded_bias)
        return F.conv2d(hidden, folded_weight, folded_bias)


class Pooling(nn.Module):
    """``avg_pool3x3(x) - x`` (padding excluded), as in PoolFormer."""

    def forward(self, x):
        return pool_excluding_padding(x, POOL_SIZE) - x

    def forward_inference(self, x):
        """The same values, subtracting in the pooled map's memory."""
        return pool_excluding_padding(x, POOL_SIZE).sub_(x)


class SepConv(nn.Module):
    """Inverted separable convolution (MobileNetV2): 1x1 conv C -> 2C,
    StarReLU, 7x7 depthwise conv, 1x1 conv 2C -> C; no biases."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = SEPCONV_EXPANSION * channels
        self.pwconv1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act1 = StarReLU()
        self.dwconv = nn.Conv2d(hidden, hidden, SEPCONV_KERNEL,
                                padding=SEPCONV_KERNEL // 2, groups=hidden,
                                bias=False)
        self.pwconv2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x):
        return self.pwconv2(self.dwconv(self.act1(self.pwconv1(x))))

    def forward_inference(self, x):
        """The same values, StarReLU in place on pwconv1's fresh output."""
        return self.pwconv2(self.dwconv(self.act1.forward_(self.pwconv1(x))))


class Attention(nn.Module):
    """Global multi-head self-attention over ``B x N x C`` tokens.

    ``max(C // 32, 1)`` heads of width 32; no biases. Computed by
    ``F.scaled_dot_product_attention``, whose fused kernels do not
    materialise the ``N x N`` matrix, so any input size works.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.num_heads = max(channels // HEAD_DIM, 1)
        inner = self.num_heads * HEAD_DIM
        self.qkv = nn.Linear(channels, 3 * inner, bias=False)
        self.proj = nn.Linear(inner, channels, bias=False)

    def forward(self, x):
        batch, num_tokens, _ = x.shape
        q, k, v = self.qkv(x).view(batch, num_tokens, 3, self.num_heads,
                                   HEAD_DIM).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # B x heads x N x 32
        return self.proj(x.transpose(1, 2).reshape(batch, num_tokens, -1))

    forward_inference = forward  # no cheaper form without autograd


class Identity(nn.Identity):
    """The identity mixer (``nn.Identity`` with the mixers' interface)."""

    forward_inference = nn.Identity.forward


def build_token_mixer(name: str, channels: int) -> nn.Module:
    if name == 'identity':
        return Identity()
    if name == 'pool':
        return Pooling()
    if name == 'sepconv':
        return SepConv(channels)
    return Attention(channels)


class MetaFormerBlock(nn.Module):
    """One block (see the module docstring); shape-preserving.

    With ``fused=True`` (set by the backbone's ``impl='fast'``) the same
    function takes fewer passes over memory: the MLP's StarReLU scalars are
    folded into ``fc2`` (:meth:`Mlp.forward_folded`), and without autograd
    (``torch.no_grad``, ``inference_mode``) each branch also writes into
    its own fresh tensors (StarReLU in place, the residual added with one
    ``addcmul_``). The block's input is never written.
    """

    def __init__(self, channels: int, mixer: str, norm: str,
                 mlp_ratio: float, layer_scale: float, res_scale: float,
                 drop_path: float):
        super().__init__()
        tokens = mixer == 'attention'

        def scale(init_value):
            return nn.Identity() if init_value is None else \
                Scale(channels, init_value, tokens)

        self.norm1 = BlockNorm(channels, norm, tokens)
        self.token_mixer = build_token_mixer(mixer, channels)
        self.layer_scale1, self.res_scale1 = scale(layer_scale), \
            scale(res_scale)
        self.norm2 = BlockNorm(channels, norm, tokens)
        self.mlp = Mlp(channels, int(mlp_ratio * channels), tokens)
        self.layer_scale2, self.res_scale2 = scale(layer_scale), \
            scale(res_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else \
            nn.Identity()
        self.fused = False

    def forward(self, x):
        if self.fused and not torch.is_grad_enabled():
            return self._forward_inference(x)
        mlp = self.mlp.forward_folded if self.fused else self.mlp
        x = self.res_scale1(x) + self.layer_scale1(
            self.drop_path(self.token_mixer(self.norm1(x))))
        return self.res_scale2(x) + self.layer_scale2(
            self.drop_path(mlp(self.norm2(x))))

    def _forward_inference(self, x):
        branch = self.drop_path(
            self.token_mixer.forward_inference(self.norm1(x)))
        x = _add_residual_(self.layer_scale1(branch), x, self.res_scale1)
        branch = self.drop_path(self.mlp.forward_folded(self.norm2(x)))
        return _add_residual_(self.layer_scale2(branch), x, self.res_scale2)


def _add_residual_(branch, x, res_scale):
    """``res_scale(x) + branch``, written into the fresh ``branch``."""
    if isinstance(res_scale, Scale):
        return res_scale.add_scaled_(branch, x)
    return branch.add_(x)


class Stem(nn.Module):
    """conv k7 s4 p2, then a bias-free channel LayerNorm (post-norm)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 7, 4, 2)
        self.norm = BlockNorm(out_channels, 'ln', tokens=False)

    def forward(self, x):
        return self.norm(self.conv(x))


class Downsampling(nn.Module):
    """A bias-free channel LayerNorm (pre-norm), then conv k3 s2 p1."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = BlockNorm(in_channels, 'ln', tokens=False)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, 2, 1)

    def forward(self, x):
        return self.conv(self.norm(x))


class MetaFormerStage(nn.Module):
    """Optional downsampling, then blocks; ``B x C x H x W`` in and out
    (attention stages flatten to tokens for their blocks)."""

    def __init__(self, downsample: nn.Module, blocks: List[nn.Module],
                 tokens: bool):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.tokens = tokens

    def forward(self, x, with_cp=False):
        x = self.downsample(x)
        batch, channels, height, width = x.shape
        if self.tokens:
            x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            if with_cp and x.requires_grad:
                x = cp.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if self.tokens:
            x = x.transpose(1, 2).reshape(batch, channels, height, width)
        return x


def _channels_last(grad):
    """A stage output's gradient, in channels_last. A loss on the raw
    features can send another format back (``mean()`` sends an expanded
    gradient, and adding it to a channels_last one gives NCHW), and every
    convolution of the stage would then convert it again."""
    return grad.contiguous(memory_format=torch.channels_last)


@MODELS.register_module()
class MetaFormer(StagedBackbone):
    """MetaFormer backbone returning multi-scale features.

    Args:
        arch (str | dict): a published variant -- ``'poolformerv2_{s12,s24,
            s36,m36,m48}'``, ``'identityformer_{s12,...,m48}'``,
            ``'convformer_{s18,s36,m36,b36}'``,
            ``'caformer_{s18,s36,m36,b36}'`` -- or a custom dict. A dict needs
            ``layers`` (blocks per stage), ``embed_dims`` (channels per stage)
            and ``token_mixers`` (one of ``'identity'``, ``'pool'``,
            ``'sepconv'``, ``'attention'`` per stage), each a list of 4.
            Optional, with the MetaFormer-baselines defaults:
            ``norms=['ln'] * 4`` (or ``'gn'``, per stage),
            ``mlp_ratios=[4] * 4``, ``layer_scale_init_values=None`` and
            ``res_scale_init_values=[None, None, 1., 1.]`` (a number or None
            per stage, or one for all; None = no scale). Unknown keys are
            rejected. Unlike timm, stages 1-3 always downsample, also when
            two consecutive ``embed_dims`` are equal.
        in_channels (int): channels of the input image. Default 3.
        out_indices (Sequence[int]): which of the four stages to return,
            counted 0..3 (strides 4, 8, 16, 32); negatives count from the
            end. Each returned stage gets its own output norm ``norm{i}``
            (:class:`LayerNorm2d`). Default ``(0, 1, 2, 3)``.
        frozen_stages (int): ResNet convention. -1 freezes nothing; 0
            freezes the stem; ``k >= 1`` the stem and stages ``0..k-1``
            (downsampling, blocks and output norms): no gradients, eval
            mode. Default -1.
        norm_eval (bool): keep every norm layer in eval mode during
            training. Kept for config compatibility with :class:`PoolFormer`;
            no norm here has running statistics, so it changes nothing.
            Default False.
        drop_path_rate (float): stochastic depth, rising linearly from 0 at
            the first block to this value at the last. Default 0.
        with_cp (bool): gradient checkpointing per block. Default False.
        impl (str): how the same function is computed (weights and keys
            are the same): ``'fast'`` (default) in channels_last (weights
            converted, the input converted on entry, the outputs staying
            channels_last for the neck and head), with the MLPs'
            StarReLU scalars folded into ``fc2`` and, without autograd, the
            blocks computing in place (:class:`MetaFormerBlock`);
            ``'plain'``: the formulas as written, in NCHW. See
            docs/metaformer.md for the measurements. :meth:`set_impl`
            switches a built backbone.
        init_cfg (dict | list[dict], optional): ``dict(type='Pretrained',
            checkpoint=PATH_OR_URL, prefix=None)`` loads timm or sail-sg
            weights (converted on the fly; strict except for the output
            norms). Default: truncated-normal (std .02) convolutions and
            linears with zero biases, as timm.

    Input: ``B x in_channels x H x W`` float tensor.
    Output: tuple with one ``B x C_i x H_i x W_i`` tensor per stage in
    ``out_indices``, in increasing stage order.
    """

    resolve_arch = staticmethod(resolve_arch)
    EVAL_NORMS = (BlockNorm, nn.LayerNorm)

    def __init__(self,
                 arch: Union[str, dict] = 'caformer_s18',
                 in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 drop_path_rate: float = 0.,
                 with_cp: bool = False,
                 impl: str = 'fast',
                 init_cfg=None):
        check_impl(impl, 'MetaFormer')
        if init_cfg is None:
            init_cfg = dict(type='TruncNormal', layer=['Conv2d', 'Linear'],
                            std=.02, bias=0.)
        super().__init__(init_cfg=init_cfg)
        self.arch_name = arch if isinstance(arch, str) else 'custom'
        self.arch = resolve_arch(arch)
        self.out_indices = check_out_indices(out_indices)
        check_frozen_stages(frozen_stages)
        check_drop_path_rate(drop_path_rate)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.in_channels = in_channels

        a = self.arch
        dims = a['embed_dims']
        self.stem = Stem(in_channels, dims[0])
        rates = torch.linspace(0, drop_path_rate, sum(a['layers']),
                               device='cpu').tolist()  # also under meta
        self.stages = nn.ModuleList()
        for i, depth in enumerate(a['layers']):
            first = sum(a['layers'][:i])
            blocks = [
                MetaFormerBlock(dims[i], a['token_mixers'][i], a['norms'][i],
                                a['mlp_ratios'][i],
                                a['layer_scale_init_values'][i],
                                a['res_scale_init_values'][i],
                                rates[first + j]) for j in range(depth)]
            downsample = nn.Identity() if i == 0 else \
                Downsampling(dims[i - 1], dims[i])
            self.stages.append(MetaFormerStage(
                downsample, blocks, a['token_mixers'][i] == 'attention'))
        for i in self.out_indices:
            self.add_module(f'norm{i}', LayerNorm2d(dims[i]))
        self.out_channels = [dims[i] for i in self.out_indices]
        self._freeze_stages()
        self.set_impl(impl)

    min_input_size = 3  # the stem: kernel 7, padding 2

    def set_impl(self, impl: str) -> 'MetaFormer':
        """Compute with ``impl`` (see the class docstring) from now on:
        sets every block's ``fused`` and converts the weights' memory format
        in place. Returns the backbone."""
        self.impl = check_impl(impl, 'MetaFormer')
        for module in self.modules():
            if isinstance(module, MetaFormerBlock):
                module.fused = impl == 'fast'
        self.to(memory_format=impl_memory_format(impl))
        return self

    def stage_features(self, x) -> List[torch.Tensor]:
        """Raw outputs (before ``norm{i}``) of the stages in out_indices."""
        self._check_input(x)
        if self.impl == 'fast':
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        features = []
        for i, stage in enumerate(self.stages[:self.out_indices[-1] + 1]):
            x = stage(x, with_cp=self.with_cp and self.training)
            if self.impl == 'fast' and x.requires_grad:
                x.register_hook(_channels_last)
            if i in self.out_indices:
                features.append(x)
        return features

    def describe(self) -> str:
        """``MetaFormer(arch='caformer_s18')``, or the custom arch's lists,
        for log lines and errors."""
        if self.arch_name != 'custom':
            return f'MetaFormer(arch={self.arch_name!r})'
        a = self.arch
        return (f"MetaFormer(custom arch layers={a['layers']}, embed_dims="
                f"{a['embed_dims']}, token_mixers={a['token_mixers']})")

    def init_weights(self):
        if isinstance(self.init_cfg, dict) and \
                self.init_cfg.get('type') == 'Pretrained':
            load_pretrained_metaformer(self, self.init_cfg['checkpoint'],
                                       prefix=self.init_cfg.get('prefix'))
            self._is_init = True
            return
        super().init_weights()
