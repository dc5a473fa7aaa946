"""FastFPN computes mmseg FPN's function, bit for bit where it adds in
place, and never writes into its inputs."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmseg.models.necks import FPN

from poolformer_seg.models import FastFPN
from poolformer_seg.models.necks import fast_fpn
from poolformer_seg.models.necks.fast_fpn import add_nearest_2x_
from tests.helpers.upstream import randomize_

NECK = dict(in_channels=[4, 6, 8, 10], out_channels=5, num_outs=4)


def make_pair(**overrides):
    cfg = {**NECK, **overrides}
    plain = randomize_(FPN(**cfg), 0).eval()
    fast = FastFPN(**cfg).eval()
    fast.load_state_dict(plain.state_dict(), strict=True)
    return plain, fast


def features(sizes, batch=2, channels_last=False, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    out = []
    for c, (h, w) in zip(NECK['in_channels'], sizes):
        x = torch.randn(batch, c, h, w, generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(x.requires_grad_(requires_grad))
    return out


HALVING = [(16, 12), (8, 6), (4, 3), (2, 2)]  # (4, 3) is not 2x (2, 2)
ODD = [(15, 13), (8, 7), (4, 4), (2, 2)]  # nearest to odd sizes
EXACT = [(16, 24), (8, 12), (4, 6), (2, 3)]  # every level 2x


def test_add_nearest_2x_is_nearest_upsampling_added_in_place():
    gen = torch.Generator().manual_seed(0)
    fine = torch.randn(2, 3, 8, 6, generator=gen)
    coarse = torch.randn(2, 3, 4, 3, generator=gen)
    expected = fine + torch.nn.functional.interpolate(coarse, size=(8, 6))
    address = fine.data_ptr()
    out = add_nearest_2x_(fine, coarse)
    assert out.data_ptr() == address
    assert torch.equal(out, expected)


@pytest.mark.parametrize('sizes', [HALVING, ODD])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_inference_equals_fpn_bit_for_bit(sizes, channels_last, dtype):
    plain, fast = make_pair()
    inputs = [x.to(dtype) for x in features(sizes, channels_last=channels_last)]
    kept = [x.clone() for x in inputs]
    plain.to(dtype), fast.to(dtype)
    with torch.no_grad():
        ours, ref = fast(inputs), plain(inputs)
    assert len(ours) == len(ref) == 4
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for x, y in zip(inputs, kept):
        assert torch.equal(x, y)  # inputs untouched


def test_training_outputs_and_gradients_equal_fpn():
    plain, fast = make_pair()
    plain.train(), fast.train()
    grads = []
    for neck in (plain, fast):
        inputs = features(HALVING, requires_grad=True)
        outs = neck(inputs)
        sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        grads.append([x.grad for x in inputs] +
                     [p.grad for p in neck.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('overrides', [
    dict(num_outs=5),  # an extra level: FPN.forward itself
    dict(num_outs=6, add_extra_convs='on_output'),
    dict(upsample_cfg=dict(mode='nearest', scale_factor=2)),
    dict(upsample_cfg=dict(mode='bilinear', align_corners=False)),
    dict(start_level=1, num_outs=3),
])
def test_other_settings_equal_fpn(overrides):
    plain, fast = make_pair(**overrides)
    inputs = features(EXACT if 'upsample_cfg' in overrides else HALVING)
    with torch.no_grad():
        ours, ref = fast(inputs), plain(inputs)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_lateral_that_returns_its_input_is_not_written():
    plain, fast = make_pair(in_channels=[5, 6, 8, 10])
    plain.lateral_convs[0] = torch.nn.Identity()
    fast.lateral_convs[0] = torch.nn.Identity()
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, c, h, w, generator=gen)
              for c, (h, w) in zip([5, 6, 8, 10], HALVING)]
    kept = inputs[0].clone()
    with torch.no_grad():
        ours, ref = fast(inputs), plain(inputs)
    assert torch.equal(inputs[0], kept)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_state_dict_is_fpn_s():
    plain, fast = make_pair()
    assert plain.state_dict().keys() == fast.state_dict().keys()


# The finest output composed from two cheaper convolutions: input channels
# few enough (8 * 2 < 5 * 8) for fast_fpn._composes_finest.
FEW = dict(in_channels=[2, 6, 8, 10], out_channels=8)


def few_channel_features(sizes, dtype=torch.float64, requires_grad=False):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(2, c, h, w, generator=gen, dtype=dtype)
            .requires_grad_(requires_grad)
            for c, (h, w) in zip(FEW['in_channels'], sizes)]


def count_calls(monkeypatch, name):
    """A list that gets an entry per call of ``fast_fpn.<name>``."""
    calls = []
    original = getattr(fast_fpn, name)

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(fast_fpn, name, counted)
    return calls


def count_composed(monkeypatch):
    return count_calls(monkeypatch, 'composed_finest_output')


@pytest.mark.parametrize('kernel', [3, 5])
@pytest.mark.parametrize('size', [(1, 1), (2, 3), (5, 7)])
def test_transposed_kernel_is_the_convolution_of_the_upsampled_map(size,
                                                                   kernel):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
    weight = torch.randn(4, 3, kernel, kernel, generator=gen,
                         dtype=torch.float64)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.), weight,
                        padding=kernel // 2)
    out = F.conv_transpose2d(x, fast_fpn.upsampled_conv_kernel(weight),
                             stride=2, padding=kernel // 2)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize('inner_size', [1, 3])
def test_composed_kernel_is_both_convolutions_away_from_the_border(
        inner_size):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 11, generator=gen, dtype=torch.float64)
    inner = torch.randn(5, 3, inner_size, inner_size, generator=gen,
                        dtype=torch.float64)
    outer = torch.randn(4, 5, 3, 3, generator=gen, dtype=torch.float64)
    kernel = fast_fpn.composed_kernel(outer, inner)
    size = inner_size + 2
    assert kernel.shape == (4, 3, size, size)
    both = F.conv2d(F.conv2d(x, inner, padding=inner_size // 2), outer,
                    padding=1)
    composed = F.conv2d(x, kernel, padding=size // 2)
    torch.testing.assert_close(composed[..., 1:-1, 1:-1],
                               both[..., 1:-1, 1:-1], rtol=0, atol=1e-12)
    # a 1x1 inner convolution of the padding is zero: exact everywhere
    assert torch.allclose(composed, both) == (inner_size == 1)


@pytest.mark.parametrize('sizes', [HALVING, [(2, 2), (1, 1), (1, 1),
                                             (1, 1)]])
def test_composed_finest_output_equals_fpn_in_float64(monkeypatch, sizes):
    plain, fast = make_pair(**FEW)
    plain.double(), fast.double()
    calls = count_composed(monkeypatch)
    lateral_calls = []
    fast.lateral_convs[0].register_forward_hook(
        lambda *_: lateral_calls.append(1))
    inputs = few_channel_features(sizes)
    kept = [x.clone() for x in inputs]
    with torch.no_grad():
        ours, ref = fast(inputs), plain(inputs)
    assert calls == [1] and lateral_calls == []  # no finest lateral
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for x, y in zip(inputs, kept):
        assert torch.equal(x, y)


def test_composed_finest_output_trains_as_fpn(monkeypatch):
    plain, fast = make_pair(**FEW)
    plain.double().train(), fast.double().train()
    calls = count_composed(monkeypatch)
    grads, outputs = [], []
    for neck in (plain, fast):
        inputs = few_channel_features(HALVING, requires_grad=True)
        outs = neck(inputs)
        sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        outputs.append(outs)
        grads.append([x.grad for x in inputs] +
                     [p.grad for p in neck.parameters()])
    assert calls == [1]
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize('channels_last', [False, True])
def test_composed_finest_output_in_fp32_and_bf16(monkeypatch, channels_last):
    plain, fast = make_pair(**FEW)
    calls = count_composed(monkeypatch)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inputs = [x.contiguous(memory_format=fmt)
              for x in few_channel_features(HALVING, torch.float32)]
    with torch.no_grad():
        ref = plain(inputs)
        ours = fast(inputs)
        with torch.autocast('cpu', torch.bfloat16):
            low = fast(inputs)
    assert len(calls) == 2
    assert ours[0].is_contiguous(memory_format=fmt)
    for a, b, c in zip(ours, ref, low):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert c.dtype == torch.bfloat16
        torch.testing.assert_close(c.float(), b, rtol=0.05, atol=0.05)


@pytest.mark.parametrize('case', ['channels', 'odd sizes', 'norm',
                                  'bilinear', 'winograd', 'switched off'])
def test_finest_output_is_fpn_s_where_composing_does_not_apply(
        monkeypatch, case):
    overrides = dict(FEW)
    sizes = HALVING
    if case == 'channels':  # 8 * 5 >= 5 * 8: no fewer multiply-adds
        overrides['in_channels'] = [5, 6, 8, 10]
    elif case == 'odd sizes':
        sizes = ODD
    elif case == 'norm':
        overrides['norm_cfg'] = dict(type='BN')
    elif case == 'bilinear':
        overrides['upsample_cfg'] = dict(mode='bilinear')
        sizes = EXACT
    elif case == 'winograd':  # where Winograd is chosen, it stays
        monkeypatch.setattr(fast_fpn, 'winograd_preferred', lambda *a: True)
    else:
        monkeypatch.setattr(fast_fpn, 'COMPOSE_FINEST', False)
    plain, fast = make_pair(**overrides)
    calls = count_composed(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, c, h, w, generator=gen)
              for c, (h, w) in zip(overrides['in_channels'], sizes)]
    with torch.no_grad():
        ours, ref = fast(inputs), plain(inputs)
    assert calls == []
    tolerance = 1e-5 if case == 'norm' else 0  # eval BN folded: rounding
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


def finest_level(sizes=(8, 6), channels=(3, 16), dtype=torch.float64,
                 requires_grad=False, seed=0, channels_last=False):
    """A ``FinestLevel`` over random 1x1 lateral and 3x3 output
    convolutions and random features of ``sizes`` (the finest)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(seed)
    cin, width = channels
    lateral, output = nn.Conv2d(cin, width, 1), nn.Conv2d(width, width, 3,
                                                          padding=1)
    for conv in (lateral, output):
        conv.to(dtype)
        with torch.no_grad():
            for p in conv.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
    height, width_px = sizes
    feature = torch.randn(2, cin, height, width_px, generator=gen,
                          dtype=dtype).contiguous(memory_format=fmt)
    coarse = torch.randn(2, width, height // 2, width_px // 2, generator=gen,
                         dtype=dtype).contiguous(memory_format=fmt)
    feature.requires_grad_(requires_grad)
    coarse.requires_grad_(requires_grad)
    return fast_fpn.FinestLevel(output, lateral, feature, coarse)


