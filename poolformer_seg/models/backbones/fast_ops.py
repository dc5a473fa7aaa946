"""Fused PoolFormer block; the math is the plain block's.

Shapes are ``B x C x H x W`` in either memory format; channels_last is the
fast one on CPU (3x3 average pooling is several times faster in NHWC, and a
1x1 convolution is then a plain matrix product over ``B*H*W`` rows of ``C``).

Token mixer. With ``n = GN(x) = g * (x - mu) * r + beta`` (one group: ``mu``
and ``r = 1 / sqrt(var + eps)`` per sample, ``g``/``beta`` per channel) and
``P`` the 3x3 average that excludes padding, ``P`` is linear and returns a
constant unchanged, so ``P(n) - n = g * r * (P(x) - x)``: the mean and
``beta`` cancel. The first half of a block is therefore::

    x1 = x + ls1 * (P(n) - n) = lerp(x, P(x), c),    c = ls1 * g * r

one pooling and one ``lerp`` after a statistics pass, instead of
normalising, pooling, subtracting, scaling and adding.

MLP. The GroupNorm affine is folded into ``fc1`` and the layer scale into
``fc2`` (``W1 (g * n0 + beta) + b1 = (W1 g) n0 + (W1 beta + b1)``, ``ls2 *
(W2 a + b2) = (ls2 W2) a + ls2 b2``), so the second half is ``x1 +
fc2'(gelu(fc1'(n0)))`` with ``n0`` the affine-free GroupNorm of ``x1``.

Backward (:class:`_Block`). Only the block input ``x`` and per-sample
statistics are kept; ``x1``, ``n0``, ``fc1'(n0)`` and the GELU are
recomputed (one extra matrix product, ``fc1``). Autograd on the plain block
keeps 14 activation-sized tensors (counting the 4x wide MLP ones four
times), the fused block 1.

Inference (no gradient needed): :func:`fused_block` runs the same forward
without the autograd function, so nothing is saved. The folded weights are
recomputed on every call: about 10 ms for S12 on one CPU thread (1% of a
512x512 forward). Keeping them (:func:`~poolformer_seg.models.utils.
derived_weights`) would still take two passes over every MLP weight per
call, to see that none changed behind the version count, against the
folding's three.

GroupNorm(1) statistics do not depend on the order of the elements, so they
are taken over the ``B x (C*H*W)`` storage of either layout with the native
layer-norm kernel (``torch.var_mean`` is about 8x slower on CPU).

Under autocast the residual stream stays in the parameters' dtype (fp32):
the layer-scaled updates are small next to ``x`` and would be lost if it
were rounded to bf16/fp16. Statistics are always computed in at least fp32;
the matrix products run in the autocast dtype (in bf16 on CPU, ``fc1``'s
bias and GELU run inside oneDNN's product, :func:`_linear`).
"""
import torch
import torch.nn.functional as F

from ...compat import (autocast_dtype, is_compiling, onednn_linear,
                       pool_excluding_padding,
                       pool_excluding_padding_backward)
from ..utils import autocast_off

__all__ = ['fused_block', 'runs_fused']

# Where the hand-written backward (:class:`_Block`) runs: the CPU, where it
# was measured and checked against autograd, and ``meta`` (shapes only). On
# a CUDA device (torch 2.11, an H200) its input gradients were 30-64% off:
# CUDA's channels_last avg-pool backward ignored the padding
# (pytorch/pytorch#188344), which the backward now avoids through
# :func:`compat.pool_excluding_padding_backward`. CUDA joins this list once
# ``tests/test_cuda.py::test_hand_written_backward_here`` passes on a GPU;
# until then a block that needs gradients there runs the plain formulas.
BACKWARD_DEVICES = ('cpu', 'meta')


HAND_WRITTEN_BACKWARD = True
"""Whether a block that needs gradients runs :class:`_Block` (on
:data:`BACKWARD_DEVICES`) rather than the plain formulas under autograd
(the switch of ``tools/benchmark.py --ablations``' training row
``ours-no-hand-backward``)."""


