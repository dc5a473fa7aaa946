"""Semantic FPN's neck with an in-place top-down path and a cheaper finest
level; same results."""
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmseg.models.necks import FPN
from mmseg.models.utils import resize
from mmseg.registry import MODELS

from ..utils import autocast_off, derived_weights
from ..winograd import (conv_and_weights, conv_module_forward,
                        finish_conv_module, winograd_conv3x3,
                        winograd_preferred, winograd_runs_on,
                        winograd_weight)

COMPOSE_FINEST = True
"""Whether :class:`FastFPN` computes its finest output by
:func:`composed_finest_output` where that needs fewer multiply-adds (the
switch of ``tools/benchmark.py --ablations``' row ``ours-no-compose``)."""


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def add_nearest_2x_(fine: torch.Tensor, coarse: torch.Tensor):
    """``fine += nearest_upsample(coarse)`` for ``fine`` exactly twice the
    size of ``coarse``, in place and without the upsampled copy: each
    ``coarse`` pixel is broadcast onto its 2x2 block of ``fine``.

    Nearest upsampling to twice the size maps output pixel ``i`` to input
    pixel ``floor(i / 2)``, so this is the same sum, bit for bit.
    """
    b, c, h, w = coarse.shape
    blocks = fine.unflatten(2, (h, 2)).unflatten(4, (w, 2))  # B C h 2 w 2
    blocks.add_(coarse.unsqueeze(3).unsqueeze(5))
    return fine


def _phase_taps(weight):
    """Along the last axis, the ``n + 1`` taps of a transposed convolution
    (stride 2, padding ``n // 2``) equal to the ``n`` taps ``weight`` (``n``
    odd) applied to a nearest 2x upsampled signal.

    With ``u[2i] = u[2i + 1] = x[i]``, input ``i`` reaches each output
    through the one or two taps that read ``u[2i]`` or ``u[2i + 1]`` from
    there: the outermost outputs through one end tap, the others through the
    sum of two neighbouring taps, in reverse order (for 3 taps, outputs
    ``2i - 1 .. 2i + 2`` get ``w2, w1 + w2, w0 + w1, w0``). Zero padding
    agrees at the borders: outside the image both read nothing."""
    padded = F.pad(weight, (1, 1))
    return (padded[..., :-1] + padded[..., 1:]).flip(-1)


def upsampled_conv_kernel(weight):
    """``Cin x Cout x (k + 1) x (k + 1)`` kernel ``K`` with
    ``conv_transpose2d(x, K, stride=2, padding=k // 2) == conv2d(
    nearest_2x(x), weight, padding=k // 2)`` for a ``Cout x Cin x k x k``
    ``weight``, ``k`` odd (no bias): ``(k + 1)^2 / 4`` instead of ``k^2``
    multiply-adds per output pixel and channel pair (4 instead of 9 for a
    3x3), and no upsampled copy."""
    taps = _phase_taps(_phase_taps(weight).transpose(2, 3)).transpose(2, 3)
    return taps.transpose(0, 1)


def phase_kernel(kernel):
    """``4K x Cin x 3 x 3`` weight of the 3x3 convolution (padding 1) whose
    output channels ``(2r + s) K + k`` are the output phase ``(r, s)`` (rows
    ``2i + r``, columns ``2j + s``) of ``conv_transpose2d(x, kernel,
    stride=2, padding=2)`` for a ``Cin x K x 6 x 6`` ``kernel``.

    That output's row ``2i + r`` reads input rows ``i - 1, i, i + 1``
    through the kernel's rows ``r + 4, r + 2, r``; the same along
    columns."""
    taps = [kernel[:, :, r::2].flip(2)[:, :, :, s::2].flip(3)
            for r in (0, 1) for s in (0, 1)]
    return torch.cat(taps, 1).transpose(0, 1)


