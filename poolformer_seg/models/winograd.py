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

The identity is exact; in floating point the transforms add rounding, so
the fp32 results differ from a direct convolution by a few ulps more than
two direct algorithms differ from each other (tests: within 1e-4 of
float64, and equal to 1e-10 when run in float64).

It is used where it is faster than PyTorch's own CPU kernel (oneDNN's
direct convolution on CPUs without Winograd support): inference (no
gradient), on CPU, in fp32/fp64 without autocast, channels_last inputs of
at least :data:`MIN_PIXELS` pixels (below that the transforms cost more
than the products they save). ``tools/benchmark.py`` has rows with it off.
GPU libraries choose Winograd themselves where it pays, so CUDA tensors go
to ``F.conv2d``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule

from ..compat import autocast_dtype

__all__ = ['winograd_conv3x3', 'winograd_applies', 'conv_module_forward']

# The transform matrices for the interpolation points 0, 1, -1, 2, -2 and
# infinity (the standard choice; its fp32 error is the smallest of the
# small-integer sets).
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
"""Smallest ``H * W`` at which the transform overhead is repaid (measured:
1.6-1.8x faster than oneDNN at 64x64 and 128x128 maps with 128-256
channels, on par at 37x37)."""


def _matrix(rows, like):
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def _transform_weight(weight):
    """``K x C x 3 x 3`` -> ``36 x C x K``: ``G g G^T`` per channel pair."""
    g = _matrix(_G, weight)
    u = torch.einsum('pa,kcab,qb->pqck', g, weight, g)
    return u.reshape(36, weight.shape[1], weight.shape[0])


def winograd_conv3x3(x, weight, bias=None):
    """``F.conv2d(x, weight, bias, padding=1)`` for a ``B x C x H x W``
    ``x`` and a ``K x C x 3 x 3`` ``weight``; any ``H``, ``W`` >= 1.

    Returns a ``B x K x H x W`` tensor in channels_last memory format, in
    ``x``'s dtype and on its device.
    """
    batch, channels, height, width = x.shape
    tiles_h, tiles_w = -(-height // TILE), -(-width // TILE)
    rows = x.permute(0, 2, 3, 1)  # B x H x W x C (a view if channels_last)
    # zero padding: 1 as the convolution's, plus whatever completes the
    # last tile (those outputs are cropped below)
    padded = F.pad(rows, (0, 0, 1, TILE * tiles_w + 1 - width,
                          1, TILE * tiles_h + 1 - height))
    # 6 x 6 tiles with stride 4: B x th x tw x C x 6 x 6, gathered as
    # 6 x 6 x (B th tw C) so that the transforms are matrix products
    tiles = padded.unfold(1, 6, TILE).unfold(2, 6, TILE)
    d = tiles.permute(4, 5, 0, 1, 2, 3).reshape(6, 6, -1)
    bt = _matrix(_BT, x)
    v = torch.matmul(bt, (bt @ d.view(6, -1)).view(6, 6, -1))
    m = torch.bmm(v.view(36, -1, channels), _transform_weight(weight))
    at = _matrix(_AT, x)
    y = torch.matmul(at, (at @ m.view(6, -1)).view(4, 6, -1))
    y = y.view(TILE, TILE, batch, tiles_h, tiles_w, -1)
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(batch, TILE * tiles_h,
                                            TILE * tiles_w, -1)
    y = y[:, :height, :width]
    y = y + bias if bias is not None else y.contiguous()
    return y.permute(0, 3, 1, 2)


def winograd_applies(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`conv_module_forward` runs ``conv`` on ``x`` by
    Winograd (see the module docstring for the conditions)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3)
            and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == 'zeros'
            and x.device.type == 'cpu'
            and x.dtype in (torch.float32, torch.float64)
            and conv.weight.dtype == x.dtype
            and autocast_dtype('cpu') is None
            and not (torch.is_grad_enabled() and (
                x.requires_grad or conv.weight.requires_grad))
            and x.dim() == 4 and x.shape[2] * x.shape[3] >= MIN_PIXELS
            and x.is_contiguous(memory_format=torch.channels_last))


def _eval_batch_norm(module: ConvModule):
    """The ConvModule's norm if it is a BatchNorm in eval mode (foldable
    into the convolution), None if it has no norm; False otherwise."""
    if not module.with_norm:
        return None
    norm = module.norm
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and \
            not norm.training and norm.track_running_stats:
        return norm
    return False


def _folded(conv: nn.Conv2d, norm):
    """Weight and bias of ``norm(conv(x))`` as one convolution."""
    weight, bias = conv.weight, conv.bias
    if norm is None:
        return weight, bias
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    shift = norm.bias - norm.running_mean * scale
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.view(-1, 1, 1, 1), shift


def conv_module_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a ConvModule (conv, norm, act) or a Conv2d.

    An eval-mode BatchNorm is folded into the convolution (one pass over
    the output instead of two), and the convolution runs by Winograd where
    :func:`winograd_applies`. Anything else (a norm in training mode,
    another order, explicit padding) runs as the module's own forward.
    """
    if isinstance(module, nn.Conv2d):
        if winograd_applies(module, x):
            return winograd_conv3x3(x, module.weight, module.bias)
        return module(x)
    if not isinstance(module, ConvModule) or \
            module.order != ('conv', 'norm', 'act') or \
            module.with_explicit_padding:
        return module(x)
    norm = _eval_batch_norm(module)
    if norm is False:
        return module(x)
    conv = module.conv
    weight, bias = _folded(conv, norm)
    if winograd_applies(conv, x):
        y = winograd_conv3x3(x, weight, bias)
    else:
        y = F.conv2d(x, weight, bias, conv.stride, conv.padding,
                     conv.dilation, conv.groups)
    return module.activate(y) if module.with_activation else y
