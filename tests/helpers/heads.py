"""Comparing a fast decode head with the mmseg head it derives from, on the
same weights."""
import torch


def loss_and_grads(head, feats, batch):
    """``head.loss`` in training mode, its backward, and the gradients."""
    head.train()
    head.zero_grad(set_to_none=True)
    losses = head.loss(feats, batch, train_cfg={})
    losses['loss_ce'].backward()
    return losses, {name: param.grad.clone()
                    for name, param in head.named_parameters()
                    if param.grad is not None}


def assert_trains_alike(fast, plain, feats, batch, loss_rtol, grad_rtol,
                        grad_atol_of_max):
    """One training step of each gives the same ``loss_ce`` (to
    ``loss_rtol``), ``acc_seg``, gradients (to ``grad_rtol`` and
    ``grad_atol_of_max`` x the gradient's largest entry: the round-off of
    other summation orders) and BatchNorm running statistics."""
    want, want_grads = loss_and_grads(plain, feats, batch)
    got, grads = loss_and_grads(fast, feats, batch)
    assert got.keys() == want.keys() == {'loss_ce', 'acc_seg'}
    torch.testing.assert_close(got['loss_ce'], want['loss_ce'],
                               rtol=loss_rtol, atol=0)
    # mmseg's accuracy is float32 for any logits dtype
    torch.testing.assert_close(got['acc_seg'], want['acc_seg'],
                               check_dtype=False)
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(
            grads[name], grad, rtol=grad_rtol,
            atol=grad_atol_of_max * grad.abs().max().item(), msg=name)
    torch.testing.assert_close(fast.state_dict(), plain.state_dict())


def labelled_batch(labels):
    """Data samples for ``B x 1 x H x W`` label maps, each with its map
    and an unpadded ``H x W`` image shape."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    size = tuple(labels.shape[2:])
    batch = []
    for label in labels:
        sample = SegDataSample(metainfo=dict(img_shape=size, pad_shape=size))
        sample.gt_sem_seg = PixelData(data=label)
        batch.append(sample)
    return batch


def eval_logits(models, images, batch):
    """Each segmentor's ``encode_decode`` of ``images`` in eval mode,
    without gradients."""
    metas = [sample.metainfo for sample in batch]
    with torch.no_grad():
        return [model.eval().encode_decode(images, metas)
                for model in models]