def unshuffled_kernel(kernel):
    """``4K x 4Cin x 3 x 3`` weight of the 3x3 convolution (padding 1) of
    ``pixel_unshuffle(x, 2)`` whose output channels ``(2r + s) K + k`` are
    the output phase ``(r, s)`` of ``conv2d(x, kernel, padding=2)`` for a
    ``K x Cin x 5 x 5`` ``kernel`` (``x`` of even height and width).

    Output row ``2i + r`` reads input rows ``2i + r - 2 .. 2i + r + 2``,
    that is unshuffled row ``i + d`` (``d = -1, 0, 1``) at offset ``a``
    (``pixel_unshuffle``'s channel ``4c + 2a + b``) through tap ``2d + a +
    2 - r``, where that lies in ``0 .. 4``; the same along columns."""
    k, cin = kernel.shape[:2]
    padded = F.pad(kernel, (1, 1, 1, 1))  # tap u at u + 1
    taps = []
    for r in (0, 1):
        for s in (0, 1):
            phase = padded[:, :, 1 - r:7 - r, 1 - s:7 - s]  # tap 2(d+1) + a
            phase = phase.reshape(k, cin, 3, 2, 3, 2)  # d, a, d', b
            taps.append(phase.permute(0, 1, 3, 5, 2, 4).reshape(
                k, 4 * cin, 3, 3))
    return torch.cat(taps, 0)


def _interleaved(phases):
    """``B x K x 2h x 2w`` channels_last from ``B x 4K x h x w`` output
    phases, channels ordered as :func:`phase_kernel` orders them."""
    b, k4, height, width = phases.shape
    k = k4 // 4
    rows = phases.permute(0, 2, 3, 1).view(b, height, width, 2, 2, k)
    return rows.permute(0, 1, 3, 2, 4, 5).reshape(
        b, 2 * height, 2 * width, k).permute(0, 3, 1, 2)


def _phases_by_winograd(level: 'FinestLevel', weight) -> bool:
    """Whether :func:`composed_conv_of_finest` runs by Winograd (see
    :func:`_composed_by_winograd`): where it runs on the coarse map
    (:func:`~poolformer_seg.models.winograd.winograd_runs_on`), which is
    exactly half the finest."""
    coarse = level.coarse_lateral
    return winograd_runs_on(coarse, weight) and level.feature.shape[2:] == \
        tuple(2 * n for n in coarse.shape[2:])


def _winograd_phases(on_feature, on_coarse):
    """``(weight, transformed)`` of :func:`_composed_by_winograd`'s 3x3
    convolution, ``transformed`` (its
    :func:`~poolformer_seg.models.winograd.winograd_weight`) only where no
    gradient is recorded, else None."""
    weight = torch.cat([unshuffled_kernel(on_feature),
                        phase_kernel(on_coarse)], 1)
    if torch.is_grad_enabled() and weight.requires_grad:
        return weight, None
    return weight, winograd_weight(weight)


def _composed_by_winograd(feature, coarse, phases, inner_bias):
    """The first two terms of :func:`composed_conv_of_finest`, the 5x5
    convolution of ``feature`` and the transposed one of ``coarse``, as
    the four output phases of one 3x3 convolution at ``coarse``'s size, of
    ``feature``'s unshuffled 2x2 blocks next to ``coarse``'s channels
    (``phases``: :func:`_winograd_phases`), by Winograd."""
    weight, transformed = phases
    blocks = F.pixel_unshuffle(feature, 2).contiguous(
        memory_format=torch.channels_last)
    bias = None if inner_bias is None else inner_bias.repeat(4)
    return _interleaved(winograd_conv3x3(torch.cat([blocks, coarse], 1),
                                         weight, bias, transformed))


def composed_kernel(outer, inner):
    """``Cout x Cin x (a + b - 1) x (a + b - 1)`` kernel of
    ``conv2d(conv2d(x, inner, padding=b // 2), outer, padding=a // 2)``
    for ``outer``: ``Cout x M x a x a`` and ``inner``: ``M x Cin x b x b``
    (no biases), at the outputs whose ``a x a`` window lies inside the image:
    at the others the outer padding reads zeros where the composed kernel
    reads the inner convolution's extension. Tap ``t`` is the sum over
    ``s`` of ``outer[s] @ inner[t - s]``: a convolution of ``inner``'s
    taps with the flipped ``outer``."""
    return F.conv2d(inner.transpose(0, 1), outer.flip(2, 3),
                    padding=outer.shape[-1] - 1).transpose(0, 1)


