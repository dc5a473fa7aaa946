"""Checkpoint loading that never executes code from the file.

Every checkpoint that poolformer_seg reads (resume, ``load_from``, pretrained
init, the tools) goes through :func:`load`, which calls ``torch.load`` with
``weights_only=True`` and an allowlist of only the types that MMEngine
training checkpoints hold: ``HistoryBuffer`` and plain numpy arrays, dtypes
and scalars. ``getattr`` is *not* on it: mmengine pickles ``HistoryBuffer``
with a dict of its class functions, which is what needs ``getattr``; we stop
pickling that dict (:func:`_history_buffer_state`) because ``__setstate__``
rebuilds it anyway.

Opting in to unsafe, arbitrary pickles is explicit: pass ``trust=True`` or set
the environment variable ``POOLFORMER_SEG_TRUST_CHECKPOINTS=1``. Only do that
for files that you made yourself; a pickle can run any code when loaded.
"""
import os
import os.path as osp
import pickle
import warnings
import zipfile

import numpy as np
import torch

TRUST_ENV = 'POOLFORMER_SEG_TRUST_CHECKPOINTS'


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The checkpoint needs a pickle global outside the allowlist."""


def _numpy_globals():
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes)
                     if name.endswith('DType')]
    return [np._core.multiarray._reconstruct, np._core.multiarray.scalar,
            np.ndarray, np.dtype, *dtype_classes]


def allowed_globals() -> list:
    """The pickle globals that :func:`load` accepts beyond torch's own."""
    from mmengine.logging.history_buffer import HistoryBuffer
    import _codecs  # numpy scalars pickle their raw bytes via _codecs.encode
    return [HistoryBuffer, _codecs.encode, *_numpy_globals()]


def _history_buffer_state(self) -> dict:
    """``HistoryBuffer.__getstate__`` without the unpicklable method table."""
    state = dict(self.__dict__)
    state.pop('statistics_methods', None)
    return state


def _patch_history_buffer() -> None:
    from mmengine.logging.history_buffer import HistoryBuffer
    HistoryBuffer.__getstate__ = _history_buffer_state
    # mmengine's own __getstate__ also wrote the table into instances that
    # exist already (e.g. a MessageHub created before this patch).
    from mmengine.logging import MessageHub
    for hub in MessageHub._instance_dict.values():
        for buffer in hub.log_scalars.values():
            buffer.__dict__.pop('statistics_methods', None)


def trusted_by_env() -> bool:
    return os.environ.get(TRUST_ENV, '') == '1'


def _describe(file) -> str:
    return file if isinstance(file, (str, os.PathLike)) else repr(file)


def load(file, map_location='cpu', trust: bool = False):
    """Load a ``.pth``/``.bin`` (torch) or ``.safetensors`` checkpoint safely.

    Args:
        file (str | PathLike | file-like): the checkpoint.
        map_location: as in ``torch.load``; CPU by default.
        trust (bool): load arbitrary pickles (UNSAFE: runs code from the
            file). Also enabled by ``POOLFORMER_SEG_TRUST_CHECKPOINTS=1``.

    Raises:
        FileNotFoundError: the path does not exist.
        UnsafeCheckpointError: the file needs a global outside the allowlist;
            nothing from it was executed.
        CheckpointError: the file is truncated or not a checkpoint.
    """
    name = _describe(file)
    if isinstance(file, (str, os.PathLike)):
        if not osp.isfile(file):
            raise FileNotFoundError(f'checkpoint file not found: {name}')
        if str(file).endswith('.safetensors'):
            from safetensors.torch import load_file
            device = 'cpu' if map_location is None else str(map_location)
            return load_file(str(file), device=device)
    if trust or trusted_by_env():
        warnings.warn(f'loading {name} with weights_only=False: the file may '
                      'run arbitrary code (trusted on request)')
        return torch.load(file, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(file, map_location=map_location,
                              weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err) else repr(err)
        raise UnsafeCheckpointError(
            f'refused to load {name}: it needs pickle objects outside the '
            f'allowlist of safe types ({reason}). Nothing from the file was '
            f'executed. If you made this file yourself and trust it, set '
            f'{TRUST_ENV}=1 (unsafe: a pickle can run any code).') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f'cannot read checkpoint {name}: the file is truncated or is not '
            f'a PyTorch checkpoint ({err})') from None


def _load_local(filename, map_location=None):
    return load(osp.expanduser(filename), map_location=map_location)


def _load_http(filename, map_location=None):
    cache_dir = osp.join(torch.hub.get_dir(), 'checkpoints')
    os.makedirs(cache_dir, exist_ok=True)
    cached = osp.join(cache_dir, osp.basename(filename.split('?')[0]))
    if not osp.isfile(cached):
        torch.hub.download_url_to_file(filename, cached)
    return load(cached, map_location=map_location)


def register_mmengine_loaders() -> None:
    """Route mmengine's local and http checkpoint loading through :func:`load`."""
    from mmengine.runner.checkpoint import CheckpointLoader
    _patch_history_buffer()
    CheckpointLoader.register_scheme(prefixes='', loader=_load_local,
                                     force=True)
    CheckpointLoader.register_scheme(prefixes=('http://', 'https://'),
                                     loader=_load_http, force=True)
