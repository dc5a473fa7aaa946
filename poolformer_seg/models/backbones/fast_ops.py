"""Fused PoolFormer block operations; the math is the plain block's.

Shapes are ``B x C x H x W`` in either memory format; channels_last is the
fast one on CPU (3x3 average pooling is several times faster in NHWC, and a
1x1 convolution is then a plain matrix product over the ``B*H*W x C`` rows).

Token mixer. With ``n = GN(x) = g * (x - mu) * r + beta`` (one group: ``mu``
and ``r = 1 / sqrt(var + eps)`` per sample, ``g``/``beta`` per channel) and
``P`` the 3x3 average that excludes padding, ``P`` is linear and returns a
constant unchanged, so ``P(n) - n = g * r * (P(x) - x)``: the mean and
``beta`` cancel. The first half of a block is therefore::

    x + ls1 * (P(n) - n)  ==  x + c * (P(x) - x),   c = ls1 * g * r

a single ``lerp(x, P(x), c)`` after one statistics pass, instead of
normalising, pooling, subtracting, scaling and adding. Its backward
(:class:`_PoolMix`) keeps only ``x`` and recomputes ``P(x)``.

MLP. The GroupNorm affine is folded into ``fc1`` and the layer scale into
``fc2`` (``W1 (g * n + beta) + b1 = (W1 g) n + (W1 beta + b1)`` and
``ls2 * (W2 a + b2) = (ls2 W2) a + ls2 b2``), so the MLP half is
``x + fc2'(gelu(fc1'(n0)))`` with ``n0`` the affine-free GroupNorm.

GroupNorm(1) statistics do not depend on the order of the elements, so on a
channels_last tensor they are taken over its ``B x (H*W*C)`` storage, where
the native kernels are fast (PyTorch's channels_last GroupNorm on CPU is
about 10x slower than on NCHW).

Under autocast the residual stream stays in the parameters' dtype (fp32): the
layer-scaled updates are small next to ``x`` and would be lost if it were
rounded to bf16/fp16. Statistics are always computed in fp32; the matrix
products run in the autocast dtype.
"""
import torch
import torch.nn.functional as F

__all__ = ['group_norm1', 'pool_mix', 'fused_mlp']


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``B x (C*H*W)`` in memory order (a view when possible)."""
    if x.is_contiguous(memory_format=torch.channels_last) and \
            not x.is_contiguous():
        x = x.permute(0, 2, 3, 1)
    return x.reshape(x.shape[0], -1)


def _stats(x: torch.Tensor, eps: float):
    """Per-sample mean and ``1/sqrt(var + eps)`` in fp32, shape ``B``."""
    rows = _rows(x)
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.float()  # low-precision stats would round ``r``
    with torch.autocast(x.device.type, enabled=False):
        _, mean, rstd = torch.native_layer_norm(rows, rows.shape[1:], None,
                                                None, eps)
    return mean.view(-1), rstd.view(-1)


def group_norm1(x, weight, bias, eps):
    """``F.group_norm(x, 1, weight, bias, eps)``, fast in both layouts.

    The output has the memory format of ``x``.
    """
    if not x.is_contiguous(memory_format=torch.channels_last) or \
            x.is_contiguous():
        return F.group_norm(x, 1, weight, bias, eps)
    nhwc = x.permute(0, 2, 3, 1)
    out = F.layer_norm(nhwc, nhwc.shape[1:], None, None, eps)
    if weight is not None:
        out = torch.addcmul(bias.to(out.dtype), out, weight.to(out.dtype))
    return out.permute(0, 3, 1, 2)


def _pool(x, pool_size):
    return F.avg_pool2d(x, pool_size, 1, pool_size // 2,
                        count_include_pad=False)


class _PoolMix(torch.autograd.Function):
    """``x + coef * r * (P(x) - x)``; see the module docstring.

    ``coef`` is ``B x C`` (``ls1 * g``, times a drop-path factor per
    sample); ``beta`` (the norm bias) does not change the result, so its
    gradient is exactly zero. It is an input so that the parameter takes
    part in the graph, as DistributedDataParallel expects.
    """

    @staticmethod
    def forward(ctx, x, coef, beta, pool_size, eps):
        mean, rstd = _stats(x, eps)
        c = coef * rstd[:, None]
        out = torch.lerp(x, _pool(x, pool_size), c[..., None, None].to(x.dtype))
        ctx.save_for_backward(x, coef, beta, mean, rstd)
        ctx.pool_size = pool_size
        return out

    @staticmethod
    def backward(ctx, grad):
        x, coef, beta, mean, rstd = ctx.saved_tensors
        k = ctx.pool_size
        c = (coef * rstd[:, None])[..., None, None].to(x.dtype)
        diff = _pool(x, k).sub_(x)  # P(x) - x, recomputed
        # dL/d(coef * r) per sample and channel
        s = diff.mul_(grad).sum(dim=(2, 3),
                                dtype=torch.promote_types(x.dtype,
                                                          torch.float32))
        grad_coef = s * rstd[:, None] if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            gc = grad * c
            grad_x = torch.ops.aten.avg_pool2d_backward(
                gc, x, [k, k], [1, 1], [k // 2, k // 2], False, False, None)
            grad_x.add_(grad).sub_(gc)
            # through r = (var + eps)^-1/2: dr/dx = -r^3 (x - mu) / N
            n = x[0].numel()
            a = (s * coef).sum(1) * rstd.pow(3) * (-1. / n)
            grad_x.add_((x - mean.view(-1, 1, 1, 1).to(x.dtype)) *
                        a.view(-1, 1, 1, 1).to(x.dtype))
        grad_beta = torch.zeros_like(beta) if ctx.needs_input_grad[2] \
            else None
        return grad_x, grad_coef, grad_beta, None, None


def pool_mix(x, coef, beta, pool_size: int, eps: float):
    """The token-mixer half of a block: ``x + ls1 * (P(GN(x)) - GN(x))``.

    Args:
        x: ``B x C x H x W``, cast to ``coef``'s dtype (the residual dtype).
        coef: ``B x C`` product ``ls1 * g`` (times drop-path factors).
        beta: the GroupNorm bias (no effect on the value; see
            :class:`_PoolMix`).
    """
    return _PoolMix.apply(x.to(coef.dtype), coef, beta, pool_size, eps)


def fused_mlp(x, norm, fc1, fc2, layer_scale):
    """``layer_scale * fc2(gelu(fc1(GN(x))))`` with folded affines.

    ``norm`` is a GroupNorm(1); ``fc1``/``fc2`` 1x1 convolutions. The result
    is channels_last when ``x`` is; it is the branch only (no residual).
    """
    nhwc = x.permute(0, 2, 3, 1)
    n0 = F.layer_norm(nhwc, nhwc.shape[1:], None, None, norm.eps)
    w1 = fc1.weight.flatten(1)
    h = F.linear(n0, w1 * norm.weight, torch.addmv(fc1.bias, w1, norm.bias))
    w2 = fc2.weight.flatten(1) * layer_scale[:, None]
    y = F.linear(F.gelu(h), w2, fc2.bias * layer_scale)
    return y.permute(0, 3, 1, 2)