def head_conv(in_channels=16, out_channels=6, dtype=torch.float64, **kwargs):
    """A scale head's ConvModule (3x3, BN, ReLU) with random weights and
    BN statistics."""
    kwargs = {'kernel_size': 3, 'padding': 1, 'norm_cfg': dict(type='BN'),
              **kwargs}
    module = ConvModule(in_channels, out_channels, **kwargs).to(dtype)
    randomize_(module, 1)
    return module


def two_steps(level, module):
    """The finest output as FPN computes it, then ``module``."""
    lateral = level.lateral_conv(level.feature)
    upsampled = F.interpolate(level.coarse_lateral, scale_factor=2.)
    return module(level.fpn_conv(lateral + upsampled))


def count_head_compositions(monkeypatch):
    return count_calls(monkeypatch, 'composed_conv_of_finest')


def winograd_phases_everywhere(monkeypatch):
    """Winograd runs on maps of any size, after the compositions (as with
    AVX-512); returns the list that counts its calls from FastFPN."""
    from poolformer_seg.models import winograd
    monkeypatch.setattr(winograd, 'ON_THIS_CPU', True)
    monkeypatch.setattr(winograd, 'BEFORE_COMPOSITIONS', False)
    monkeypatch.setattr(winograd, 'MIN_PIXELS', 1)
    return count_calls(monkeypatch, 'winograd_conv3x3')