def runs_fused(x) -> bool:
    """Whether a fused block computes on ``x``: always without autograd,
    and with autograd on :data:`BACKWARD_DEVICES` (where
    :data:`HAND_WRITTEN_BACKWARD`)."""
    return not torch.is_grad_enabled() or (
        HAND_WRITTEN_BACKWARD and x.device.type in BACKWARD_DEVICES)


def _stats(x, eps):
    """Per-sample mean and ``1/sqrt(var + eps)``, shape ``B``."""
    rows = x.permute(0, 2, 3, 1) if x.is_contiguous(
        memory_format=torch.channels_last) else x
    rows = rows.reshape(x.shape[0], -1)
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.float()  # low-precision statistics would round ``r``
    _, mean, rstd = torch.native_layer_norm(rows, rows.shape[1:], None, None,
                                            eps)
    return mean.view(-1), rstd.view(-1)


def _per_sample(v, x):
    return v.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)


def _mixer_coef(x, coef, rstd1):
    """``c = coef * r``: per sample and channel, broadcastable to ``x``."""
    return _per_sample(rstd1, x) * coef.unsqueeze(-1).unsqueeze(-1).to(x.dtype)


def _mix(x, c, pool_size):
    """The token-mixer half, ``x1 = lerp(x, P(x), c)``, written into the
    pooling's buffer (compiled: a new tensor, as the compiler fuses the
    pooling and the blend anyway, and dynamo refuses ``out=`` in
    ``channels_last``)."""
    pooled = pool_excluding_padding(x, pool_size)
    if is_compiling():
        return torch.lerp(x, pooled, c)
    return torch.lerp(x, pooled, c, out=pooled)


def _compute_dtype(x):
    return autocast_dtype(x.device.type) or x.dtype


ONEDNN_LINEAR = True
"""Whether :func:`_linear` runs oneDNN's fused product on the CPU (the
switch of ``tools/benchmark.py --ablations``' row ``ours-no-onednn-linear``;
off, bf16 takes the same single rounding from an fp32 product)."""


def _linear(x, weight, bias, gelu=False):
    """``x @ weight.T + bias`` for ``N x C`` rows, then GELU if ``gelu``;
    ``bias`` in ``x``'s dtype or fp32.

    On the CPU, oneDNN adds the bias (in fp32, unrounded) and applies the
    GELU to the fp32 accumulator inside the matrix product (PyTorch's
    ``mkldnn._linear_pointwise``, the op inductor uses for this fusion):
    no separate passes over the 4x wide hidden rows, and in bf16 rounded
    once instead of twice. ``F.linear`` first writes the broadcast bias
    into its output and multiplies into it, which made S12's stage-1 ``fc1``
    (16,384 x 64 -> 256 rows) several times slower in fp32.
    """
    # under torch.compile the public ops below: inductor fuses them itself,
    # and its lowering of the oneDNN op needs weights frozen into the graph
    if x.device.type == 'cpu' and not is_compiling():
        out = onednn_linear(x, weight, bias, gelu) if ONEDNN_LINEAR else None
        if out is not None:
            return out
        if x.dtype == torch.bfloat16:
            # no bf16 oneDNN products on this CPU (and no speed to gain
            # from bf16 there): the same single rounding, from an fp32 one
            with autocast_off(x.device):
                out = F.linear(x.float(), weight.float(), bias.float())
            return (torch.ops.aten.gelu_(out) if gelu else out).to(x.dtype)
    out = F.linear(x, weight, bias.to(x.dtype))
    return torch.ops.aten.gelu_(out) if gelu else out


