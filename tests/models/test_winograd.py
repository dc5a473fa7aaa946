"""Winograd F(4x4, 3x3) computes PyTorch's 3x3 convolution, is used exactly
where the docs say, and the FPN neck and head that use it still compute
mmseg's FPN and FPNHead."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmseg.models.decode_heads import FPNHead
from mmseg.models.necks import FPN
from torch._subclasses.fake_tensor import FakeTensorMode

from poolformer_seg.models import FastFPN, FastFPNHead, winograd
from poolformer_seg.models.winograd import (
    MIN_PIXELS,
    conv_module_forward,
    winograd_applies,
    winograd_conv3x3,
)
from tests.helpers.upstream import randomize_

# sizes around the 4x4 tiles: smaller than one tile, odd, not multiples
SHAPES = [(2, 5, 7, 1, 1), (1, 8, 3, 13, 9), (2, 16, 12, 37, 50)]


def _inputs(batch, channels, out_channels, height, width, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=gen,
                    dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, channels, 3, 3, generator=gen,
                         dtype=dtype)
    bias = torch.randn(out_channels, generator=gen, dtype=dtype)
    return x, weight, bias


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('with_bias', [True, False])
def test_equals_conv2d_in_float64(shape, with_bias):
    x, weight, bias = _inputs(*shape, torch.float64)
    bias = bias if with_bias else None
    out = winograd_conv3x3(x, weight, bias)
    expected = F.conv2d(x, weight, bias, padding=1)
    assert out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('shape', SHAPES + [(1, 64, 32, 66, 67)])
def test_float32_rounding_stays_small(shape):
    x, weight, bias = _inputs(*shape, torch.float32)
    exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    out = winograd_conv3x3(x, weight, bias).double()
    assert (out - exact).abs().max() <= 1e-5 * exact.abs().max()


def _conv(**kwargs):
    return nn.Conv2d(8, 6, kwargs.pop('kernel_size', 3),
                     padding=kwargs.pop('padding', 1), **kwargs)


def _map(pixels=MIN_PIXELS, width=64, channels=8):
    return torch.randn(1, channels, -(-pixels // width), width).contiguous(
        memory_format=torch.channels_last)


def test_applies_only_to_large_cpu_inference_in_full_precision(winograd_on):
    conv = _conv()
    with torch.no_grad():
        assert winograd_applies(conv, _map())
        assert not winograd_applies(conv, _map(MIN_PIXELS - 64))  # small
        assert not winograd_applies(conv, _map().contiguous())  # NCHW
        assert not winograd_applies(_conv(stride=2), _map())
        assert not winograd_applies(_conv(dilation=2, padding=2), _map())
        assert not winograd_applies(_conv(kernel_size=1, padding=0), _map())
        assert not winograd_applies(conv, _map().bfloat16())
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not winograd_applies(conv, _map())
    # training too: the backward is Winograd's
    assert winograd_applies(conv, _map().requires_grad_())
    meta = _conv(device='meta')
    with torch.no_grad():
        assert not winograd_applies(meta, _map().to('meta'))


def test_runs_on_fake_tensors_without_touching_another_device():
    # every constant is made on the input's device: FakeTensorMode would
    # reject a real CPU tensor meeting the fake inputs
    with FakeTensorMode():
        x = torch.empty(2, 16, 30, 41).contiguous(
            memory_format=torch.channels_last)
        out = winograd_conv3x3(x, torch.empty(4, 16, 3, 3), torch.empty(4))
    assert out.shape == (2, 4, 30, 41)
    x = torch.empty(2, 16, 30, 41, device='meta')
    meta = winograd_conv3x3(x, torch.empty(4, 16, 3, 3, device='meta'))
    assert meta.shape == (2, 4, 30, 41) and meta.device.type == 'meta'


def test_applies_only_on_the_cpus_where_it_was_measured_faster(monkeypatch):
    conv, x = _conv(), _map()
    monkeypatch.setattr(winograd, 'ON_THIS_CPU', False)
    with torch.no_grad():
        assert not winograd_applies(conv, x)
    monkeypatch.setattr(winograd, 'ON_THIS_CPU', True)
    with torch.no_grad():
        assert winograd_applies(conv, x)


def test_on_this_cpu_follows_the_capability():
    capability = torch.backends.cpu.get_cpu_capability()
    assert winograd.ON_THIS_CPU == (capability in winograd.FASTER_ON)
    assert winograd.BEFORE_COMPOSITIONS == (
        capability in winograd.BEFORE_COMPOSITIONS_ON)
    assert set(winograd.BEFORE_COMPOSITIONS_ON) <= set(winograd.FASTER_ON)


@pytest.mark.parametrize('before', [False, True])
def test_preferred_to_compositions_only_where_measured_so(monkeypatch,
                                                         winograd_on, before):
    monkeypatch.setattr(winograd, 'BEFORE_COMPOSITIONS', before)
    with torch.no_grad():
        assert winograd.winograd_preferred(_conv(), _map()) is before
        # never where it does not apply at all
        assert not winograd.winograd_preferred(_conv(), _map(64))


def test_weight_transform_and_its_adjoint():
    """``U = G g G^T`` per channel pair (``36 x C x K``), and ``G^T dU G``
    its adjoint, for ``dU`` in the transposed layout (``36 x K x C``):
    ``<U(g), dU> = <g, U^T(dU)>``."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    g = torch.tensor(winograd._G, dtype=torch.float64)
    u = winograd._transform_weight(weight)
    for k, c in ((0, 0), (4, 3), (2, 1)):
        want = g @ weight[k, c] @ g.t()
        torch.testing.assert_close(u[:, c, k].view(6, 6), want, rtol=0,
                                   atol=1e-14)
    grad_u = torch.randn(36, 5, 4, generator=gen, dtype=torch.float64)
    grad_w = winograd._transform_weight_grad(grad_u)
    assert grad_w.shape == weight.shape
    torch.testing.assert_close((u * grad_u.transpose(1, 2)).sum(),
                               (weight * grad_w).sum(), rtol=1e-12, atol=0)