def _memory_format(x):
    """The memory format for weights that convolve ``x``: a convolution
    follows its weight's."""
    if not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _lateral_composed(fpn_conv, lateral_conv):
    """``fpn_conv``'s 3x3 weight composed with the 1x1 ``lateral_conv``:
    ``C x Cin x 3 x 3``."""
    return (fpn_conv.weight.permute(0, 2, 3, 1)
            @ lateral_conv.weight.flatten(1)).permute(0, 3, 1, 2)


def _biased_coarse(lateral_conv, coarse_lateral):
    """The coarse lateral plus the finer lateral's bias: a constant is its
    own nearest upsampling, and zero padding is the same for both."""
    if lateral_conv.bias is None:
        return coarse_lateral
    return coarse_lateral + lateral_conv.bias.view(-1, 1, 1)


def _sum(a, b):
    return a + b if torch.is_grad_enabled() else a.add_(b)


def _finest_kernels(fpn_conv: nn.Conv2d, lateral_conv: nn.Conv2d, like):
    """The two kernels of :func:`composed_finest_output`, in the weights'
    dtype and ``like``'s memory format."""
    fmt = _memory_format(like)
    with autocast_off(like.device):
        composed = _lateral_composed(fpn_conv, lateral_conv)
        kernel = upsampled_conv_kernel(fpn_conv.weight)
    return (composed.contiguous(memory_format=fmt),
            kernel.contiguous(memory_format=fmt))


def _finest_output(level, kernels):
    """:func:`composed_finest_output` of a :class:`FinestLevel` with its
    :func:`_finest_kernels`."""
    composed, kernel = kernels
    out = F.conv2d(level.feature, composed, level.fpn_conv.bias, padding=1)
    upsampled = F.conv_transpose2d(
        _biased_coarse(level.lateral_conv, level.coarse_lateral), kernel,
        stride=2, padding=1)
    return _sum(out, upsampled)


def composed_finest_output(fpn_conv: nn.Conv2d, lateral_conv: nn.Conv2d,
                           feature, coarse_lateral):
    """``fpn_conv(lateral_conv(feature) + nearest_2x(coarse_lateral))``,
    FPN's finest output, by linearity as two cheaper convolutions:

    * ``fpn_conv`` composed with the 1x1 ``lateral_conv``: one 3x3
      convolution of ``feature``'s ``Cin`` channels instead of the ``C``
      lateral ones;
    * ``fpn_conv`` of the upsampled coarser lateral as a transposed
      convolution of the coarse map (:func:`upsampled_conv_kernel`),
      into which the lateral bias goes (:func:`_biased_coarse`).

    ``(9 Cin + 4 C) C`` instead of ``(Cin + 9 C) C`` multiply-adds per
    pixel. Exact in arithmetic; in floating point the products are summed
    in another order (float64: equal to 1e-12, tests).
    """
    level = FinestLevel(fpn_conv, lateral_conv, feature, coarse_lateral)
    kernels = derived_weights(
        fpn_conv, 'finest_kernels', [fpn_conv.weight, lateral_conv.weight],
        lambda: _finest_kernels(fpn_conv, lateral_conv, feature),
        _memory_format(feature))
    return _finest_output(level, kernels)


COMPOSE_HEAD = True
"""Whether :meth:`FinestLevel.through` composes a following 3x3
convolution with the finest output where that needs fewer multiply-adds
(the switch of ``tools/benchmark.py --ablations``' row
``ours-no-compose-head``)."""


