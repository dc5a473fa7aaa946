"""The bilinear resize of a head's class scores to the input size: the last
step of mmseg's ``encode_decode`` (whole and slide inference).

A head's logits are at stride 4 of an input padded to a multiple of 32, so
the resize multiplies each side by a whole number, and along each axis
output ``s k + r`` lies between the same two input neighbours at the same
weight for every ``k``. On the CPU :func:`resize_scores` computes it as two
one-dimensional passes (width, then height), each ``s`` calls of
``torch.lerp`` over strided views, a group of channels at a time; PyTorch's
bilinear kernel, in either memory format and in fp32 and bf16, took
1.2-1.3x as long for S12's ``150 x 128 x 128`` scores to ``512 x 512`` and
to ``1024 x 1024`` (docs/benchmark.md, fourteenth session).
"""
import torch
from mmseg.models.utils import resize

__all__ = ['resize_scores', 'input_size']

SEPARABLE_ON_CPU = True
"""Whether CPU scores resized by whole-number factors take the separable
passes rather than ``F.interpolate`` (the switch of ``tools/benchmark.py
--ablations``' row ``ours-no-separable-resize``)."""

GROUP_CHANNELS = 8
"""Channels resized together. The height pass reads its group's width pass
``2 s`` times, which stays in cache for a group and not for all channels
(S12's 150 to 512x512: 46 against 67 ms in fp32, 35 against 102 ms in
bf16; to 1024x1024: 198 against 270 and 146 against 384 ms); groups of 4
to 16 channels measured within 15% of each other."""


def input_size(meta: dict):
    """The size that mmseg's ``predict_by_feat`` resizes to: a crop's
    ``img_shape`` in slide inference, else the padded input's."""
    if isinstance(meta['img_shape'], torch.Size):
        return meta['img_shape']
    if 'pad_shape' in meta:
        return meta['pad_shape'][:2]
    return meta['img_shape']


def _whole_factors(in_size, out_size):
    """``(s_h, s_w)`` where ``out_size`` is a whole multiple of ``in_size``
    along both axes, else None."""
    factors = tuple(out // size if size and out % size == 0 else 0
                    for size, out in zip(in_size, out_size))
    return factors if all(factors) else None


def resize_scores(scores: torch.Tensor, size, align_corners: bool,
                  dtype=None) -> torch.Tensor:
    """mmseg's ``resize(scores, size, mode='bilinear', align_corners)`` in
    ``dtype`` (``scores.dtype`` where None).

    ``scores``: ``B x K x h x w``, any memory format. On the CPU, without
    ``align_corners``, for whole-number factors and without a gradient to
    record: :func:`_separable_upsample`, an NCHW result equal to PyTorch's
    to a rounding (float64: 1e-15). It computes in at least fp32, so a
    reduced-precision ``dtype`` rounds once, at the end (mmseg's route
    under autocast rounds the logits, then the resize). Otherwise
    ``F.interpolate`` of ``scores.to(dtype)``, through mmseg's ``resize``.
    """
    dtype = dtype or scores.dtype
    factors = _whole_factors(scores.shape[2:], size)
    records_gradient = torch.is_grad_enabled() and scores.requires_grad
    if (SEPARABLE_ON_CPU and factors and scores.device.type == 'cpu'
            and not align_corners and not records_gradient):
        return _separable_upsample(scores, factors, dtype)
    return resize(scores.to(dtype), size=size, mode='bilinear',
                  align_corners=align_corners)


def _separable_upsample(x, factors, dtype):
    """``x`` upsampled bilinearly (``align_corners=False``) by whole
    ``factors`` ``(s_h, s_w)``, into ``dtype``: per group of
    :data:`GROUP_CHANNELS` channels, the width pass into rows (at least
    fp32) with one replicated row above and below, then the height pass
    into the result."""
    (s_h, s_w), (n, c, h, w) = factors, x.shape
    x = x.contiguous()
    out = x.new_empty((n, c, s_h * h, s_w * w), dtype=dtype)
    between = torch.promote_types(x.dtype, torch.float32)
    for first in range(0, c, GROUP_CHANNELS):
        group = slice(first, min(first + GROUP_CHANNELS, c))
        part = x[:, group]
        rows = x.new_empty((n, part.shape[1], h + 2, s_w * w),
                           dtype=between)
        _upsample_axis_(_edge_padded(part, 3), 3, s_w, rows[:, :, 1:-1])
        rows[:, :, 0] = rows[:, :, 1]
        rows[:, :, -1] = rows[:, :, -2]
        _upsample_axis_(rows, 2, s_h, out[:, group])
    return out


def _edge_padded(x, dim):
    """``x`` with its first and last element along ``dim`` repeated
    outside: PyTorch clamps the source positions at the border."""
    last = x.shape[dim] - 1
    return torch.cat([x.narrow(dim, 0, 1), x, x.narrow(dim, last, 1)], dim)


def _upsample_axis_(padded, dim: int, factor: int, out):
    """Write into ``out`` the upsampling by ``factor`` along ``dim`` of
    the ``n`` inner elements of ``padded`` (edge-padded by one).

    Output ``factor * k + r`` lies at source ``k + o_r``, ``o_r = (2 r + 1 -
    factor) / (2 factor)``: between inputs ``k - 1`` and ``k`` at weight
    ``1 + o_r`` on ``k`` where ``o_r < 0``, else between ``k`` and ``k + 1``
    at weight ``o_r``; one ``lerp`` per phase ``r``, into every
    ``factor``-th output."""
    n = padded.shape[dim] - 2
    phases = out.unflatten(dim, (n, factor))
    for phase in range(factor):
        offset = (2 * phase + 1 - factor) / (2 * factor)
        start = 0 if offset < 0 else 1  # padded index of the lower input
        torch.lerp(padded.narrow(dim, start, n),
                   padded.narrow(dim, start + 1, n), offset + 1 - start,
                   out=phases.select(dim + 1, phase))