def _fold(p, dtype):
    """Folded MLP weights ``W1 = w1 g2``, ``B1 = b1 + w1 beta2``, ``W2 =
    ls2 w2``, ``B2 = ls2 b2``, cast to the compute dtype."""
    folded = (p['w1'] * p['g2'], torch.addmv(p['b1'], p['w1'], p['beta2']),
              p['w2'] * p['ls2'].unsqueeze(1), p['b2'] * p['ls2'])
    return [t.to(dtype) for t in folded]


_PARAMS = ('beta1', 'g2', 'beta2', 'w1', 'b1', 'w2', 'b2', 'ls2')


def _forward(x, coef, folded, keep, pool_size, eps1, eps2):
    """The block's output and ``(mean1, rstd1, mean2, rstd2)``; ``folded``
    as :func:`_fold` returns it. Autocast must be off."""
    fw1, fb1, fw2, fb2 = folded
    mean1, rstd1 = _stats(x, eps1)
    x1 = _mix(x, _mixer_coef(x, coef, rstd1), pool_size)
    rows = x1.permute(0, 2, 3, 1)
    n0, mean2, rstd2 = torch.native_layer_norm(rows, rows.shape[1:], None,
                                               None, eps2)
    hidden = _linear(n0.to(fw1.dtype).view(-1, fw1.shape[1]), fw1, fb1,
                     gelu=True)
    y = F.linear(hidden, fw2, fb2).view(rows.shape).permute(0, 3, 1, 2)
    if keep is not None:
        y = y * _per_sample(keep, y)
    return x1.add_(y), (mean1, rstd1, mean2, rstd2)


class _Block(torch.autograd.Function):
    """A whole block; see the module docstring.

    Inputs: ``x`` (residual dtype); ``coef`` ``B x C`` = ``ls1 * g1`` times
    the mixer's drop-path factor per sample; the parameters named in
    ``_PARAMS`` (``w1``/``w2`` as matrices); ``keep`` the MLP branch's
    drop-path factor per sample, or None. ``beta1`` (the norm1 bias) does
    not change the result: its gradient is exactly zero, and it is an input
    so that the parameter takes part in the graph, as
    DistributedDataParallel expects. The folding is redone in the backward,
    so no folded copy of the weights is kept.
    """

    @staticmethod
    def forward(ctx, x, coef, beta1, g2, beta2, w1, b1, w2, b2, ls2, keep,
                pool_size, eps1, eps2):
        params = dict(zip(_PARAMS, (beta1, g2, beta2, w1, b1, w2, b2, ls2)))
        dtype = _compute_dtype(x)
        with autocast_off(x.device):
            out, stats = _forward(x, coef, _fold(params, dtype), keep,
                                  pool_size, eps1, eps2)
        ctx.save_for_backward(x, coef, keep, *stats, *params.values())
        ctx.pool_size, ctx.dtype = pool_size, dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, coef, keep, mean1, rstd1, mean2, rstd2, *saved = ctx.saved_tensors
        p = dict(zip(_PARAMS, saved))
        k, dtype = ctx.pool_size, ctx.dtype
        pdt = p['w1'].dtype  # gradients of the parameters in their dtype
        with autocast_off(x.device):
            fw1, fb1, fw2, _ = _fold(p, dtype)
            # recompute the forward up to the GELU input
            c = _mixer_coef(x, coef, rstd1)
            diff = pool_excluding_padding(x, k)
            x1 = torch.lerp(x, diff, c)
            diff.sub_(x)  # P(x) - x
            rows = x1.permute(0, 2, 3, 1)
            n0 = ((rows - _per_sample(mean2, rows)) *
                  _per_sample(rstd2, rows)).to(dtype)
            del x1
            h = _linear(n0.reshape(-1, fw1.shape[1]), fw1, fb1)
            # MLP branch, with respect to the folded weights
            g = grad if keep is None else grad * _per_sample(keep, grad)
            g = g.permute(0, 2, 3, 1).to(dtype).reshape(-1, fw2.shape[0])
            h = h.view(g.shape[0], -1)
            gb2 = g.sum(0, dtype=pdt)
            # the 4x wide hidden rows are the step's largest tensors: the
            # GELU's gradient is formed in place of its input's, and the
            # GELU itself (for fc2's weight) in place of its input
            grad_h = g.mm(fw2)
            torch.ops.aten.gelu_backward.grad_input(grad_h, h,
                                                    grad_input=grad_h)
            gw2 = g.t().mm(torch.ops.aten.gelu_(h)).to(pdt)
            del h, g
            gw1 = grad_h.t().mm(n0.reshape(grad_h.shape[0], -1)).to(pdt)
            gb1 = grad_h.sum(0, dtype=pdt)
            grad_n0 = grad_h.mm(fw1).view(rows.shape).to(x.dtype)
            del grad_h, n0
            grad_x1 = torch.ops.aten.native_layer_norm_backward(
                grad_n0, rows, rows.shape[1:], mean2, rstd2, None, None,
                [True, False, False])[0].permute(0, 3, 1, 2)
            grad_x1 += grad  # residual
            # token mixer: x1 = x + c * (P(x) - x), c = coef * r
            acc = torch.promote_types(x.dtype, torch.float32)
            s = diff.mul_(grad_x1).sum(dim=(2, 3), dtype=acc)  # dL/dc
            gc = grad_x1 * c
            grad_x = pool_excluding_padding_backward(gc, x, k)
            grad_x.add_(grad_x1).sub_(gc)
            # through r = (var + eps)^-1/2: dr/dx = -r^3 (x - mu) / N
            a = (s * coef).sum(1) * rstd1.pow(3) / -x[0].numel()
            grad_x.addcmul_(x - _per_sample(mean1, x), _per_sample(a, x))
        # unfold: chain rule through W1, B1, W2, B2
        grads = dict(
            beta1=torch.zeros_like(p['beta1']),
            g2=(gw1 * p['w1']).sum(0), beta2=p['w1'].t().mv(gb1),
            w1=torch.addr(gw1 * p['g2'], gb1, p['beta2']), b1=gb1,
            w2=gw2 * p['ls2'].unsqueeze(1), b2=gb2 * p['ls2'],
            ls2=(gw2 * p['w2']).sum(1) + gb2 * p['b2'])
        return (grad_x, s * rstd1.unsqueeze(1),
                *(grads[n].to(p[n].dtype) for n in _PARAMS),
                None, None, None, None)


