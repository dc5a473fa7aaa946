"""Workarounds for the pinned OpenMMLab stack, kept in one place.

Everything here exists because of a defect in a dependency, not because of a
design choice of ours. Each workaround says which versions need it, so that it
can be deleted when the dependency is fixed.

1. ``mmcv.ops`` without compiled ops (mmcv-lite 2.1.0, mmseg 1.2.2).
   mmcv-lite ships the Python files of ``mmcv/ops`` but not the compiled
   ``mmcv._ext``; importing ``mmcv.ops`` therefore fails. mmseg 1.2.2 imports
   ``mmcv.ops`` unconditionally from ``mmseg.utils``, ``mmseg.models.utils``,
   ``mmseg.models.losses`` and ``san_head``, so nothing of mmseg's models,
   datasets or runner imports on mmcv-lite (open-mmlab/mmsegmentation#871).
   :func:`apply` installs a stand-in ``mmcv.ops`` module before mmseg is
   imported. ``point_sample`` is pure PyTorch in mmcv and is loaded from mmcv's
   own source file; every other op is an :class:`UnavailableOp` that imports
   fine and raises :class:`MissingMmcvOpError` when it is used, so a model that
   needs a compiled op fails loudly at build time instead of at import time,
   and never computes a wrong result. With full mmcv installed nothing is done.
   mmcv's ``cnn.bricks.transformer`` then warns once that it cannot import
   ``MultiScaleDeformableAttention``: that warning is silenced with the
   stand-in, since using the op raises :class:`MissingMmcvOpError` anyway.
   The stand-in is the top-level module ``_poolformer_seg_mmcv_lite``; the
   ``poolformer_seg_mmcv_lite.pth`` file installed with the package registers
   it as an import hook for ``mmcv.ops`` at interpreter start, so that
   ``from mmseg.apis import init_model`` works even before
   ``import poolformer_seg``.

2. ``torch.load`` in mmengine 0.10.7 (torch >= 2.6).
   mmengine calls ``torch.load`` without ``weights_only``, so torch's default
   (``True``) refuses mmengine's own training checkpoints. Fixed on mmengine
   main (PR #1670) but unreleased. :func:`apply` routes mmengine's local and
   http checkpoint loaders through :func:`poolformer_seg.utils.safe_load.load`,
   which keeps ``weights_only=True`` with a minimal allowlist.

3. Lenient model loading in mmengine 0.10.x: its ``load_state_dict`` only
   warns about missing or mis-shaped weights. For models with a
   poolformer_seg backbone it is made strict (see
   :func:`_check_mmengine_state_dict_loading`).

Call :func:`apply` before the first import of ``mmseg.models``; importing
``poolformer_seg`` does it, and so do the scripts in ``tools/``.

The second half of this module holds every use of a private or
version-dependent PyTorch, NumPy or MMEngine API in the package, each behind a
function that checks for it and falls back (see "Private and
version-dependent APIs" below), so that the supported range of each
dependency is stated in ``setup.py`` rather than pinned.
"""
import contextlib
import sys

import torch
# The mmcv.ops stand-in lives in a top-level module so that the .pth file
# installed with the package can put it in place before mmseg is imported
# (workaround 1); re-exported here.
from _poolformer_seg_mmcv_lite import (MissingMmcvOpError, UnavailableOp,
                                       full_mmcv_available, install_stand_in)

__all__ = ['apply', 'full_mmcv_available', 'MissingMmcvOpError',
           'UnavailableOp', 'register_load_state_dict_pre_hook',
           'torch_safe_globals', 'numpy_core', 'cpu_computes_natively',
           'onednn_linear', 'pool_excluding_padding',
           'pool_excluding_padding_backward',
           'is_compiling', 'autocast_dtype',
           'runner_resume', 'set_runner_load_from', 'built_train_loop',
           'built_eval_loop',
           'train_dataloader_cfg', 'diff_rank_seed',
           'infinite_dataloader_iterator']

def _require_mmcv() -> None:
    """mmcv is not in ``install_requires`` (full mmcv or mmcv-lite provide
    it, and pip cannot express "either"): say what to install."""
    try:
        import mmcv  # noqa: F401
    except ImportError:
        raise ImportError(
            'poolformer_seg needs mmcv 2.0 or 2.1: keep a full mmcv you '
            'already have, or install the pure-Python one with '
            '`pip install "mmcv-lite>=2.0.0,<2.2.0"` (or '
            '`pip install "poolformer_seg[lite]"`)') from None


def _route_mmengine_loading() -> None:
    from poolformer_seg.utils.safe_load import register_mmengine_loaders
    register_mmengine_loaders()
    _check_mmengine_state_dict_loading()