@pytest.mark.parametrize('size', [(1, 1), (2, 3), (5, 7)])
def test_phases_give_the_transposed_convolution(size):
    """The 6x6 transposed convolution (stride 2, padding 2) is the 2x2
    interleaving of four output phases of one 3x3 convolution."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, *size, generator=gen, dtype=torch.float64)
    kernel = torch.randn(5, 3, 6, 6, generator=gen, dtype=torch.float64)
    expected = F.conv_transpose2d(x, kernel, stride=2, padding=2)
    phases = F.conv2d(x, fast_fpn.phase_kernel(kernel), padding=1)
    got = fast_fpn._interleaved(phases)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize('size', [(2, 2), (4, 6), (10, 14)])
def test_unshuffled_phases_give_the_5x5_convolution(size):
    """A 5x5 'same' convolution is the 2x2 interleaving of four output
    phases of one 3x3 convolution of the map's unshuffled 2x2 blocks."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
    kernel = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    expected = F.conv2d(x, kernel, padding=2)
    phases = F.conv2d(F.pixel_unshuffle(x, 2),
                      fast_fpn.unshuffled_kernel(kernel), padding=1)
    torch.testing.assert_close(fast_fpn._interleaved(phases), expected,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('sizes', [(2, 2), (2, 6), (8, 6), (10, 14)])
@pytest.mark.parametrize('by_winograd', [False, True])
def test_finest_level_through_a_head_conv_equals_both_steps_in_float64(
        monkeypatch, sizes, training, by_winograd):
    """The composed convolution, with its four edges corrected, equals FPN's
    finest output followed by the ConvModule (eval BN folded, or training
    BN after it): outputs and every gradient, in float64; with its
    transposed convolution's phases by Winograd too."""
    phases = winograd_phases_everywhere(monkeypatch) if by_winograd else []
    calls = count_head_compositions(monkeypatch)
    results = []
    for composed in (True, False):
        level = finest_level(sizes, requires_grad=True,
                             channels_last=by_winograd)
        module = head_conv().train(training)
        out = level.through(module) if composed else two_steps(level,
                                                               module)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype)
        (out * weights.view_as(out)).sum().backward()
        params = [level.feature, level.coarse_lateral, *module.parameters(),
                  *level.fpn_conv.parameters(),
                  *level.lateral_conv.parameters()]
        results.append((out, [p.grad for p in params]))
    (ours, our_grads), (ref, ref_grads) = results
    assert calls == [1] and len(phases) == by_winograd
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_winograd_phases_are_kept_between_inference_calls(monkeypatch):
    """Without autograd, the phases' weight and its Winograd transform are
    made once while the weights stay the same, also across calls under
    autocast (which do not use them), and anew after a change."""
    from poolformer_seg.models import winograd
    winograd_phases_everywhere(monkeypatch)
    made = count_calls(monkeypatch, '_winograd_phases')
    kernels = count_calls(monkeypatch, 'composed_kernels')
    level = finest_level((8, 6), channels_last=True)
    module = head_conv().eval()
    with torch.no_grad():
        for autocast in (False, True, False):
            with torch.autocast('cpu', torch.bfloat16, enabled=autocast):
                out = level.through(module)
            if not autocast:
                torch.testing.assert_close(out, two_steps(level, module),
                                           rtol=0, atol=1e-10)
        assert len(made) == 1 and len(kernels) == 1
        module.conv.weight.mul_(-2)
        torch.testing.assert_close(level.through(module),
                                   two_steps(level, module), rtol=0,
                                   atol=1e-10)
    assert len(made) == 2
    weight, transformed = fast_fpn._winograd_phases(
        torch.ones(4, 3, 5, 5), torch.ones(16, 4, 6, 6))
    assert transformed.shape == (36, 3 * 4 + 16, 16)
    torch.testing.assert_close(transformed, winograd.winograd_weight(weight))
    with torch.enable_grad():
        _, transformed = fast_fpn._winograd_phases(
            torch.ones(4, 3, 5, 5, requires_grad=True),
            torch.ones(16, 4, 6, 6))
    assert transformed is None  # autograd transforms the weight itself


