"""FastFPNHead computes FPNHead's function: loss, accuracy, gradients and
inference logits, on the same weights."""
import copy
import re

import pytest
import torch
from mmcv.cnn import ConvModule
from mmengine.structures import PixelData
from mmseg.models.decode_heads import FPNHead
from mmseg.structures import SegDataSample

from poolformer_seg.models import FastFPNHead
from tests.helpers.heads import assert_trains_alike, loss_and_grads
from tests.helpers.upstream import randomize_

HEAD = dict(in_channels=[8, 8, 8, 8], in_index=[0, 1, 2, 3],
            feature_strides=[4, 8, 16, 32], channels=6, dropout_ratio=0.,
            num_classes=5, norm_cfg=dict(type='BN'), align_corners=False,
            loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                             loss_weight=.7))


def make_pair(fold_bn=False, **overrides):
    """FPNHead and FastFPNHead with the same random weights; with
    ``fold_bn``, FPNHead folds eval-mode BN as FastFPNHead does, so that
    the rest of the computation can be compared bit for bit."""
    cfg = {**HEAD, **overrides}
    plain = randomize_(FPNHead(**cfg), 0)
    fast = FastFPNHead(**cfg)
    fast.load_state_dict(plain.state_dict(), strict=True)
    if fold_bn:
        for module in plain.modules():
            if isinstance(module, ConvModule):
                module.turn_on_efficient_conv_bn_eval()
    return plain, fast


def features(size=(16, 12), batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 8, size[0] // s, size[1] // s, generator=gen)
            for s in (1, 2, 4, 8)]


def samples(size=(64, 48), batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        label = torch.randint(0, 5, (1, *size), generator=gen)
        label[:, :3] = 255
        sample = SegDataSample(metainfo=dict(img_shape=size, pad_shape=size))
        sample.gt_sem_seg = PixelData(data=label)
        out.append(sample)
    return out


@pytest.mark.parametrize('avg_non_ignore', [False, True])
def test_training_loss_and_gradients_equal_fpn_head(avg_non_ignore):
    loss_cfg = dict(HEAD['loss_decode'], avg_non_ignore=avg_non_ignore)
    plain, fast = make_pair(loss_decode=loss_cfg)
    exact = copy.deepcopy(plain).double()
    # float32 round-off of other summation orders: mmseg's own float32
    # gradients are up to 3e-6 of the largest entry away from float64 here
    assert_trains_alike(fast, plain, features(), samples(), loss_rtol=1e-6,
                        grad_rtol=1e-5, grad_atol_of_max=1e-5)
    # and ours are as close to float64 as mmseg's
    _, truth = loss_and_grads(exact, [f.double() for f in features()],
                              samples())
    errors = [
        max(((head.get_parameter(name).grad.double() - grad).abs().max() /
             grad.abs().max()).item() for name, grad in truth.items())
        for head in (fast, plain)]
    assert errors[0] < 2 * errors[1] + 1e-7, errors


def test_the_benchmark_switch_turns_the_blockwise_loss_off(monkeypatch):
    """``BLOCKWISE_LOSS=False`` (the benchmark's training row
    ``ours-no-blockwise-loss``) computes the loss by mmseg's
    ``loss_by_feat``: the blockwise function is not called, and loss,
    accuracy and gradients are the blockwise ones (float64)."""
    from poolformer_seg.models.decode_heads import fast_head
    _, fast = make_pair()
    fast.double()
    feats = [f.double() for f in features()]
    calls = []
    blockwise = fast_head.resized_cross_entropy
    monkeypatch.setattr(fast_head, 'resized_cross_entropy', lambda *a, **k: (
        calls.append(1), blockwise(*a, **k))[1])
    results = []
    for on in (True, False):
        monkeypatch.setattr(fast_head, 'BLOCKWISE_LOSS', on)
        calls.clear()
        results.append(loss_and_grads(fast, feats, samples()))
        assert calls == ([1] if on else [])
    (loss, grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(loss['loss_ce'], plain_loss['loss_ce'])
    # mmseg's accuracy counts in fp32 whatever the logits' dtype
    torch.testing.assert_close(loss['acc_seg'].float(), plain_loss['acc_seg'])
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-12,
                                   rtol=1e-10)


def test_inference_equals_fpn_head():
    plain, fast = make_pair()
    plain.eval(), fast.eval()
    metas = [s.metainfo for s in samples()]
    for seed in (1, 2):
        with torch.no_grad():
            torch.testing.assert_close(
                fast.predict(features(seed=seed), metas, {}),
                plain.predict(features(seed=seed), metas, {}))
    with torch.inference_mode():
        torch.testing.assert_close(
            fast.predict(features(seed=3), metas, {}),
            plain.predict(features(seed=3), metas, {}))


def test_differentiable_outputs_are_correct():
    plain, fast = make_pair()
    plain.eval(), fast.eval()
    metas = [s.metainfo for s in samples()]
    out = fast.predict(features(), metas, {})  # grad enabled
    assert out.requires_grad
    torch.testing.assert_close(out, plain.predict(features(), metas, {}))


def test_classifier_and_logits_stay_fp32_under_autocast():
    plain, fast = make_pair()
    plain.eval(), fast.eval()
    metas = [s.metainfo for s in samples()]
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        logits = fast(features())
        ours = fast.predict(features(), metas, {})
        ref = plain.predict(features(), metas, {})
    assert logits.dtype == torch.float32
    # the input-size scores follow autocast, as mmseg's
    assert ours.dtype == ref.dtype == torch.bfloat16
    exact = plain.predict(features(), metas, {})
    assert ((ours.float() - exact).abs().mean() <
            (ref.float() - exact).abs().mean())


@pytest.mark.parametrize('change', [
    dict(loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=True)),
    dict(loss_decode=dict(type='CrossEntropyLoss', class_weight=[1.] * 5)),
    dict(loss_decode=[dict(type='CrossEntropyLoss'),
                      dict(type='DiceLoss')]),
    dict(sampler=dict(type='OHEMPixelSampler', thresh=.7)),
])
def test_unsupported_losses_are_refused_at_build(change):
    with pytest.raises(ValueError, match='FastFPNHead supports'):
        FastFPNHead(**{**HEAD, **change})