def _check_mmengine_state_dict_loading() -> None:
    """Workaround 3: mmengine loads models leniently (0.10.x).

    ``mmengine.runner.checkpoint.load_state_dict`` -- where
    ``load_checkpoint``, ``Runner.load_checkpoint`` (``load_from``,
    ``--resume``, mmseg's ``tools/test.py``), ``mmseg.apis.init_model`` and
    ``MMSegInferencer`` all end -- only warns about missing and mis-shaped
    weights and leaves them random. It is wrapped so that the state dict
    first passes :func:`poolformer_seg.utils.loading.checked_for_mmengine`,
    which converts and checks it for models with a poolformer_seg backbone
    and leaves every other model to mmengine. The callers look the function
    up in its module at call time, so the order of imports does not matter.
    """
    import mmengine.runner as mm_runner
    import mmengine.runner.checkpoint as mm_checkpoint
    from poolformer_seg.utils.loading import checked_for_mmengine
    original = mm_checkpoint.load_state_dict
    if getattr(original, 'poolformer_seg_checked', False):
        return

    def load_state_dict(module, state_dict, strict=False, logger=None):
        return original(module, checked_for_mmengine(module, state_dict),
                        strict, logger)

    load_state_dict.__doc__ = original.__doc__
    load_state_dict.poolformer_seg_checked = True
    mm_checkpoint.load_state_dict = load_state_dict
    mm_runner.load_state_dict = load_state_dict


_applied = False


def apply() -> None:
    """Apply every workaround once; safe to call repeatedly."""
    global _applied
    if _applied:
        return
    _require_mmcv()
    if not full_mmcv_available() and 'mmcv.ops' not in sys.modules:
        install_stand_in()
    _route_mmengine_loading()
    _applied = True


# ----------------------------------------------------------------------------
# Private and version-dependent APIs. Each function names the versions that
# have the API and what it does without it; ``tests/test_compat.py`` runs
# every fallback.


def _has_torch(major: int, minor: int) -> bool:
    version = tuple(int(p) for p in torch.__version__.split('+')[0]
                    .split('.')[:2])
    return version >= (major, minor)


def register_load_state_dict_pre_hook(module: torch.nn.Module, hook):
    """``module.register_load_state_dict_pre_hook(hook)``.

    Public from torch 2.5; before that the same hook (called with the module
    first) is registered by ``_register_load_state_dict_pre_hook(hook,
    with_module=True)``.
    """
    public = getattr(module, 'register_load_state_dict_pre_hook', None)
    if public is not None:
        return public(hook)
    return module._register_load_state_dict_pre_hook(hook, with_module=True)


def torch_safe_globals(allowed: list):
    """Context in which ``torch.load(weights_only=True)`` accepts ``allowed``.

    ``torch.serialization.safe_globals`` exists from torch 2.5. Older torch
    has no way to widen the weights-only allowlist for one call: there the
    context does nothing, so training checkpoints (which pickle mmengine's
    ``HistoryBuffer``) are refused with a message, and plain weights load.
    """
    safe_globals = getattr(torch.serialization, 'safe_globals', None)
    if safe_globals is None:
        return contextlib.nullcontext()
    return safe_globals(allowed)


def autocast_dtype(device_type: str):
    """The dtype autocast computes in on ``device_type``, or None when it
    is off there (always on ``meta``, which has no autocast).

    ``torch.is_autocast_enabled(device_type)`` and
    ``torch.get_autocast_dtype`` take a device from torch 2.4; before that
    only CPU and CUDA have autocast, each with its own functions.
    """
    if device_type == 'meta':
        return None
    if _has_torch(2, 4):
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    if device_type == 'cpu':
        return torch.get_autocast_cpu_dtype() \
            if torch.is_autocast_cpu_enabled() else None
    if device_type == 'cuda':
        return torch.get_autocast_gpu_dtype() \
            if torch.is_autocast_enabled() else None
    return None


def numpy_core():
    """``numpy._core`` (NumPy 2), ``numpy.core`` before."""
    import numpy as np
    return getattr(np, '_core', None) or np.core


def cpu_computes_natively(dtype: torch.dtype) -> bool:
    """Whether oneDNN has products in ``dtype`` on this CPU.

    bf16 needs AVX512-BF16 or AMX and fp16 AVX512-FP16 or AMX-FP16; without
    them oneDNN's bf16/fp16 convolutions run reference kernels, tens of
    times slower than fp32. Asked through the private
    ``torch.ops.mkldnn._is_mkldnn_{bf16,fp16}_supported`` (torch >= 2.0);
    where a check is missing the answer is True, so nothing is refused on a
    guess. fp32 and fp64 are always native.
    """
    name = {torch.bfloat16: '_is_mkldnn_bf16_supported',
            torch.float16: '_is_mkldnn_fp16_supported'}.get(dtype)
    if name is None:
        return True
    check = getattr(getattr(torch.ops, 'mkldnn', None), name, None)
    return check is None or bool(check())


