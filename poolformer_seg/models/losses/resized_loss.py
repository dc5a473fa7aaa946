"""Cross-entropy of logits resized to the label size, in blocks of rows.

A decode head predicts ``B x K x h x w`` logits at stride 4. mmseg's
``loss_by_feat`` resizes them bilinearly to the label size ``H x W`` and then
takes a softmax cross-entropy and a top-1 accuracy over the full-size
tensor. For ADE20K (``K = 150``) at 512x512 that tensor holds 39M values per
image. Each pass over it costs more than most convolutions of the model:
the resize, the log-softmax (over a strided channel axis in NCHW), ``topk``
for the accuracy, the zero-filled gradient, and the log-softmax and resize
backwards. Each fresh 157 MB buffer also spends tens of milliseconds in page
faults.

:func:`resized_cross_entropy` computes the same two numbers one block of
label rows of one image at a time, so no full-size tensor is built. A
block's logits come from the same ATen bilinear kernel, run on the block's
input rows plus one halo row on each side; the softmax then runs over
contiguous NHWC rows.

The summed loss's gradient with respect to the resized logits,
``softmax - onehot``, depends on the logits and labels only: what comes
after the loss scales it by one number. So, when the logits need a
gradient, the forward forms it while each block's resized logits are at
hand (in place, over the same buffer) and sends it through the ATen resize
backward into a ``B x K x h x w`` sum; the backward only multiplies that
sum by the incoming gradient. Nothing is resized twice, and only that
low-resolution sum is kept from forward to backward.

Blocks need ``H`` to be a whole multiple of ``h`` (crop training, where the
logits are exactly 1/4 of the crop) and ``align_corners=False``; then a
block's resize uses the full resize's source rows and weights exactly.
Otherwise the whole image is one block: the same kernels, no memory saved.

The logits are cast to at least fp32 before the resize, so under bf16/fp16
autocast the softmax, the loss and the accuracy are computed in fp32.
"""
from typing import List, NamedTuple, Tuple

import torch
import torch.nn.functional as F

__all__ = ['resized_cross_entropy']

# Pixels x classes per block. On the CPU about 8 MB of fp32 logits, small
# enough to be served again from the heap instead of freshly mapped pages.
BLOCK_ELEMENTS = 2 ** 21
# Elsewhere (CUDA) the caching allocator reuses memory and each block costs
# about 40 kernel launches, which the CPU issues one by one: with the CPU's
# size, S12 at 512x512 and batch 2 takes 44 blocks, 2,800 launches, twice
# the rest of its training step. There a block bounds memory only: a whole
# 512x512 ADE20K image (39M values) in one block.
ACCELERATOR_BLOCK_ELEMENTS = 2 ** 26
_EPS = torch.finfo(torch.float32).eps  # mmseg's guard against 0 / 0


class _Block(NamedTuple):
    start: int  # input rows start:stop are resized ...
    stop: int
    out_rows: int  # ... to out_rows rows, of which rows
    first: int  # first:first + count are the label rows
    label_row: int  # label_row:label_row + count
    count: int


def _block_elements(device: torch.device) -> int:
    return BLOCK_ELEMENTS if device.type == 'cpu' else \
        ACCELERATOR_BLOCK_ELEMENTS


