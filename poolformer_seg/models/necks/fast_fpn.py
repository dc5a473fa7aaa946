"""Semantic FPN's neck with an in-place top-down path and a cheaper finest
level; same results."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmseg.models.necks import FPN
from mmseg.models.utils import resize
from mmseg.registry import MODELS

from ..utils import autocast_off
from ..winograd import conv_module_forward, winograd_applies

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
    """Along the last axis, the 4 taps of a transposed convolution (stride
    2, padding 1) equal to the 3 taps ``weight`` applied to a nearest 2x
    upsampled signal.

    Output ``2i - 1 .. 2i + 2`` of the transposed convolution receives
    input ``i`` through taps ``0 .. 3``. In the 3-tap convolution of the
    upsampled signal ``u`` (``u[2i] = u[2i + 1] = x[i]``), output ``2i - 1``
    reads ``x[i]`` through ``weight[2]``, ``2i`` through ``weight[1]`` and
    ``weight[2]``, ``2i + 1`` through ``weight[0]`` and ``weight[1]``, and
    ``2i + 2`` through ``weight[0]``. Zero padding agrees at the borders:
    outside the image both read nothing."""
    w0, w1, w2 = weight.unbind(-1)
    return torch.stack((w2, w1 + w2, w0 + w1, w0), -1)


def upsampled_conv3x3_kernel(weight):
    """``Cin x Cout x 4 x 4`` kernel ``k`` with ``conv_transpose2d(x, k,
    stride=2, padding=1) == conv2d(nearest_2x(x), weight, padding=1)`` for
    a ``Cout x Cin x 3 x 3`` ``weight`` (no bias): 4 instead of 9
    multiply-adds per output pixel and channel pair, and no upsampled copy.
    """
    taps = _phase_taps(_phase_taps(weight).transpose(2, 3)).transpose(2, 3)
    return taps.transpose(0, 1)


def composed_finest_output(fpn_conv: nn.Conv2d, lateral_conv: nn.Conv2d,
                           feature, coarse_lateral):
    """``fpn_conv(lateral_conv(feature) + nearest_2x(coarse_lateral))``,
    FPN's finest output, by linearity as two cheaper convolutions:

    * ``fpn_conv`` composed with the 1x1 ``lateral_conv``: one 3x3
      convolution of ``feature``'s ``Cin`` channels instead of the ``C``
      lateral ones;
    * ``fpn_conv`` of the upsampled coarser lateral as a transposed
      convolution of the coarse map (:func:`upsampled_conv3x3_kernel`),
      into which the lateral bias goes (a constant is its own nearest
      upsampling, and zero padding is the same for both).

    ``(9 Cin + 4 C) C`` instead of ``(Cin + 9 C) C`` multiply-adds per
    pixel. Exact in arithmetic; in floating point the products are summed
    in another order (float64: equal to 1e-12, tests).
    """
    # the weights in the input's layout: a convolution follows its weight's
    fmt = torch.channels_last if not feature.is_contiguous() and \
        feature.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    with autocast_off(feature.device):  # composed in the weights' dtype
        composed = (fpn_conv.weight.permute(0, 2, 3, 1)
                    @ lateral_conv.weight.flatten(1)).permute(0, 3, 1, 2)
        composed = composed.contiguous(memory_format=fmt)
        kernel = upsampled_conv3x3_kernel(fpn_conv.weight).contiguous(
            memory_format=fmt)
    out = F.conv2d(feature, composed, fpn_conv.bias, padding=1)
    if lateral_conv.bias is not None:
        coarse_lateral = coarse_lateral + lateral_conv.bias.view(-1, 1, 1)
    upsampled = F.conv_transpose2d(coarse_lateral, kernel, stride=2,
                                   padding=1)
    if torch.is_grad_enabled():
        return out + upsampled
    return out.add_(upsampled)


def _bare_conv(module, kernel_size: int):
    """The ``nn.Conv2d`` of a ConvModule that is only a convolution with a
    ``kernel_size`` square kernel, stride 1, 'same' zero padding, no
    dilation and no groups; else None."""
    if not isinstance(module, ConvModule) or module.with_norm or \
            module.with_activation or module.with_explicit_padding:
        return None
    conv = module.conv
    if type(conv) is not nn.Conv2d or conv.padding_mode != 'zeros' or \
            conv.kernel_size != (kernel_size, kernel_size) or \
            conv.stride != (1, 1) or conv.dilation != (1, 1) or \
            conv.groups != 1 or conv.padding != (kernel_size // 2,) * 2:
        return None
    return conv


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

    def forward(self, inputs):
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
            outs.insert(0, composed_finest_output(
                self.fpn_convs[0].conv, self.lateral_convs[0].conv,
                features[0], laterals[1]))
        return tuple(outs)

    def _composes_finest(self, features) -> bool:
        """Whether :func:`composed_finest_output` computes the finest
        output: FPN's default nearest upsampling onto a lateral exactly
        twice the size of the coarser one, a bare 1x1 lateral and a bare 3x3
        output convolution (no norm, no activation), fewer multiply-adds
        (``8 Cin < 5 C``), and no Winograd for that convolution (the
        instruction sets where Winograd is chosen have it cheaper still)."""
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
                and not winograd_applies(output, fine))

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