@pytest.mark.parametrize('change, named', [
    (dict(loss_decode=dict(type='CrossEntropyLoss', reduction='sum')),
     "loss_decode.reduction='sum'"),
    (dict(loss_decode=dict(type='CrossEntropyLoss', reduction='none')),
     "loss_decode.reduction='none'"),
    (dict(num_classes=2, out_channels=1, threshold=.3,
          loss_decode=dict(type='CrossEntropyLoss')), 'out_channels=1'),
])
def test_settings_fpn_head_computes_otherwise_are_refused_by_name(change,
                                                                  named):
    FPNHead(**{**HEAD, **change})  # valid for mmseg's own head
    with pytest.raises(ValueError, match=re.escape(named)):
        FastFPNHead(**{**HEAD, **change})


def test_frozen_first_scale_head_trains_like_fpn_head():
    """A frozen scale head before a trainable one: the sum needs a
    gradient although its first summand does not."""
    plain, fast = make_pair()
    for head in (plain, fast):
        head.scale_heads[0].requires_grad_(False)
    feats, batch = features(), samples()
    want_losses, want = loss_and_grads(plain, feats, batch)
    got_losses, got = loss_and_grads(fast, feats, batch)
    torch.testing.assert_close(got_losses['loss_ce'], want_losses['loss_ce'])
    assert got.keys() == want.keys() and not any(
        k.startswith('scale_heads.0.') for k in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5,
                                   rtol=1e-4, msg=name)


def test_head_runs_on_the_meta_device():
    _, fast = make_pair()
    fast = fast.to('meta').eval()
    feats = [f.to('meta') for f in features()]
    with torch.no_grad():
        logits = fast(feats)
    assert logits.device.type == 'meta'
    assert logits.shape == (2, 5, 16, 12)


def conv_seg_input(head, feats):
    """What the classifier sees: the sum of the scale heads."""
    seen = []
    hook = head.conv_seg.register_forward_hook(
        lambda module, args, out: seen.append(args[0].clone()))
    try:
        head(feats)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize('channels_last', [False, True])
def test_in_place_sum_of_scale_heads_is_fpn_head_s_sum(channels_last):
    plain, fast = make_pair(fold_bn=True)
    plain.eval(), fast.eval()
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def feats(seed, size=(16, 12)):
        return [x.contiguous(memory_format=layout)
                for x in features(size, seed=seed)]

    with torch.no_grad():
        for seed, size in ((1, (16, 12)), (2, (16, 12)), (3, (32, 8))):
            assert torch.equal(conv_seg_input(fast, feats(seed, size)),
                               conv_seg_input(plain, feats(seed, size)))


def test_sum_under_autocast_is_fpn_head_s_sum():
    plain, fast = make_pair(fold_bn=True)
    plain.eval(), fast.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        for seed in (1, 2):
            ours = conv_seg_input(fast, features(seed=seed))
            ref = conv_seg_input(plain, features(seed=seed))
            assert ref.dtype == torch.bfloat16
            assert torch.equal(ours, ref.float())


def test_training_forward_equals_fpn_head():
    plain, fast = make_pair(fold_bn=True)
    plain.eval(), fast.eval()  # BN statistics fixed, gradients on
    ours, ref = fast(features()), plain(features())
    assert ours.requires_grad
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_eval_mode_bn_is_folded_with_fpn_head_s_outputs_and_gradients():
    """Against the stock FPNHead (BN a separate layer): the same logits
    and gradients with frozen BN statistics, within fp32 rounding; and the
    fold is really taken (the BN layers are not called)."""
    plain, fast = make_pair()
    plain.eval(), fast.eval()
    bn_calls = []
    for module in fast.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(lambda *_: bn_calls.append(1))
    grads = []
    for head in (plain, fast):
        out = head(features())
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(
        ).backward()
        grads.append({n: p.grad for n, p in head.named_parameters()})
        if head is plain:
            ref = out
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert not bn_calls
    for name, grad in grads[0].items():  # fp32 sums of many products
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5,
                                   atol=1e-6 * grad.abs().max().item(),
                                   msg=name)
