"""resized_cross_entropy equals mmseg's resize + cross_entropy + accuracy.

The reference is mmseg's own code path of ``BaseDecodeHead.loss_by_feat``:
``mmseg.models.utils.resize`` to the label size, then
``mmseg.models.losses.cross_entropy`` and ``accuracy``. Blocks are forced
small so that every test crosses block borders (halo rows) and the image
borders.
"""
import pytest
import torch
from mmseg.models.losses import accuracy, cross_entropy
from torch.utils._python_dispatch import TorchDispatchMode
from mmseg.models.utils import resize

import poolformer_seg.models.losses.resized_loss as rce
from poolformer_seg.models.losses import resized_cross_entropy


def mmseg_loss(logits, labels, ignore_index=255, avg_non_ignore=False,
               align_corners=False):
    resized = resize(logits, size=labels.shape[1:], mode='bilinear',
                     align_corners=align_corners)
    loss = cross_entropy(resized, labels, ignore_index=ignore_index,
                         avg_non_ignore=avg_non_ignore)
    return loss, accuracy(resized, labels, ignore_index=ignore_index)


def make_case(batch=2, classes=7, low=(9, 11), scale=4, seed=0,
              ignore_fraction=.2):
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, classes, *low, generator=gen)
    size = (low[0] * scale, low[1] * scale) if isinstance(scale, int) \
        else scale
    labels = torch.randint(0, classes, (batch, *size), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < ignore_fraction] = 255
    return logits, labels


def loss_and_grad(fn, logits, labels, **kwargs):
    x = logits.clone().requires_grad_()
    loss, acc = fn(x, labels, **kwargs)
    (grad, ) = torch.autograd.grad(loss, x)
    return loss.detach(), acc, grad


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(rce, 'BLOCK_ELEMENTS', 300)


@pytest.mark.parametrize('layout', [torch.contiguous_format,
                                    torch.channels_last])
@pytest.mark.parametrize('avg_non_ignore', [False, True])
@pytest.mark.parametrize('scale', [4, 1, 3, (50, 41)])
def test_equals_mmseg(layout, avg_non_ignore, scale):
    logits, labels = make_case(scale=scale)
    logits = logits.contiguous(memory_format=layout)
    ref = loss_and_grad(mmseg_loss, logits, labels,
                        avg_non_ignore=avg_non_ignore)
    ours = loss_and_grad(resized_cross_entropy, logits, labels,
                         avg_non_ignore=avg_non_ignore)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=0)
    assert ours[1].shape == ref[1].shape == (1, )
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(ours[2], ref[2], rtol=1e-5, atol=1e-9)
    assert ours[2].abs().max() > 1e-4  # a real gradient


def test_blocks_cover_every_label_row_once():
    for h, scale, step_elements in [(9, 4, 300), (10, 2, 50), (7, 3, 10**6),
                                    (1, 4, 1)]:
        blocks = rce._blocks(h, h * scale, 5, 3, False, step_elements)
        rows = [r for b in blocks
                for r in range(b.label_row, b.label_row + b.count)]
        assert rows == list(range(h * scale))
        for b in blocks:
            assert b.out_rows == scale * (b.stop - b.start)
            assert 0 <= b.first and b.first + b.count <= b.out_rows
    assert len(rce._blocks(9, 36, 5, 3, True, 300)) == 1


def test_blocks_are_small_on_the_cpu_and_whole_images_elsewhere():
    """The CPU takes heap-sized blocks; CUDA, where every block is kernel
    launches, one block per image for S12's logits at 512x512 (150 x 128 x
    128)."""
    assert rce._block_elements(torch.device('cpu')) == rce.BLOCK_ELEMENTS
    elements = rce._block_elements(torch.device('cuda'))
    assert elements == rce.ACCELERATOR_BLOCK_ELEMENTS > rce.BLOCK_ELEMENTS
    assert len(rce._blocks(128, 512, 512, 150, False, elements)) == 1