def _blocks(h: int, out_h: int, out_w: int, num_classes: int,
            align_corners: bool, elements: int) -> List[_Block]:
    if align_corners or out_h % h:
        return [_Block(0, h, out_h, 0, 0, out_h)]
    s = out_h // h
    step = max(1, elements // (s * out_w * num_classes))
    blocks = []
    for a in range(0, h, step):
        b = min(a + step, h)
        # Output rows s*a .. s*b-1 read input rows a-1 .. b; ATen clamps at
        # the image border, and so does the slice there.
        start, stop = max(a - 1, 0), min(b + 1, h)
        blocks.append(_Block(start, stop, s * (stop - start), s * (a - start),
                             s * a, s * (b - a)))
    return blocks


def _label_blocks(x, labels, align_corners):
    """Per image and block: ``(image, block, resized, rows, label_rows)``,
    ``resized`` the channels-last ``1 x K x out_rows x W`` logits of the
    block, ``rows`` the view of its label rows as ``count*W x K``, and
    ``label_rows`` those rows' slice of ``labels``."""
    num_classes, h = x.shape[1:3]
    out_h, out_w = labels.shape[1:]
    blocks = _blocks(h, out_h, out_w, num_classes, align_corners,
                     _block_elements(x.device))
    for image in range(x.shape[0]):
        for block in blocks:
            resized = F.interpolate(
                x[image:image + 1, :, block.start:block.stop],
                size=(block.out_rows, out_w), mode='bilinear',
                align_corners=align_corners)
            rows = resized.permute(0, 2, 3, 1)[
                0, block.first:block.first + block.count].reshape(
                    -1, num_classes)
            yield image, block, resized, rows, slice(
                block.label_row, block.label_row + block.count)


def _nll_and_gradient_(rows, target, keep, want_gradient):
    """Softmax cross-entropy of logit rows ``N x K`` against ``target``
    ``N x 1``, over the rows where ``keep`` (``N x 1`` bool) holds.

    Returns ``(sum of -log softmax[target], number of kept rows whose
    target ties for the highest logit)``. ``rows`` is overwritten: with
    ``keep * (softmax - onehot(target))``, the gradient of that sum, if
    ``want_gradient``, else with unnormalised exponentials.
    """
    picked = rows.gather(1, target)
    top = rows.amax(1, keepdim=True)
    correct = ((picked >= top) & keep).sum()
    exp_sum = rows.sub_(top).exp_().sum(1, keepdim=True)
    # -log p_y = log-sum-exp - z_y, with log-sum-exp = top + log(exp_sum)
    nll = exp_sum.log().add_(top).sub_(picked).masked_fill_(~keep, 0).sum()
    if want_gradient:
        rows.mul_(keep / exp_sum)
        rows.scatter_add_(1, target, -keep.to(rows.dtype))
    return nll, correct


def _add_resize_backward_(grad_x, image, block, resized, align_corners):
    """Add to ``grad_x`` the gradient that the block's label rows of
    ``resized`` (its halo rows set to zero here) send back through the
    resize."""
    resized[:, :, :block.first].zero_()
    resized[:, :, block.first + block.count:].zero_()
    num_classes, w = grad_x.shape[1], grad_x.shape[3]
    grad_x[image:image + 1, :, block.start:block.stop] += \
        torch.ops.aten.upsample_bilinear2d_backward(
            resized, list(resized.shape[2:]),
            [1, num_classes, block.stop - block.start, w], align_corners)


class _ResizedCrossEntropy(torch.autograd.Function):
    """``(sum of -log softmax(resize(logits))[label], number of pixels whose
    label is an arg-max)`` over pixels whose label is not ignored.

    ``labels`` must already have its ignored pixels replaced by class 0;
    ``valid`` marks the others. The gradient is formed in the forward (see
    the module docstring).
    """

    @staticmethod
    def forward(ctx, logits, labels, valid, align_corners):
        x = logits.detach().to(torch.promote_types(
            logits.dtype, torch.float32)).contiguous(
                memory_format=torch.channels_last)
        want_gradient = ctx.needs_input_grad[0]
        grad_x = torch.zeros_like(x) if want_gradient else None
        total = x.new_zeros(())
        correct = labels.new_zeros(())
        for image, block, resized, rows, label_rows in _label_blocks(
                x, labels, align_corners):
            nll, hits = _nll_and_gradient_(
                rows, labels[image, label_rows].reshape(-1, 1),
                valid[image, label_rows].reshape(-1, 1), want_gradient)
            total += nll
            correct += hits
            if want_gradient:
                _add_resize_backward_(grad_x, image, block, resized,
                                      align_corners)
        ctx.save_for_backward(grad_x)
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_total, _):
        (grad_x, ) = ctx.saved_tensors
        return (grad_x * grad_total).to(ctx.logits_dtype), None, None, None


def _check_inputs(logits, labels, ignore_index):
    if logits.dim() != 4 or labels.dim() != 3 or \
            labels.shape[0] != logits.shape[0]:
        raise ValueError('resized_cross_entropy expects logits B x K x h x w '
                         'and labels B x H x W, got '
                         f'{tuple(logits.shape)} and {tuple(labels.shape)}')
    if labels.dtype != torch.long:
        raise TypeError(f'labels must be int64, got {labels.dtype}')
    if labels.device.type == 'meta':  # shapes only: no values to check
        return
    labelled = labels[labels != ignore_index]
    if labelled.numel() and (labelled.min() < 0 or
                             labelled.max() >= logits.shape[1]):
        raise ValueError(
            f'labels hold values outside [0, {logits.shape[1]}) other than '
            f'ignore_index={ignore_index}: min {labelled.min().item()}, max '
            f'{labelled.max().item()}')


def resized_cross_entropy(
        logits: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int = 255,
        avg_non_ignore: bool = False,
        align_corners: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """mmseg's decode loss and ``acc_seg`` for logits smaller than labels.

    Equal (up to float rounding) to resizing ``logits`` with
    ``mmseg.models.utils.resize(..., mode='bilinear')`` to the label size,
    then ``mmseg.models.losses.cross_entropy`` (softmax, no class weights,
    reduction ``'mean'``) and ``mmseg.models.losses.accuracy`` (top-1), both
    with ``ignore_index``. A pixel whose label ties for the highest logit
    counts as correct (``topk`` would pick one of the tied classes).

    Args:
        logits: ``B x K x h x w`` float, any memory format and dtype.
        labels: ``B x H x W`` int64, values in ``[0, K)`` or
            ``ignore_index``.
        ignore_index: label of pixels that count for nothing.
        avg_non_ignore: divide the summed loss by the number of labelled
            pixels instead of all ``B*H*W`` pixels (mmseg's flag).
        align_corners: the resize's convention.

    Returns:
        ``(loss, acc)``: the fp32 mean loss (a scalar) and the accuracy in
        percent (shape ``[1]``, not differentiable).
    """
    _check_inputs(logits, labels, ignore_index)
    valid = labels != ignore_index
    if not torch.is_grad_enabled():
        logits = logits.detach()  # no gradient to form in the forward
    total, correct = _ResizedCrossEntropy.apply(
        logits, labels.masked_fill(~valid, 0), valid, align_corners)
    # a tensor, not a Python number: no wait for the device (and none to
    # wait for on ``meta``)
    num_valid = valid.sum().to(total.dtype)
    loss = total / ((num_valid if avg_non_ignore else labels.numel()) + _EPS)
    acc = (correct.float() + _EPS) * (100. / (num_valid + _EPS))
    return loss, acc.reshape(1)
