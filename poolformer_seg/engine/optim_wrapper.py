"""Mixed precision where CUDA is available, fp32 elsewhere, from one config."""
import torch
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmseg.registry import OPTIM_WRAPPERS


def amp_dtype() -> str:
    """``'bfloat16'`` on GPUs that support it, else ``'float16'``."""
    return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'


@OPTIM_WRAPPERS.register_module()
def AmpOnCudaOptimWrapper(optimizer, **kwargs) -> OptimWrapper:  # noqa: N802
    """Build an ``AmpOptimWrapper`` on CUDA and an ``OptimWrapper`` otherwise.

    mmseg's PoolFormer configs use ``AmpOptimWrapper``, which asserts a GPU;
    this lets the same config train on CPU-only machines, in fp32.

    On CUDA the autocast dtype is bf16 where the GPU supports it (Ampere and
    newer: no loss scaling needed, so the scaler is disabled) and fp16 with a
    dynamic loss scale otherwise. Other keyword arguments (``clip_grad``,
    ``accumulative_counts``) go to the wrapper as usual.

    Registered as a function under the name of the type it stands for; the
    object it returns is a plain mmengine wrapper, so checkpoints and resume
    are those of mmengine (an fp16 run stores its loss-scaler state).
    """
    for key in ('dtype', 'loss_scale'):
        if key in kwargs:
            raise ValueError(f'AmpOnCudaOptimWrapper chooses {key} itself; '
                             'use type=AmpOptimWrapper to set it')
    if not torch.cuda.is_available():
        print_log('AmpOnCudaOptimWrapper: no CUDA device, training in fp32 '
                  '(OptimWrapper)', logger='current')
        return OptimWrapper(optimizer=optimizer, **kwargs)
    dtype = amp_dtype()
    loss_scale = dict(enabled=False) if dtype == 'bfloat16' else 'dynamic'
    print_log(f'AmpOnCudaOptimWrapper: mixed precision with {dtype} '
              f'(loss scale: {loss_scale})', logger='current')
    return AmpOptimWrapper(optimizer=optimizer, dtype=dtype,
                           loss_scale=loss_scale, **kwargs)