def fused_block(x, norm1, norm2, fc1, fc2, ls1, ls2, pool_size, drop=None):
    """``x + ls1 * (P(n1(x)) - n1(x))``, then ``+ ls2 * mlp(n2(.))``.

    Args:
        x: ``B x C x H x W``; computed in the parameters' dtype.
        norm1, norm2: GroupNorm(1) modules; fc1, fc2: 1x1 convolutions.
        ls1, ls2: layer scales ``C``; pool_size: odd pooling window.
        drop: ``(mixer, mlp)`` drop-path factors ``B`` (0 or 1/keep), or
            None.
    """
    coef = (ls1 * norm1.weight).expand(x.shape[0], -1)
    keep = None
    if drop is not None:
        coef, keep = coef * drop[0].unsqueeze(1), drop[1]
    params = (norm1.bias, norm2.weight, norm2.bias, fc1.weight.flatten(1),
              fc1.bias, fc2.weight.flatten(1), fc2.bias, ls2)
    x = x.to(coef.dtype)
    if not (torch.is_grad_enabled() and any(
            t.requires_grad for t in (x, coef, *params))):
        named = dict(zip(_PARAMS, params))
        dtype = _compute_dtype(x)  # the autocast dtype, read before it is off
        with autocast_off(x.device):
            return _forward(x, coef, _fold(named, dtype), keep, pool_size,
                            norm1.eps, norm2.eps)[0]
    return _Block.apply(x, coef, *params, keep, pool_size, norm1.eps,
                        norm2.eps)