@pytest.fixture
def counted(monkeypatch, winograd_on):
    """Counts the calls of :func:`winograd_conv3x3`."""
    calls = []
    real = winograd.winograd_conv3x3

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(winograd, 'winograd_conv3x3', counting)
    return calls


def _conv_module(**kwargs):
    module = ConvModule(8, 6, 3, padding=1, norm_cfg=dict(type='BN'),
                        **kwargs).double()
    return randomize_(module, 0).eval()


def test_conv_module_folds_eval_batch_norm_and_uses_winograd(counted):
    module = _conv_module()
    x = _map(pixels=70 * 64).double()
    with torch.no_grad():
        out = conv_module_forward(module, x)
        expected = module(x)
    assert len(counted) == 1
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('with_bias', [True, False])
def test_backward_passes_gradcheck(with_bias):
    x, weight, bias = _inputs(1, 3, 2, 6, 9, torch.float64)
    inputs = (x.requires_grad_(), weight.requires_grad_(),
              bias.requires_grad_() if with_bias else None)
    assert torch.autograd.gradcheck(winograd_conv3x3, inputs)


def test_gradients_equal_conv2d_in_float64():
    x, weight, bias = _inputs(2, 16, 12, 37, 50, torch.float64)
    grad = torch.randn(2, 12, 37, 50, dtype=torch.float64)
    results = []
    for conv in (winograd_conv3x3, lambda *a: F.conv2d(*a, padding=1)):
        leaves = [t.detach().clone().requires_grad_()
                  for t in (x, weight, bias)]
        conv(*leaves).backward(grad)
        results.append([t.grad for t in leaves])
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('band_rows', [1, 3])
def test_bands_of_tile_rows_give_the_whole_convolution(monkeypatch,
                                                       band_rows):
    """Cut into bands of 1 or 3 tile rows (10 tile rows in all, the last
    one cropped), the forward and both gradients are still the direct
    convolution's, in float64."""
    x, weight, bias = _inputs(2, 16, 12, 37, 50, torch.float64)
    row_bytes = 36 * 2 * 13 * 16 * 8  # 13 tiles wide, max(C, K) = 16
    monkeypatch.setattr(winograd, 'BAND_BYTES', band_rows * row_bytes)
    bands = winograd._bands(x, 16)
    assert len(bands) == -(-10 // band_rows)
    assert all(b.stop - b.start <= band_rows for b in bands)
    grad = torch.randn(2, 12, 37, 50, dtype=torch.float64)
    results = []
    for conv in (winograd_conv3x3, lambda *a: F.conv2d(*a, padding=1)):
        leaves = [t.detach().clone().requires_grad_()
                  for t in (x, weight, bias)]
        out = conv(*leaves)
        out.backward(grad)
        results.append([out.detach()] + [t.grad for t in leaves])
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('size', [128, 512])
def test_bands_bound_the_transformed_tiles(size):
    """Bands cover the tile rows in order, each within ``BAND_BYTES``, or of
    one tile row where one row alone is larger (512x512 maps of 2 x 256
    channels: 9.4 MB a row)."""
    x = torch.empty(2, 256, size, size, device='meta')
    bands = winograd._bands(x, 256)
    tiles = size // 4
    row_bytes = 36 * 2 * tiles * 256 * 4
    for band in bands:
        rows = band.stop - band.start
        assert rows * row_bytes <= winograd.BAND_BYTES or rows == 1
    if 2 * row_bytes <= winograd.BAND_BYTES:
        assert max(b.stop - b.start for b in bands) > 1
    assert bands[0].start == 0 and bands[-1].stop == tiles
    assert all(a.stop == b.start for a, b in zip(bands, bands[1:]))


def test_backward_keeps_only_the_input_and_weight():
    x, weight, bias = _inputs(1, 8, 4, 70, 64, torch.float32)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    out = winograd_conv3x3(*leaves)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 2 and saved[0] is x and saved[1] is weight


def test_conv_module_in_training_uses_winograd_then_its_norm(counted):
    """A BatchNorm in training mode stays a separate step after the
    convolution: the same loss, gradients and running statistics."""
    ours, ref = _conv_module().train(), _conv_module().train()
    x = _map(pixels=70 * 64).double()
    out, expected = conv_module_forward(ours, x), ref(x)
    assert len(counted) == 1
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    out.square().sum().backward(), expected.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9,
                                   msg=name)
    torch.testing.assert_close(ours.norm.running_var, ref.norm.running_var)