@dataclasses.dataclass
class FinestLevel:
    """FPN's finest output, ``fpn_conv(lateral_conv(feature) +
    nearest_2x(coarse_lateral))``, not yet computed.

    :class:`FastFPN` returns it in place of that output when asked
    (``defer_finest=True``; :class:`~poolformer_seg.models.segmentors.
    RowwiseEncoderDecoder` asks for :class:`~poolformer_seg.models.
    decode_heads.FastFPNHead`, whose first scale head reads only this
    level), so that the convolution which reads it can be composed with
    the two that make it (:meth:`through`). ``feature`` is the finest
    backbone feature (``B x Cin x H x W``), ``coarse_lateral`` the coarser
    level's lateral after the top-down sum (``B x C x H/2 x W/2``).
    """
    fpn_conv: nn.Conv2d
    lateral_conv: nn.Conv2d
    feature: torch.Tensor
    coarse_lateral: torch.Tensor

    def compute(self) -> torch.Tensor:
        """The finest output (:func:`composed_finest_output`)."""
        return composed_finest_output(self.fpn_conv, self.lateral_conv,
                                      self.feature, self.coarse_lateral)

    def through(self, module: nn.Module) -> torch.Tensor:
        """``module(self.compute())`` for a ConvModule (conv, norm, act) or
        an ``nn.Conv2d``; its convolution composed with the finest output's
        (:func:`composed_conv_of_finest`) where :meth:`composes_with`."""
        parts = conv_and_weights(module)  # eval BN folded once per call
        if not self._composes(parts):
            return conv_module_forward(module, self.compute())
        _, weight, bias, norm = parts
        sources = [*self.fpn_conv.parameters(),
                   *self.lateral_conv.parameters(), *module.parameters(),
                   *module.buffers()]
        fmt = _memory_format(self.feature)
        kernels = derived_weights(module, 'composed_with_finest', sources,
                                  lambda: composed_kernels(self, weight, bias),
                                  fmt)
        phases = None
        if _phases_by_winograd(self, weight):
            phases = derived_weights(
                module, 'winograd_phases', sources,
                lambda: _winograd_phases(*kernels[:2]), fmt)
        out = composed_conv_of_finest(self, kernels, phases)
        return finish_conv_module(module, out, norm)

    def composes_with(self, module: nn.Module) -> bool:
        """Whether :meth:`through` composes: :data:`COMPOSE_HEAD`, a 3x3
        'same' convolution in a ConvModule of the usual order (or alone),
        fewer multiply-adds per pixel (``25 Cin K`` against ``(9 Cin + 4 C)
        C + 9 C K`` minus the ``9 C K`` both share, for ``K`` output
        channels), and Winograd not preferred to it
        (:func:`~poolformer_seg.models.winograd.winograd_preferred`)."""
        return self._composes(conv_and_weights(module))

    def _composes(self, parts) -> bool:
        """:meth:`composes_with` for the module's :func:`conv_and_weights`."""
        if not COMPOSE_HEAD or parts is None or \
                _plain_conv(parts[0], 3) is None:
            return False
        conv, feature = parts[0], self.feature
        cin, width = feature.shape[1], self.fpn_conv.out_channels
        return (25 * cin * conv.out_channels < (9 * cin + 4 * width) * width
                and not winograd_preferred(conv, feature))