@pytest.mark.parametrize('channels_last', [False, True])
def test_finest_level_through_a_head_conv_in_fp32_and_bf16(monkeypatch,
                                                          channels_last):
    calls = count_head_compositions(monkeypatch)
    level = finest_level((16, 12), dtype=torch.float32)
    module = head_conv(dtype=torch.float32).eval()
    if channels_last:
        level.feature = level.feature.contiguous(
            memory_format=torch.channels_last)
    with torch.no_grad():
        ref = two_steps(level, module)
        ours = level.through(module)
        with torch.autocast('cpu', torch.bfloat16):
            low = level.through(module)
    assert len(calls) == 2 and low.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    scale = ref.abs().max()
    assert (low.float() - ref).abs().max() < 0.02 * scale


@pytest.mark.parametrize('case', ['switched off', '1x1', 'dilated',
                                  'more multiply-adds', 'winograd'])
def test_finest_level_is_computed_first_where_composing_does_not_apply(
        monkeypatch, case):
    kwargs = {}
    if case == 'switched off':
        monkeypatch.setattr(fast_fpn, 'COMPOSE_HEAD', False)
    elif case == '1x1':
        kwargs = dict(kernel_size=1, padding=0)
    elif case == 'dilated':
        kwargs = dict(dilation=2, padding=2)
    elif case == 'more multiply-adds':  # 25 * 3 * 20 >= (27 + 64) * 16
        kwargs = dict(out_channels=20)
    else:
        monkeypatch.setattr(fast_fpn, 'winograd_preferred', lambda *a: True)
    calls = count_head_compositions(monkeypatch)
    level = finest_level()
    module = head_conv(**kwargs).eval()
    with torch.no_grad():
        ours, ref = level.through(module), two_steps(level, module)
    assert calls == [] and not level.composes_with(module)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


def test_forward_defers_the_finest_output_only_when_asked():
    plain, fast = make_pair(**FEW)
    fast.double()
    inputs = few_channel_features(HALVING)
    with torch.no_grad():
        deferred, computed = fast(inputs, defer_finest=True), fast(inputs)
    assert isinstance(deferred[0], fast_fpn.FinestLevel)
    assert all(isinstance(x, torch.Tensor) for x in computed)
    torch.testing.assert_close(deferred[0].compute(), computed[0], rtol=0,
                               atol=0)
    for a, b in zip(deferred[1:], computed[1:]):
        assert torch.equal(a, b)


def test_composed_finest_output_follows_changed_weights():
    plain, fast = make_pair(**FEW)
    plain.double(), fast.double()
    inputs = few_channel_features(HALVING)
    for step in range(2):
        with torch.no_grad():
            torch.testing.assert_close(fast(inputs)[0], plain(inputs)[0],
                                       rtol=0, atol=1e-12)
            for neck in (plain, fast):
                neck.fpn_convs[0].conv.weight.mul_(-2)
                neck.lateral_convs[0].conv.weight.add_(1)
