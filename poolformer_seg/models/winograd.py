"""3x3 convolutions of the FPN neck and head by Winograd's F(4x4, 3x3).

A 3x3 convolution (stride 1, padding 1) computes each 4x4 block of
outputs from a 6x6 block of inputs. Winograd's minimal filtering
(Lavin and Gray, 2016) maps both to a 6x6 transform domain where the
convolution becomes 36 independent ``C -> K`` matrix products, one per
transform coordinate: 36 multiplications per 16 outputs instead of
``16 * 9 = 144``. The transforms are fixed small matrices, applied as
matrix products over all tiles at once::

    V = B^T d B         (input tiles,   6 x 6 per tile and channel)
    U = G g G^T         (weights,       6 x 6 per output and input channel)
    M[p] = V[p] @ U[p]  (p = 0..35, a batched matrix product over tiles)
    y = A^T M A         (output tiles,  4 x 4 per tile and channel)

``V`` and ``M`` are 2.25x the size of the input and output maps, so they
are computed for one band of tile rows at a time (:data:`BAND_BYTES`).

The identity is exact; in floating point the transforms add rounding, so
the fp32 results differ from a direct convolution by a few ulps more than
two direct algorithms differ from each other (tests: within 1e-4 of
float64, and equal to 1e-10 when run in float64).

It is used where it was measured faster than PyTorch's own CPU kernel,
oneDNN's direct convolution: on CPUs whose instruction set is one of
:data:`FASTER_ON` (see there), in fp32/fp64 without autocast,
channels_last inputs of at least :data:`MIN_PIXELS` pixels (below that
the transforms cost more than the products they save), at inference and
in training (:class:`_Conv3x3`'s backward is Winograd too).
``tools/benchmark.py --ablations`` has a row with the decision flipped.
GPU libraries choose Winograd themselves where it pays, so CUDA tensors go
to ``F.conv2d``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule

from ..compat import autocast_dtype

__all__ = ['winograd_conv3x3', 'winograd_weight', 'winograd_applies',
           'winograd_runs_on', 'winograd_preferred', 'conv_module_forward']

# The transform matrices for the interpolation points 0, 1, -1, 2, -2 and
# infinity (the standard choice).
_BT = ((4, 0, -5, 0, 1, 0),
       (0, -4, -4, 1, 1, 0),
       (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0),
       (0, 2, -1, -2, 1, 0),
       (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0),
      (-1 / 6, -1 / 6, -1 / 6),
      (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6),
      (1 / 24, -1 / 12, 1 / 6),
      (0, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0),
       (0, 1, -1, 2, -2, 0),
       (0, 1, 1, 4, 4, 0),
       (0, 1, -1, 8, -8, 1))
TILE = 4  # outputs per tile side

MIN_PIXELS = 64 * 64
"""Smallest ``H * W`` at which the transform overhead is repaid (measured
with AVX2: 1.6-1.8x faster than oneDNN at 64x64 and 128x128 maps with
128-256 channels, on par at 37x37)."""

FASTER_ON = ('AVX2', 'AVX512')
"""The CPU capabilities (``torch.backends.cpu.get_cpu_capability()``) on
which Winograd beats oneDNN's direct convolution. Measured on 2 cores,
fp32, forward and backward: with AVX2, 1.6-1.8x at 3x3 convolutions of
128-256 channels at 64x64-128x128; with AVX-512 (AMD EPYC), 1.3-2.1x at
64x64 and 128x128 (256 -> 256 at 128x128, batch 2: 308 against 618 ms),
level at 32x32. Other instruction sets are unmeasured and keep oneDNN."""

BEFORE_COMPOSITIONS_ON = ('AVX2',)
"""The capabilities on which Winograd is also preferred to FastFPN's
compositions of the finest level (:func:`winograd_preferred`), which then
run as the plain convolutions they replace, by Winograd. With AVX-512 the
compositions, run by Winograd in turn, are faster: with them off (the
benchmark's row ``ours-no-compose``) an S12 training step took 2,033
against 1,905 ms."""

ON_THIS_CPU = torch.backends.cpu.get_cpu_capability() in FASTER_ON
"""Whether this process's CPU is one of :data:`FASTER_ON`."""

BEFORE_COMPOSITIONS = \
    torch.backends.cpu.get_cpu_capability() in BEFORE_COMPOSITIONS_ON
"""Whether this process's CPU is one of :data:`BEFORE_COMPOSITIONS_ON`."""


def _matrix(rows, like):
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def _kron_g(like):
    """``G (x) G``, ``36 x 9``: row ``6p + q``, column ``3a + b`` holds
    ``G[p, a] G[q, b]``, so that ``G g G^T`` of a 3x3 ``g`` flattened is
    this matrix times ``g`` flattened."""
    g = _matrix(_G, like)
    return torch.kron(g, g)


def _transform_weight(weight):
    """``K x C x 3 x 3`` -> ``36 x C x K``: ``G g G^T`` per channel pair,
    as one matrix product over all pairs. The result is the transpose of a
    contiguous ``36 x K x C`` tensor: the product reads the weight's
    memory as it lies, and the batched products that use it take either
    layout."""
    k, c = weight.shape[:2]
    taps = weight.reshape(k * c, 9).t()
    return (_kron_g(weight) @ taps).view(36, k, c).transpose(1, 2)


def _transform_weight_grad(grad_u):
    """The adjoint of :func:`_transform_weight` for a ``36 x K x C``
    gradient (the transpose of its result's layout): ``K x C x 3 x 3``,
    ``G^T dU G`` per channel pair."""
    _, k, c = grad_u.shape
    taps = grad_u.reshape(36, k * c).t() @ _kron_g(grad_u)
    return taps.view(k, c, 3, 3)


def _tile_counts(x):
    return -(-x.shape[2] // TILE), -(-x.shape[3] // TILE)


BAND_BYTES = 8 * 2**20
"""Largest transform-domain tensor (36 values per tile and channel) of one
band of tile rows. The transforms and products run band by band, so that
a convolution's temporaries stay bounded (a few such tensors) whatever the
size of the map. A training step holds several of them at its memory peak
(the head's backward), while the products of a band stay large enough
(hundreds of tiles) to run at full speed down to a few MB."""


def _bands(x, channels):
    """Slices of tile rows of ``x`` whose transformed tiles, for
    ``channels`` channels, take at most :data:`BAND_BYTES` each (or one
    tile row, where a row alone takes more)."""
    tiles_h, tiles_w = _tile_counts(x)
    row_bytes = 36 * x.shape[0] * tiles_w * channels * x.element_size()
    step = max(1, BAND_BYTES // row_bytes)
    return [slice(row, min(row + step, tiles_h))
            for row in range(0, tiles_h, step)]


def _transform_input(x, band):
    """``B x C x H x W`` -> ``36 x (B n tw) x C`` for the ``n`` tile rows of
    ``band``: ``B^T d B`` of each 6x6 input tile (stride 4, zero padding 1
    plus whatever completes the last tile; those outputs are cropped)."""
    batch, channels, height, width = x.shape
    _, tiles_w = _tile_counts(x)
    first, stop = TILE * band.start - 1, TILE * band.stop + 1  # input rows
    rows = x.permute(0, 2, 3, 1)  # B x H x W x C (a view if channels_last)
    padded = F.pad(rows[:, max(first, 0):min(stop, height)],
                   (0, 0, 1, TILE * tiles_w + 1 - width,
                    max(-first, 0), max(stop - height, 0)))
    tiles = padded.unfold(1, 6, TILE).unfold(2, 6, TILE)  # B n tw C 6 6
    d = tiles.permute(4, 5, 0, 1, 2, 3).reshape(6, 6, -1)
    del padded, tiles  # each temporary is freed as soon as it is used
    bt = _matrix(_BT, x)
    half = (bt @ d.view(6, -1)).view(6, 6, -1)
    del d
    return torch.matmul(bt, half).view(36, -1, channels)


def _transform_output(m, like, band):
    """``36 x (B n tw) x K`` -> ``B x 4n x 4tw x K``: ``A^T M A`` of every
    tile of ``band`` (for an input ``like``), the tiles put side by
    side."""
    batch, channels = like.shape[0], m.shape[-1]
    _, tiles_w = _tile_counts(like)
    tiles_h = band.stop - band.start
    at = _matrix(_AT, m)
    half = (at @ m.view(6, -1)).view(TILE, 6, -1)
    del m
    y = torch.matmul(at, half).view(TILE, TILE, batch, tiles_h, tiles_w,
                                    channels)
    del half
    return y.permute(2, 3, 0, 4, 1, 5).reshape(
        batch, TILE * tiles_h, TILE * tiles_w, channels)


def _transform_output_grad(grad, like, band):
    """The adjoint of :func:`_transform_output`: the output rows of
    ``band`` of ``grad`` (``B x K x H x W``) -> ``36 x (B n tw) x K``,
    ``A g A^T`` of every (zero-completed) 4x4 tile."""
    batch, _, height, width = like.shape
    _, tiles_w = _tile_counts(like)
    start, stop = TILE * band.start, min(TILE * band.stop, height)
    rows = F.pad(grad.permute(0, 2, 3, 1)[:, start:stop],
                 (0, 0, 0, TILE * tiles_w - width,
                  0, TILE * (band.stop - band.start) - (stop - start)))
    g = rows.reshape(batch, -1, TILE, tiles_w, TILE, grad.shape[1])
    g = g.permute(2, 4, 0, 1, 3, 5).reshape(TILE, TILE, -1)
    a = _matrix(_AT, grad).t()
    m = torch.matmul(a, (a @ g.view(TILE, -1)).view(6, TILE, -1))
    return m.view(36, -1, grad.shape[1])


def _forward(x, weight, bias, transformed=None):
    """The convolution, band by band, into a ``B x K x H x W``
    channels_last tensor; ``transformed`` the weight's
    :func:`_transform_weight` where the caller has it."""
    u = _transform_weight(weight) if transformed is None else transformed
    batch, channels, height, width = x.shape
    out = torch.empty(batch, u.shape[2], height, width, dtype=x.dtype,
                      device=x.device, memory_format=torch.channels_last)
    rows_out = out.permute(0, 2, 3, 1)  # B x H x W x K, the same memory
    for band in _bands(x, max(channels, u.shape[2])):
        y = _transform_output(torch.bmm(_transform_input(x, band), u), x,
                              band)
        rows = slice(TILE * band.start, min(TILE * band.stop, height))
        y = y[:, :rows.stop - rows.start, :width]
        if bias is None:
            rows_out[:, rows] = y
        else:
            torch.add(y, bias, out=rows_out[:, rows])
    return out


class _Conv3x3(torch.autograd.Function):
    """Winograd convolution with a backward that keeps only ``x`` and the
    weight, as PyTorch's convolution does: the input transform is redone
    (it costs a fraction of the products). The weight gradient is taken in
    the transform domain (``dU = V^T dM``, 36 products 4x smaller than the
    direct ones), the input gradient is the convolution of the output
    gradient with the flipped, transposed kernel, by Winograd again."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _forward(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _forward(grad, weight.flip(2, 3).transpose(0, 1), None)
        if ctx.needs_input_grad[1]:
            grad_u = x.new_zeros(36, weight.shape[0], x.shape[1])
            for band in _bands(x, max(x.shape[1], weight.shape[0])):
                grad_u.baddbmm_(
                    _transform_output_grad(grad, x, band).transpose(1, 2),
                    _transform_input(x, band))
            grad_w = _transform_weight_grad(grad_u)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


def winograd_conv3x3(x, weight, bias=None, transformed=None):
    """``F.conv2d(x, weight, bias, padding=1)`` for a ``B x C x H x W``
    ``x`` and a ``K x C x 3 x 3`` ``weight``; any ``H``, ``W`` >= 1;
    differentiable.

    ``transformed``: the weight's :func:`winograd_weight`, for a caller that
    keeps it between inference calls (4x the weight's size, and a pass over
    fresh memory to make); used where no gradient is recorded.

    Returns a ``B x K x H x W`` tensor in channels_last memory format, in
    ``x``'s dtype and on its device.
    """
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias)):
        return _Conv3x3.apply(x, weight, bias)
    return _forward(x, weight, bias, transformed)


def winograd_weight(weight):
    """The transform-domain weight (``36 x C x K``) with which
    :func:`winograd_conv3x3` convolves, for a ``K x C x 3 x 3``
    ``weight``."""
    return _transform_weight(weight)


def winograd_runs_on(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a 3x3 'same' convolution of ``x`` with ``weight`` runs by
    Winograd: on a CPU of :data:`FASTER_ON`, in fp32/fp64 without
    autocast, on a channels_last map of at least :data:`MIN_PIXELS`
    pixels."""
    return (x.device.type == 'cpu' and ON_THIS_CPU
            and x.dtype in (torch.float32, torch.float64)
            and weight.dtype == x.dtype
            and autocast_dtype('cpu') is None
            and x.dim() == 4 and x.shape[2] * x.shape[3] >= MIN_PIXELS
            and x.is_contiguous(memory_format=torch.channels_last))


def winograd_applies(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`conv_module_forward` runs ``conv`` on ``x`` by
    Winograd: a plain 3x3 'same' ``nn.Conv2d`` where
    :func:`winograd_runs_on`."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3)
            and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == 'zeros'
            and winograd_runs_on(x, conv.weight))


def winograd_preferred(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``conv`` runs on ``x`` by Winograd rather than composed
    with its neighbours (FastFPN's finest level): where
    :func:`winograd_applies` and :data:`BEFORE_COMPOSITIONS`."""
    return BEFORE_COMPOSITIONS and winograd_applies(conv, x)


def _foldable(norm) -> bool:
    """A BatchNorm in eval mode: an affine map, foldable into the conv."""
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and \
        not norm.training and norm.track_running_stats


def _folded(conv: nn.Conv2d, norm):
    """Weight and bias of ``norm(conv(x))`` as one convolution."""
    weight, bias = conv.weight, conv.bias
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    shift = norm.bias - norm.running_mean * scale
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.view(-1, 1, 1, 1), shift


def _conv(conv: nn.Conv2d, x, weight, bias):
    """``conv``'s convolution with the given weights, by Winograd where
    :func:`winograd_applies`."""
    if winograd_applies(conv, x):
        return winograd_conv3x3(x, weight, bias)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding,
                    conv.dilation, conv.groups)


def conv_and_weights(module: nn.Module):
    """``(conv, weight, bias, norm)`` of a ConvModule in the order conv,
    norm, act without explicit padding, or of an ``nn.Conv2d``: an eval-mode
    BatchNorm folded into ``weight`` and ``bias`` (``norm`` None), any other
    norm left to apply after the convolution. None for other modules."""
    if type(module) is nn.Conv2d:
        return module, module.weight, module.bias, None
    if not isinstance(module, ConvModule) or \
            module.order != ('conv', 'norm', 'act') or \
            module.with_explicit_padding or type(module.conv) is not nn.Conv2d:
        return None
    conv, norm = module.conv, module.norm if module.with_norm else None
    if norm is not None and _foldable(norm):
        return (conv, *_folded(conv, norm), None)
    return conv, conv.weight, conv.bias, norm


def finish_conv_module(module: nn.Module, y, norm):
    """What ``module`` applies after its convolution's output ``y``: the
    ``norm`` that :func:`conv_and_weights` left, then the activation."""
    if norm is not None:
        y = norm(y)
    if isinstance(module, ConvModule) and module.with_activation:
        y = module.activate(y)
    return y


def conv_module_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a ConvModule (conv, norm, act) or a Conv2d.

    An eval-mode BatchNorm is folded into the convolution (one pass over
    the output instead of two), and the convolution runs by Winograd where
    :func:`winograd_applies`, in training too. Other orders and explicit
    padding run as the module's own forward.
    """
    parts = conv_and_weights(module)
    if parts is None:
        return module(x)
    conv, weight, bias, norm = parts
    return finish_conv_module(module, _conv(conv, x, weight, bias), norm)
