"""FastUPerHead and FastFCNHead compute mmseg's UPerHead and FCNHead:
loss, accuracy, gradients, BatchNorm statistics and inference logits, on
the same weights.

The stride-4 maps are 64 x 72, so that the head's large 3x3 convolutions
(``fpn_convs[0]``, ``fpn_bottleneck``) run by Winograd; ``ON_THIS_CPU`` is
set so that they do on any CPU. The exact comparisons run in float64
(Winograd's transforms add fp32 rounding of their own), and one in fp32
bounds that rounding.
"""
import pytest
import torch
from mmengine.structures import PixelData
from mmseg.models.decode_heads import FCNHead, UPerHead
from mmseg.structures import SegDataSample

from poolformer_seg.models import FastFCNHead, FastUPerHead
from poolformer_seg.models import winograd
from tests.helpers.heads import assert_trains_alike, loss_and_grads
from tests.helpers.upstream import randomize_

CHANNELS = [8, 12, 16, 16]
UPER = dict(in_channels=CHANNELS, in_index=[0, 1, 2, 3],
            pool_scales=(1, 2, 3, 6), channels=8, dropout_ratio=0.,
            num_classes=5, norm_cfg=dict(type='BN'), align_corners=False,
            loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                             loss_weight=1.))
FCN = dict(in_channels=16, in_index=2, channels=8, num_convs=1,
           concat_input=False, dropout_ratio=0., num_classes=5,
           norm_cfg=dict(type='BN'), align_corners=False,
           loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                            loss_weight=.4))
SIZE = (64, 72)  # stride 4: Winograd's 64 x 64 minimum is met
LABELS = (256, 288)


@pytest.fixture(autouse=True)
def winograd_everywhere(monkeypatch):
    monkeypatch.setattr(winograd, 'ON_THIS_CPU', True)


def make_pair(plain_type, fast_type, cfg, dtype=torch.float64,
              **overrides):
    cfg = {**cfg, **overrides}
    plain = randomize_(plain_type(**cfg), 0)
    fast = fast_type(**cfg)
    fast.load_state_dict(plain.state_dict(), strict=True)
    return plain.to(dtype), fast.to(dtype)


def features(dtype=torch.float64, batch=2, seed=0):
    """Stride-4..32 maps in channels_last, as the fast backbones give
    them."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, SIZE[0] // s, SIZE[1] // s, generator=gen,
                        dtype=dtype).contiguous(
                            memory_format=torch.channels_last)
            for c, s in zip(CHANNELS, (1, 2, 4, 8))]


def samples(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        label = torch.randint(0, 5, (1, *LABELS), generator=gen)
        label[:, :5] = 255
        sample = SegDataSample(metainfo=dict(img_shape=LABELS,
                                             pad_shape=LABELS))
        sample.gt_sem_seg = PixelData(data=label)
        out.append(sample)
    return out


def count_winograd(monkeypatch):
    calls = []
    original = winograd.winograd_conv3x3

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(winograd, 'winograd_conv3x3', counted)
    return calls


PAIRS = [(UPerHead, FastUPerHead, UPER), (FCNHead, FastFCNHead, FCN),
         (FCNHead, FastFCNHead, dict(FCN, num_convs=2, concat_input=True))]


@pytest.mark.parametrize('plain_type, fast_type, cfg', PAIRS)
@pytest.mark.parametrize('avg_non_ignore', [False, True])
def test_training_equals_mmseg_head_in_float64(plain_type, fast_type, cfg,
                                               avg_non_ignore):
    loss_cfg = dict(cfg['loss_decode'], avg_non_ignore=avg_non_ignore)
    plain, fast = make_pair(plain_type, fast_type, cfg,
                            loss_decode=loss_cfg)
    assert_trains_alike(fast, plain, features(), samples(), loss_rtol=1e-12,
                        grad_rtol=1e-9, grad_atol_of_max=1e-11)


def test_uper_head_runs_its_large_convolutions_by_winograd(monkeypatch):
    calls = count_winograd(monkeypatch)
    _, fast = make_pair(UPerHead, FastUPerHead, UPER)
    loss_and_grads(fast, features(), samples())
    # fpn_convs[0] and fpn_bottleneck at 64 x 72; the smaller maps stay
    # with PyTorch's convolution
    assert [tuple(shape[1:]) for shape in calls] == [(8, 64, 72),
                                                     (32, 64, 72)]


@pytest.mark.parametrize('plain_type, fast_type, cfg', PAIRS)
def test_inference_equals_mmseg_head(plain_type, fast_type, cfg):
    """Eval mode (BatchNorm folded into the convolutions): float64 to
    1e-12, fp32 to Winograd's rounding."""
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        plain, fast = make_pair(plain_type, fast_type, cfg, dtype)
        plain.eval(), fast.eval()
        metas = [s.metainfo for s in samples()]
        with torch.no_grad():
            got = fast.predict(features(dtype, seed=1), metas, {})
            want = plain.predict(features(dtype, seed=1), metas, {})
        assert got.shape == (2, 5, *LABELS)
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize('plain_type, fast_type, cfg', PAIRS)
def test_plain_forward_is_the_mmseg_forward(plain_type, fast_type, cfg):
    """What ``torch.compile`` traces: the mmseg class's forward on the
    fast head's layers."""
    plain, fast = make_pair(plain_type, fast_type, cfg)
    plain.eval(), fast.eval()
    with torch.no_grad():
        feats = features(seed=2)
        assert torch.equal(fast.plain_forward(feats), plain(feats))
        torch.testing.assert_close(fast(feats), plain(feats), atol=1e-12,
                                   rtol=0)