def onednn_linear(x, weight, bias, gelu: bool):
    """oneDNN's ``x @ weight.T + bias`` (+ GELU) on CPU, or None.

    ``torch.ops.mkldnn._linear_pointwise`` (torch >= 2.1 built with MKLDNN,
    the op inductor emits for this fusion) takes an fp32 bias with bf16
    operands and applies the GELU to the fp32 accumulator. Returns None where
    the op is missing, for dtypes other than fp32, bf16 and fp16 (oneDNN has
    no float64 products), or where the processor has no products in
    ``x``'s dtype for oneDNN (bf16 on AVX2-only CPUs, see
    :func:`cpu_computes_natively`); the caller then computes the same with
    public ops.
    """
    op = getattr(getattr(torch.ops, 'mkldnn', None), '_linear_pointwise',
                 None)
    if op is None or not torch.backends.mkldnn.is_available() or \
            x.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or not cpu_computes_natively(x.dtype):
        return None
    return op(x, weight, bias, 'gelu' if gelu else 'none', [], 'none')


# torch < 2.14 on CUDA (pytorch/pytorch#188344, fixed by PR #188345, merged
# in July 2026; the first release with the fix is taken to be 2.14): the
# channels_last kernel of avg_pool2d's backward leaves the padding out of
# the input coordinates, so a padded pooling's input gradient is silently
# wrong (the forward is right). Measured on torch 2.11 on an H200: the fused
# PoolFormer block's input gradient was 30-64% off in every block, with
# every other gradient right. The NCHW kernel is right.
_NHWC_POOL_BACKWARD_FIXED = (2, 14)


def _pool_backward_needs_nchw(x) -> bool:
    """Whether the input gradient of a padded pooling of ``x`` must be
    computed in NCHW: a channels_last ``x`` on CUDA, before the fix."""
    return (x.device.type == 'cuda' and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
            and not _has_torch(*_NHWC_POOL_BACKWARD_FIXED))


def pool_excluding_padding(x, size: int):
    """``F.avg_pool2d(x, size, 1, size // 2, count_include_pad=False)``,
    the pooling of PoolFormer's token mixer (odd ``size``).

    Where autograd will differentiate it and :func:`_pool_backward_needs_nchw`,
    a contiguous copy of ``x`` is pooled, so that the backward runs the
    correct NCHW kernel; the values are the same.
    """
    if x.requires_grad and torch.is_grad_enabled() and \
            _pool_backward_needs_nchw(x):
        x = x.contiguous()
    return torch.nn.functional.avg_pool2d(x, size, 1, size // 2,
                                          count_include_pad=False)


def pool_excluding_padding_backward(grad, x, size: int):
    """Input gradient of :func:`pool_excluding_padding` at ``x``, given the
    output gradient ``grad`` (same shape as ``x``); NCHW where
    :func:`_pool_backward_needs_nchw`, else in ``x``'s memory format."""
    if _pool_backward_needs_nchw(x):
        grad, x = grad.contiguous(), x.contiguous()
    pad = size // 2
    return torch.ops.aten.avg_pool2d_backward(grad, x, [size, size], [1, 1],
                                              [pad, pad], False, False, None)


def is_compiling() -> bool:
    """Whether ``torch.compile`` is tracing the code that asks.

    ``torch.compiler.is_compiling`` from torch 2.3, before that
    ``torch._dynamo.is_compiling`` (torch 2.1, 2.2).
    """
    compiler = getattr(torch, 'compiler', None)
    public = getattr(compiler, 'is_compiling', None)
    if public is not None:
        return public()
    from torch import _dynamo
    return _dynamo.is_compiling()


def tensor_version(t: torch.Tensor):
    """The count of in-place changes to ``t``'s data, or None where torch
    does not keep one: ``Tensor._version``, private (autograd's check that
    a saved tensor was not modified reads it) and present in every torch
    this package supports. An optimizer step, ``load_state_dict`` and any
    other in-place write raise it."""
    version = getattr(t, '_version', None)
    return version if isinstance(version, int) else None


# MMEngine's Runner keeps its ``resume``/``load_from`` arguments, the train
# dataloader config and the randomness config in private attributes, and the
# infinite iterator of IterBasedTrainLoop is private (mmengine 0.10.x).


def runner_resume(runner):
    """``(resume, load_from)`` as given to the Runner."""
    return runner._resume, runner._load_from


def set_runner_load_from(runner, path: str) -> None:
    """The checkpoint ``Runner.load_or_resume`` will read (before it runs)."""
    runner._load_from = path


def built_train_loop(runner):
    """The train loop if one has been built, else None (reading
    ``runner.train_loop`` would build one in a test-only run)."""
    from mmengine.runner.base_loop import BaseLoop
    loop = runner._train_loop
    return loop if isinstance(loop, BaseLoop) else None


def built_eval_loop(runner):
    """The test loop, else the val loop, if built; else None."""
    from mmengine.runner.base_loop import BaseLoop
    for loop in (runner._test_loop, runner._val_loop):
        if isinstance(loop, BaseLoop):
            return loop
    return None


def train_dataloader_cfg(runner):
    """The config the train dataloader was built from (or the object)."""
    return runner._train_dataloader


def diff_rank_seed(runner) -> bool:
    return runner._randomness_cfg.get('diff_rank_seed', False)


def infinite_dataloader_iterator(dataloader):
    """What ``IterBasedTrainLoop`` iterates: its dataloader, endlessly."""
    from mmengine.runner.loops import _InfiniteDataloaderIterator
    return _InfiniteDataloaderIterator(dataloader)
