"""AmpOnCudaOptimWrapper: AMP on CUDA, fp32 OptimWrapper elsewhere."""
import pytest
import torch

import poolformer_seg  # noqa: F401  (before mmseg)
import mmengine.optim.optimizer.amp_optimizer_wrapper as amp_module
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import init_default_scope
from mmseg.registry import OPTIM_WRAPPERS


def build(**kwargs):
    init_default_scope('mmseg')
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    return OPTIM_WRAPPERS.build(
        dict(type='AmpOnCudaOptimWrapper', **kwargs),
        default_args=dict(optimizer=optimizer))


def fake_cuda(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: bf16)
    # AmpOptimWrapper asserts a GPU through mmengine's own check
    monkeypatch.setattr(amp_module, 'is_cuda_available', lambda: True)


def test_cpu_is_plain_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    wrapper = build(clip_grad=dict(max_norm=1.0))
    assert type(wrapper) is OptimWrapper
    assert wrapper.clip_grad_kwargs == dict(max_norm=1.0)


@pytest.mark.filterwarnings('ignore::FutureWarning')  # mmengine's GradScaler
def test_cuda_with_bf16(monkeypatch):
    fake_cuda(monkeypatch, bf16=True)
    wrapper = build()
    assert isinstance(wrapper, AmpOptimWrapper)
    assert wrapper.cast_dtype == torch.bfloat16
    assert not wrapper.loss_scaler.is_enabled()  # bf16 needs no scaling


@pytest.mark.filterwarnings('ignore::UserWarning')  # GradScaler without CUDA
@pytest.mark.filterwarnings('ignore::FutureWarning')
def test_cuda_without_bf16_uses_fp16_dynamic_scale(monkeypatch):
    fake_cuda(monkeypatch, bf16=False)
    wrapper = build()
    assert isinstance(wrapper, AmpOptimWrapper)
    assert wrapper.cast_dtype == torch.float16
    assert wrapper._scale_update_param is None  # dynamic, not a fixed scale


def test_refuses_dtype_and_loss_scale():
    with pytest.raises(ValueError, match='dtype'):
        build(dtype='float16')
    with pytest.raises(ValueError, match='loss_scale'):
        build(loss_scale=512.)