def _fine_sum_edge(level: FinestLevel, dim: int, index: int):
    """``lateral_conv(feature) + nearest_2x(coarse_lateral)``, the map
    that FPN's output convolution reads, on one row (``dim=2``) or column
    (``dim=3``) of the finest level: ``B x C x length``."""
    lateral = level.lateral_conv
    fine = F.conv1d(level.feature.select(dim, index),
                    lateral.weight.flatten(2), lateral.bias)
    coarse = level.coarse_lateral.select(dim, index // 2)
    return fine + coarse.repeat_interleave(2, dim=-1)


def _subtract_outside_(out, level: FinestLevel, weight):
    """Take from ``out``'s outermost rows and columns what the composed
    kernel read outside the image: the finest output extended by one pixel
    (its convolution of the zero-padded map, plus its bias), where
    ``weight``'s own zero padding reads nothing.

    Outside the top row, the extension reads only the map's first row,
    through the output convolution's bottom taps: a 1D convolution along
    that row, ``W + 2`` long (the corners included), then ``weight``'s top
    taps along it. The same for the other three sides, the corners counted
    once (with the rows)."""
    fpn_weight, fpn_bias = level.fpn_conv.weight, level.fpn_conv.bias
    for dim, pad in ((2, 2), (3, 1)):  # rows with corners, then columns
        last = out.shape[dim] - 1
        for index, outer_tap in ((0, 0), (last, 2)):
            inner_tap = 2 - outer_tap  # the taps that reach inside
            edge = _fine_sum_edge(level, dim, index)
            extension = F.conv1d(edge, fpn_weight.select(dim, inner_tap),
                                 fpn_bias, padding=pad)
            read = F.conv1d(extension, weight.select(dim, outer_tap),
                            padding=2 - pad)
            out.select(dim, index).sub_(read)
    return out


def composed_kernels(level: FinestLevel, weight, bias):
    """What :func:`composed_conv_of_finest` convolves with, for a ``K x C x
    3 x 3`` ``weight`` and its ``bias`` (or None) applied to the finest
    output: ``(on_feature, on_coarse, inner_bias, weight)``, in the weights'
    dtype and the feature's memory format."""
    fpn_conv, lateral_conv = level.fpn_conv, level.lateral_conv
    fmt = _memory_format(level.feature)
    with autocast_off(level.feature.device):
        on_feature = composed_kernel(
            weight, _lateral_composed(fpn_conv, lateral_conv))
        on_coarse = upsampled_conv_kernel(composed_kernel(weight,
                                                          fpn_conv.weight))
        inner_bias = bias
        if fpn_conv.bias is not None:
            through = weight.sum((2, 3)) @ fpn_conv.bias
            inner_bias = through if bias is None else bias + through
    return (on_feature.contiguous(memory_format=fmt),
            on_coarse.contiguous(memory_format=fmt), inner_bias, weight)


def composed_conv_of_finest(level: FinestLevel, kernels, phases=None):
    """``conv2d(level.compute(), weight, bias, padding=1)`` for a
    ``K x C x 3 x 3`` ``weight``, with the finest output never built
    (``kernels``: :func:`composed_kernels` of ``weight`` and ``bias``):

    * away from the border, the three convolutions compose
      (:func:`composed_kernel`): a 5x5 convolution of the finest feature's
      ``Cin`` channels with ``weight`` composed with FPN's lateral and output
      convolutions, plus a transposed convolution of the coarse lateral by
      ``weight`` composed with FPN's output convolution and upsampled
      (:func:`upsampled_conv_kernel`: 9 taps), FPN's output bias
      summed through ``weight``'s taps;
    * on the outermost rows and columns, where ``weight``'s padding reads
      zeros but the composed kernel the finest output's extension, that
      extension's contribution taken off (:func:`_subtract_outside_`: 1D
      convolutions along the four edges).

    ``(25 Cin + 9 C) K`` multiply-adds per pixel instead of ``(9 Cin + 4 C)
    C + 9 C K``. Exact in arithmetic (float64: equal to 1e-10, tests).

    With ``phases`` (:func:`_winograd_phases` of the kernels, where
    Winograd runs on the coarse map), the 5x5 and the transposed
    convolution are one 3x3 convolution at the coarse size, by Winograd
    (:func:`_composed_by_winograd`).
    """
    on_feature, on_coarse, inner_bias, weight = kernels
    coarse = _biased_coarse(level.lateral_conv, level.coarse_lateral)
    if phases is not None:
        out = _composed_by_winograd(level.feature, coarse, phases,
                                    inner_bias)
    else:
        out = F.conv2d(level.feature, on_feature, inner_bias, padding=2)
        out = _sum(out, F.conv_transpose2d(coarse, on_coarse, stride=2,
                                           padding=2))
    return _subtract_outside_(out, level, weight)


def _plain_conv(conv, kernel_size: int):
    """``conv`` if it is an ``nn.Conv2d`` with a ``kernel_size`` square
    kernel, stride 1, 'same' zero padding, no dilation and no groups; else
    None."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != 'zeros' or \
            conv.kernel_size != (kernel_size, kernel_size) or \
            conv.stride != (1, 1) or conv.dilation != (1, 1) or \
            conv.groups != 1 or conv.padding != (kernel_size // 2,) * 2:
        return None
    return conv


def _bare_conv(module, kernel_size: int):
    """The :func:`_plain_conv` of a ConvModule that is only a convolution
    (no norm, no activation, no explicit padding); else None."""
    if not isinstance(module, ConvModule) or module.with_norm or \
            module.with_activation or module.with_explicit_padding:
        return None
    return _plain_conv(module.conv, kernel_size)


@MODELS.register_module()
class FastFPN(FPN):
    """``FPN`` whose top-down additions run in place; same function.

    mmseg's FPN adds each coarser lateral to the next finer one through a
    nearest upsampled copy: at the finest level (stride 4, 256 channels)
    that is two full-size temporaries per call, 256 MB at 1024x2048 in
    fp32, and about 10x slower than :func:`add_nearest_2x_`. This neck
    adds in place when no gradient needs the laterals (inference), the
    upsampling is ``FPN``'s default (nearest, to the finer lateral's size)
    and the finer lateral is exactly twice the coarser; otherwise each
    addition is ``FPN``'s own. The output convolutions run through
    :func:`~poolformer_seg.models.winograd.conv_module_forward` (Winograd
    on CPU, where it pays).

    The finest output, the largest convolution of Semantic FPN (at stride
    4, 256 -> 256 channels: a third of S12's multiply-adds at 512x512), is
    computed by :func:`composed_finest_output` in inference and training
    where its conditions hold (:meth:`_composes_finest`): 41% fewer
    multiply-adds for S12's 64 input channels, and no finest lateral.

    Extra output levels (``num_outs`` above the number of inputs) go
    through ``FPN.forward`` unchanged.

    Layers, arguments and state-dict keys are ``FPN``'s.
    """

    def forward(self, inputs, defer_finest: bool = False):
        """``FPN.forward``; with ``defer_finest``, the finest output is a
        :class:`FinestLevel` where :func:`composed_finest_output` would
        compute it (for a head that composes it with its own convolution),
        a tensor elsewhere."""
        if self.num_outs > len(self.lateral_convs):
            return super().forward(inputs)
        assert len(inputs) == len(self.in_channels)
        features = inputs[self.start_level:]
        first = 1 if self._composes_finest(features) else 0
        laterals = [None] * first + [
            self.lateral_convs[i](features[i])
            for i in range(first, len(self.lateral_convs))
        ]
        for i in range(len(laterals) - 1, first, -1):
            laterals[i - 1] = self._top_down(laterals[i - 1], laterals[i],
                                             inputs)
        outs = [conv_module_forward(self.fpn_convs[i], laterals[i])
                for i in range(first, len(laterals))]
        if first:
            finest = FinestLevel(self.fpn_convs[0].conv,
                                 self.lateral_convs[0].conv, features[0],
                                 laterals[1])
            outs.insert(0, finest if defer_finest else finest.compute())
        return tuple(outs)

    def _composes_finest(self, features) -> bool:
        """Whether :func:`composed_finest_output` computes the finest
        output: FPN's default nearest upsampling onto a lateral exactly
        twice the size of the coarser one, a bare 1x1 lateral and a bare 3x3
        output convolution (no norm, no activation), fewer multiply-adds
        (``8 Cin < 5 C``), and Winograd not preferred for that convolution
        (:func:`~poolformer_seg.models.winograd.winograd_preferred`)."""
        if not COMPOSE_FINEST or len(features) < 2 or \
                self.upsample_cfg != dict(mode='nearest'):
            return False
        lateral = _bare_conv(self.lateral_convs[0], 1)
        output = _bare_conv(self.fpn_convs[0], 3)
        fine, coarse = features[0], features[1]
        return (lateral is not None and output is not None
                and 8 * lateral.in_channels < 5 * output.in_channels
                and fine.dim() == coarse.dim() == 4
                and fine.shape[2:] == tuple(2 * s for s in coarse.shape[2:])
                and not winograd_preferred(output, fine))

    def _top_down(self, fine, coarse, inputs):
        """``fine`` plus ``coarse`` upsampled to its size, as ``FPN``."""
        in_place = self.upsample_cfg == dict(mode='nearest') and \
            fine.shape[2:] == tuple(2 * s for s in coarse.shape[2:]) and \
            fine.dtype == coarse.dtype and \
            not (torch.is_grad_enabled() and fine.requires_grad) and \
            not any(_shares_memory(fine, x) for x in inputs)
        if in_place:
            return add_nearest_2x_(fine, coarse)
        if 'scale_factor' in self.upsample_cfg:
            return fine + resize(coarse, **self.upsample_cfg)
        return fine + resize(coarse, size=fine.shape[2:], **self.upsample_cfg)