def test_classifier_stays_fp32_under_autocast():
    plain, fast = make_pair(UPerHead, FastUPerHead, UPER, torch.float32)
    plain.eval(), fast.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        ours = fast(features(torch.float32))
        ref = plain(features(torch.float32))
    assert ours.dtype == torch.float32 and ref.dtype == torch.bfloat16


@pytest.mark.parametrize('fast_type, cfg, plain_name', [
    (FastUPerHead, UPER, 'UPerHead'), (FastFCNHead, FCN, 'FCNHead')])
@pytest.mark.parametrize('change, named', [
    (dict(loss_decode=dict(type='CrossEntropyLoss', reduction='sum')),
     "loss_decode.reduction='sum'"),
    (dict(loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=True)),
     'loss_decode.use_sigmoid=True'),
    (dict(loss_decode=dict(type='CrossEntropyLoss', class_weight=[1.] * 5)),
     'loss_decode.class_weight=[1.0'),
    (dict(sampler=dict(type='OHEMPixelSampler', thresh=.7)), 'sampler='),
])
def test_settings_computed_otherwise_are_refused_by_name(fast_type, cfg,
                                                         plain_name, change,
                                                         named):
    with pytest.raises(ValueError) as err:
        fast_type(**{**cfg, **change})
    message = str(err.value)
    assert message.startswith(f'{fast_type.__name__} supports one softmax')
    assert named in message and f'Use type="{plain_name}"' in message


def test_heads_run_on_the_meta_device():
    for plain_type, fast_type, cfg in PAIRS:
        _, fast = make_pair(plain_type, fast_type, cfg, torch.float32)
        fast = fast.to('meta').eval()
        with torch.no_grad():
            logits = fast([f.to('meta') for f in features(torch.float32)])
        assert logits.device.type == 'meta'
        size = SIZE if fast_type is FastUPerHead else (SIZE[0] // 4,
                                                       SIZE[1] // 4)
        assert logits.shape == (2, 5, *size)


def test_fp32_training_is_within_rounding_of_mmseg():
    plain, fast = make_pair(UPerHead, FastUPerHead, UPER, torch.float32)
    assert_trains_alike(fast, plain, features(torch.float32), samples(),
                        loss_rtol=1e-5, grad_rtol=1e-4, grad_atol_of_max=1e-5)
