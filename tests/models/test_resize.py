"""``resize_scores``: mmseg's bilinear resize of class scores, by separable
passes on the CPU for whole-number factors, else PyTorch's kernel."""
import pytest
import torch
import torch.nn.functional as F

from poolformer_seg.models import resize as resize_module
from poolformer_seg.models.resize import input_size, resize_scores


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype,
                       generator=torch.Generator().manual_seed(0))


def interpolated(x, size, align_corners=False):
    return F.interpolate(x, size=size, mode='bilinear',
                         align_corners=align_corners)


def count_lerps(monkeypatch):
    """Replace ``torch.lerp`` inside the module by a counting wrapper."""
    calls = []
    real = torch.lerp

    def lerp(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(resize_module.torch, 'lerp', lerp)
    return calls


@pytest.mark.parametrize('factors, channels, size', [
    ((4, 4), 150, (13, 17)),  # a head's stride, channels not a whole group
    ((3, 5), 19, (7, 6)),     # odd and unequal factors
    ((1, 2), 9, (5, 5)),      # one axis kept
    ((4, 4), 8, (1, 1)),      # a single pixel: edges only
])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format,
                                           torch.channels_last])
def test_equals_pytorchs_resize_in_float64(factors, channels, size,
                                           memory_format, monkeypatch):
    calls = count_lerps(monkeypatch)
    x = randn(2, channels, *size, dtype=torch.float64).contiguous(
        memory_format=memory_format)
    out_size = (factors[0] * size[0], factors[1] * size[1])
    out = resize_scores(x, out_size, align_corners=False)
    assert calls, 'the separable passes did not run'
    assert out.dtype == torch.float64 and out.is_contiguous()
    torch.testing.assert_close(out, interpolated(x, out_size), rtol=0,
                               atol=1e-12)


def test_fp32_within_a_few_ulps_of_pytorchs():
    x = randn(1, 150, 32, 32) * 10
    ref = interpolated(x.double(), (128, 128))
    ours = (resize_scores(x, (128, 128), False).double() - ref).abs().max()
    torch_own = (interpolated(x, (128, 128)).double() - ref).abs().max()
    assert ours <= 2 * torch_own + 1e-6


def test_reduced_precision_rounds_once_at_the_end():
    """fp32 scores into bf16: within one rounding (2**-8 relative, bf16
    keeps 8 bits) of the fp32 resize, where PyTorch's resize of the
    rounded scores (mmseg's route under autocast) rounds twice."""
    x = randn(1, 150, 32, 32) * 10
    exact = interpolated(x, (128, 128))
    ours = resize_scores(x, (128, 128), False, torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    error = (ours.float() - exact).abs()
    bound = 2**-8 * exact.abs() + 1e-6 * exact.abs().max()  # + fp32's
    assert (error <= bound).all()
    theirs = (interpolated(x.bfloat16(), (128, 128)).float() - exact).abs()
    assert not (theirs <= bound).all()
    assert error.mean() < 0.8 * theirs.mean()


@pytest.mark.parametrize('case', ['align_corners', 'not whole', 'smaller',
                                  'switch off'])
def test_other_resizes_are_pytorchs(case, monkeypatch):
    calls = count_lerps(monkeypatch)
    x = randn(1, 5, 8, 8)
    size, align_corners = {'align_corners': ((29, 29), True),
                           'not whole': ((20, 32), False),
                           'smaller': ((4, 4), False),
                           'switch off': ((32, 32), False)}[case]
    if case == 'switch off':
        monkeypatch.setattr(resize_module, 'SEPARABLE_ON_CPU', False)
    out = resize_scores(x, size, align_corners, torch.bfloat16)
    assert not calls
    assert torch.equal(out, interpolated(x.bfloat16(), size, align_corners))


def test_a_gradient_to_record_takes_pytorchs_resize(monkeypatch):
    calls = count_lerps(monkeypatch)
    x = randn(1, 3, 4, 4, dtype=torch.float64).requires_grad_()
    resize_scores(x, (16, 16), False).square().sum().backward()
    assert not calls
    ref = x.detach().requires_grad_()
    interpolated(ref, (16, 16)).square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)
    with torch.no_grad():
        resize_scores(x, (16, 16), False)
    assert calls


def test_meta_tensors_keep_shape_and_dtype():
    x = torch.empty(2, 150, 16, 24, device='meta')
    out = resize_scores(x, (64, 96), False, torch.bfloat16)
    assert out.device.type == 'meta' and out.dtype == torch.bfloat16
    assert out.shape == (2, 150, 64, 96)


def test_input_size_is_mmsegs():
    assert input_size({'img_shape': torch.Size([64, 96])}) == (64, 96)
    assert input_size({'img_shape': (60, 90),
                       'pad_shape': (64, 96, 3)}) == (64, 96)
    assert input_size({'img_shape': (60, 90)}) == (60, 90)


def test_fake_cpu_tensors_keep_shape_and_dtype(monkeypatch):
    """Under ``FakeTensorMode`` (shapes and devices, no data) the separable
    passes run and make nothing on another device."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    calls = count_lerps(monkeypatch)
    with FakeTensorMode():
        x = torch.empty(2, 150, 16, 24)
        out = resize_scores(x, (64, 96), False, torch.bfloat16)
    assert calls and isinstance(out, FakeTensor)
    assert out.device.type == 'cpu' and out.dtype == torch.bfloat16
    assert out.shape == (2, 150, 64, 96)