def test_align_corners_and_other_ignore_index():
    logits, labels = make_case(seed=1)
    labels[labels == 255] = 3  # class 3 becomes the ignored label
    kwargs = dict(ignore_index=3, align_corners=True)
    ref = loss_and_grad(mmseg_loss, logits, labels, **kwargs)
    ours = loss_and_grad(resized_cross_entropy, logits, labels, **kwargs)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_all_pixels_ignored_matches_mmseg():
    logits, labels = make_case(ignore_fraction=1.1)
    ref = mmseg_loss(logits, labels)
    ours = resized_cross_entropy(logits, labels)
    assert ours[0].item() == ref[0].item() == 0
    torch.testing.assert_close(ours[1], ref[1])


def test_low_precision_logits_are_computed_in_fp32():
    logits, labels = make_case(seed=2)
    low = logits.bfloat16()
    ref = loss_and_grad(mmseg_loss, low.float(), labels)
    x = low.clone().requires_grad_()
    loss, acc = resized_cross_entropy(x, labels)
    (grad, ) = torch.autograd.grad(loss, x)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(acc, ref[1])
    torch.testing.assert_close(grad.float(), ref[2], rtol=1e-2, atol=1e-6)


def test_keeps_no_full_size_tensor_for_backward():
    logits, labels = make_case(batch=2, classes=20, low=(16, 16))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = logits.requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        resized_cross_entropy(x, labels)[0].backward()
    full = labels.numel() * logits.shape[1]
    assert saved and max(saved) <= max(labels.numel(), logits.numel())
    assert max(saved) * 10 < full
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mmseg_loss(logits, labels)[0]
    assert max(saved) == full  # what mmseg keeps


class CountResizes(TorchDispatchMode):
    """Counts ATen's bilinear resizes (forward and backward) run inside."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if 'upsample_bilinear2d' in func.__name__:
            self.calls.append(func.__name__.split('.')[0])
        return func(*args, **(kwargs or {}))


def test_the_backward_resizes_nothing_again():
    """The gradient is formed in the forward, block by block: the backward
    scales it and runs no resize."""
    logits, labels = make_case()
    x = logits.clone().requires_grad_()
    forward = CountResizes()
    with forward:
        loss, _ = resized_cross_entropy(x, labels)
    backward = CountResizes()
    with backward:
        loss.backward()
    assert len(forward.calls) > 2 and 'upsample_bilinear2d_backward' in \
        forward.calls
    assert backward.calls == []


def test_no_gradient_is_formed_without_autograd():
    logits, labels = make_case()
    x = logits.clone().requires_grad_()
    for context in (torch.no_grad(), torch.enable_grad()):
        counted = CountResizes()
        with context, counted:
            resized_cross_entropy(x, labels)
        formed = 'upsample_bilinear2d_backward' in counted.calls
        assert formed == isinstance(context, torch.enable_grad)
    counted = CountResizes()
    with counted:
        loss, _ = resized_cross_entropy(logits, labels)  # no requires_grad
    assert 'upsample_bilinear2d_backward' not in counted.calls
    assert not loss.requires_grad


def test_gradient_scales_with_the_loss_and_survives_a_second_backward():
    """What follows the loss (a loss weight, a retained graph) reaches the
    kept gradient as mmseg's does; the kept sum is not scaled in place."""
    logits, labels = make_case(seed=3)
    grads = []
    for fn in (mmseg_loss, resized_cross_entropy):
        x = logits.clone().requires_grad_()
        loss = 2.5 * fn(x, labels)[0]
        first = torch.autograd.grad(loss, x, retain_graph=True)[0]
        second = torch.autograd.grad(3 * loss, x)[0]
        torch.testing.assert_close(second, 3 * first)
        grads.append(first)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize('bad, match', [
    (dict(labels=torch.full((2, 36, 44), 7)), r'outside \[0, 7\)'),
    (dict(labels=torch.full((2, 36, 44), -1)), 'outside'),
    (dict(labels=torch.zeros(2, 36, 44, dtype=torch.int32)), 'int64'),
    (dict(labels=torch.zeros(3, 36, 44, dtype=torch.long)), 'B x H x W'),
    (dict(logits=torch.zeros(2, 7, 9)), 'B x K x h x w'),
])
def test_bad_inputs_are_named(bad, match):
    logits, labels = make_case()
    args = dict(logits=logits, labels=labels)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        resized_cross_entropy(args['logits'], args['labels'])