def test_frozen_batch_norm_is_folded_in_training(counted):
    ours, ref = _conv_module(), _conv_module()  # eval BN, trainable conv
    x = _map(pixels=70 * 64).double()
    out, expected = conv_module_forward(ours, x), ref(x)
    assert len(counted) == 1
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    out.sum().backward(), expected.sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9,
                                   msg=name)


NECK = dict(in_channels=[4, 6, 8, 10], out_channels=5, num_outs=4)
# the first level is above MIN_PIXELS, and not a multiple of 4 or 32
LEVELS = [(66, 70), (33, 35), (17, 18), (9, 9)]


def _features(channels, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(1, c, h, w, generator=gen, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
        for c, (h, w) in zip(channels, LEVELS)]


def test_fast_fpn_equals_fpn_with_winograd(counted):
    plain = randomize_(FPN(**NECK), 0).double().eval()
    fast = FastFPN(**NECK).double().eval()
    fast.load_state_dict(plain.state_dict())
    inputs = _features(NECK['in_channels'])
    with torch.no_grad():
        ours, ref = fast(inputs), plain(inputs)
    assert counted == [(1, 5, 66, 70)]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fast_fpn_head_equals_fpn_head_with_winograd(counted):
    cfg = dict(in_channels=[8, 8, 8, 8], in_index=[0, 1, 2, 3],
               feature_strides=[4, 8, 16, 32], channels=6, dropout_ratio=0.,
               num_classes=5, norm_cfg=dict(type='BN'), align_corners=False)
    plain = randomize_(FPNHead(**cfg), 0).double().eval()
    fast = FastFPNHead(**cfg).double().eval()
    fast.load_state_dict(plain.state_dict())
    inputs = _features([8] * 4)
    with torch.no_grad():
        ours, ref = fast(inputs), plain(inputs)
    # the stride-4 scale head and the last 3x3 of each coarser scale head
    # (applied at half the stride-4 size, 33x35, below MIN_PIXELS: direct)
    assert counted == [(1, 8, 66, 70)]
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
