"""Checkpoint loading that never executes code from the file.

Every checkpoint that poolformer_seg reads (resume, ``load_from``, pretrained
init, the tools) goes through :func:`load`, which calls ``torch.load`` with
``weights_only=True`` and an allowlist of only the types that MMEngine
training checkpoints hold (see :func:`allowed_globals`):

* ``HistoryBuffer`` (the message hub's logged scalars), whose unpickling is
  restricted to its three data attributes;
* numpy arrays, dtypes and scalars, and ``_codecs.encode`` (numpy scalars
  pickle their raw bytes through it);
* a *restricted* stand-in for ``builtins.getattr`` that only returns the four
  statistics functions of ``HistoryBuffer`` (``min``, ``max``, ``mean``,
  ``current``). Stock mmengine pickles those functions as
  ``getattr(HistoryBuffer, 'min')``; the real ``getattr`` would reach any
  attribute of any allowed object and thereby arbitrary code. Checkpoints
  written after ``import poolformer_seg`` do not contain it at all
  (:func:`_history_buffer_getstate`), older ones still load.

Anything else (``os.system``, ``eval``, arbitrary classes) is refused before
it is called.

Integrity: a torch checkpoint is a zip archive whose members carry CRC-32
checksums, which ``torch.load`` does not verify (a file with flipped bits
inside a tensor loads, with wrong values). :func:`load` verifies every
member's checksum first (:func:`verify_archive`: one sequential read of the
file, which also warms the page cache for ``torch.load``). Model weights that
are NaN or Inf are refused wherever weights go into a model
(:func:`check_finite_weights`, called by the mmengine loaders below and by
:func:`poolformer_seg.utils.loading.read_checkpoint`); :func:`load` itself
returns them, so that a damaged file can still be inspected.

Opting in to unsafe, arbitrary pickles is explicit: pass
``trust=True`` or set ``POOLFORMER_SEG_TRUST_CHECKPOINTS=1``. Only do that for
files that you made yourself: a pickle can run any code when it is loaded.
"""
import os
import os.path as osp
import pickle
import warnings
import zipfile
from typing import List, Optional

import numpy as np
import torch

from ..compat import numpy_core, torch_safe_globals

TRUST_ENV = 'POOLFORMER_SEG_TRUST_CHECKPOINTS'

# Substrings of torch's weights-only errors that mean "the pickle asks for
# something outside the allowlist" (rather than "the file is damaged").
_REFUSAL_MARKERS = ('GLOBAL', 'unrecognized function', 'Can only',
                    'Unsupported operand', 'not allowed')
# The only data a HistoryBuffer carries; everything else is rebuilt.
_BUFFER_STATE = ('max_length', '_log_history', '_count_history')
_BUFFER_STATISTICS = ('min', 'max', 'mean', 'current')


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The checkpoint needs a pickle global outside the allowlist."""


class CorruptCheckpointError(CheckpointError):
    """The archive's checksums do not match its content."""


class NonFiniteCheckpointError(CheckpointError):
    """The checkpoint's weights hold NaN or Inf values."""


def _history_buffer_getattr(obj, name):
    """``getattr`` limited to ``HistoryBuffer.{min,max,mean,current}``."""
    from mmengine.logging.history_buffer import HistoryBuffer
    if obj is HistoryBuffer and name in _BUFFER_STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'getattr({obj!r}, {name!r}) is not allowed: only '
        f'HistoryBuffer.{{{",".join(_BUFFER_STATISTICS)}}} may be looked up')


def _history_buffer_getstate(self) -> dict:
    """Pickle only the data of a ``HistoryBuffer``, not its method table."""
    return {key: self.__dict__[key] for key in _BUFFER_STATE}


def _history_buffer_setstate(self, state: dict) -> None:
    """Restore the data attributes only.

    mmengine's version also merges a pickled ``statistics_methods`` table into
    the *class*, which would let a file swap the functions that logging
    calls later; the table is a constant, so it is rebuilt instead.
    """
    missing = [key for key in _BUFFER_STATE if key not in state]
    if missing:
        raise pickle.UnpicklingError(f'HistoryBuffer state lacks {missing}')
    self._set_default_statistics()
    self.__dict__.update({key: state[key] for key in _BUFFER_STATE})


def _numpy_globals() -> list:
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes)
                     if name.endswith('DType')]
    core = numpy_core()
    return [core.multiarray._reconstruct, core.multiarray.scalar,
            np.ndarray, np.dtype, *dtype_classes]


def allowed_globals() -> list:
    """The pickle globals that :func:`load` accepts beyond torch's own."""
    import _codecs

    from mmengine.logging.history_buffer import HistoryBuffer
    return [HistoryBuffer, _codecs.encode, *_numpy_globals(),
            (_history_buffer_getattr, 'builtins.getattr')]


def trusted_by_env() -> bool:
    """True when ``POOLFORMER_SEG_TRUST_CHECKPOINTS=1`` is set."""
    return os.environ.get(TRUST_ENV, '') == '1'


def _describe(file) -> str:
    return str(file) if isinstance(file, (str, os.PathLike)) else repr(file)


def _torch_reason(err: BaseException) -> str:
    """The informative part of torch's long weights-only error message."""
    text = str(err)
    if 'WeightsUnpickler error:' in text:
        text = text.split('WeightsUnpickler error:', 1)[1]
    boilerplate = ('Weights only load failed', 'Please file an issue',
                   'Check the documentation', '(1)', '(2)')
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(boilerplate)]
    return (specific or [repr(err)])[0]


def verify_archive(file, name: Optional[str] = None) -> None:
    """Check the CRC-32 of every member of a torch (zip) checkpoint.

    Args:
        file (str | PathLike | file-like): the archive; a file object is
            read from its start and put back where it was.
        name (str, optional): how to name the file in the error.

    Raises:
        CorruptCheckpointError: a member's bytes do not match its checksum
            (bits flipped on disk or in transfer), naming the member.
        CheckpointError: the file is not a complete zip archive.
    """
    name = name or _describe(file)
    position = None if isinstance(file, (str, os.PathLike)) else file.tell()
    try:
        with zipfile.ZipFile(file) as archive:
            damaged = archive.testzip()
    except Exception as err:  # noqa: B902
        # zipfile reports damage as BadZipFile, but damaged headers also
        # surface as zlib.error, struct.error, NotImplementedError (a
        # flipped compression method), UnicodeDecodeError (a flipped name
        # flag), OSError, ...: whatever it is, the archive cannot be read.
        raise CheckpointError(
            f'cannot read checkpoint {name}: the file is truncated, damaged '
            f'or not a PyTorch checkpoint ({type(err).__name__}: {err}); '
            're-download it or use an earlier checkpoint') from None
    finally:
        if position is not None:
            file.seek(position)
    if damaged is not None:
        raise CorruptCheckpointError(
            f'checkpoint {name} is corrupt: the checksum (CRC-32) of its '
            f'member {damaged} does not match its content, so some weights '
            'were altered on disk or in transfer; re-download or re-copy it, '
            'or use an earlier checkpoint')


def model_weights(checkpoint) -> dict:
    """The state dict inside a checkpoint: its ``state_dict`` or ``model``
    entry, else the checkpoint itself; {} for anything that is not a dict."""
    if not isinstance(checkpoint, dict):
        return {}
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def _is_finite(tensor: torch.Tensor) -> bool:
    # NaN and Inf propagate through a sum, so a finite sum proves the tensor
    # finite at the cost of one reduction (6x cheaper than isfinite().all());
    # a non-finite sum may also be an overflow of large values: look closer.
    return bool(torch.isfinite(tensor.sum())) or \
        bool(torch.isfinite(tensor).all())


def non_finite_tensors(state_dict: dict) -> List[str]:
    """Names of the floating-point tensors holding NaN or Inf."""
    return [key for key, value in state_dict.items()
            if torch.is_tensor(value) and value.is_floating_point()
            and not _is_finite(value)]


def check_finite_weights(checkpoint, name: str) -> None:
    """Refuse a checkpoint whose model weights hold NaN or Inf.

    Raises:
        NonFiniteCheckpointError: naming the tensors (up to 12) and the file.
    """
    bad = non_finite_tensors(model_weights(checkpoint))
    if bad:
        shown = ', '.join(bad[:12]) + (f' ... and {len(bad) - 12} more'
                                       if len(bad) > 12 else '')
        raise NonFiniteCheckpointError(
            f'checkpoint {name} has NaN/Inf values in {len(bad)} tensor(s): '
            f'{shown}. A model loaded from it would predict garbage; the run '
            'that wrote it had diverged. Use an earlier checkpoint.')


def load(file, map_location='cpu', trust: bool = False):
    """Load a ``.pth``/``.bin`` (torch) or ``.safetensors`` checkpoint safely.

    Args:
        file (str | PathLike | file-like): the checkpoint.
        map_location: as in ``torch.load``; CPU by default.
        trust (bool): load arbitrary pickles (UNSAFE: runs code from the
            file). Also enabled by ``POOLFORMER_SEG_TRUST_CHECKPOINTS=1``.

    Returns:
        Whatever the file holds (usually a dict).

    Raises:
        FileNotFoundError: the path does not exist.
        UnsafeCheckpointError: the file needs a pickle global outside the
            allowlist; nothing from it was executed.
        CorruptCheckpointError: the zip archive's checksums do not match.
        CheckpointError: the file is truncated, damaged or not a checkpoint.
    """
    name = _describe(file)
    if isinstance(file, (str, os.PathLike)):
        if not osp.isfile(file):
            raise FileNotFoundError(f'checkpoint file not found: {name}')
        if str(file).endswith('.safetensors'):
            from safetensors.torch import load_file
            device = 'cpu' if map_location is None else str(map_location)
            return load_file(str(file), device=device)
        with open(file, 'rb') as f:
            header = f.read(2)
        # torch.save writes a zip archive ('PK'); before torch 1.6, a pickle
        # (protocol >= 2 starts with 0x80).
        if not header.startswith((b'PK', b'\x80')):
            raise CheckpointError(
                f'cannot read checkpoint {name}: it is empty or not a PyTorch '
                f'checkpoint (neither a zip archive nor a pickle)')
        if header == b'PK':
            verify_archive(file, name)
    elif hasattr(file, 'seek') and hasattr(file, 'tell'):  # file object
        start = file.tell()
        is_zip = zipfile.is_zipfile(file)
        file.seek(start)
        if is_zip:
            verify_archive(file, name)
    if trust or trusted_by_env():
        warnings.warn(f'loading {name} with weights_only=False: the file may '
                      f'run arbitrary code (trusted on request via trust=True '
                      f'or {TRUST_ENV}=1)')
        return torch.load(file, map_location=map_location, weights_only=False)
    try:
        with torch_safe_globals(allowed_globals()):
            return torch.load(file, map_location=map_location,
                              weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _torch_reason(err)
        if any(marker in reason for marker in _REFUSAL_MARKERS):
            raise UnsafeCheckpointError(
                f'refused to load {name}: it needs pickle objects outside the '
                f'allowlist of safe types ({reason}). Nothing from the file '
                f'was executed. If you made this file yourself and trust it, '
                f'set {TRUST_ENV}=1 (unsafe: a pickle can run any code).'
            ) from None
        raise CheckpointError(
            f'cannot read checkpoint {name}: the file is truncated or damaged '
            f'({reason}); re-download it or use an earlier checkpoint'
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError,
            zipfile.BadZipFile) as err:
        reason = str(err).split('. ')[0] or type(err).__name__
        raise CheckpointError(
            f'cannot read checkpoint {name}: the file is truncated or is not '
            f'a PyTorch checkpoint ({reason}); re-download it or use an '
            f'earlier checkpoint') from None


# mmengine's CheckpointLoader logs ``loader.__name__[10:]`` as the backend
# name, hence the ``load_from_`` prefix of the two loaders below.
def load_from_safe_local(filename, map_location=None):
    """mmengine loader for local paths: :func:`load`, finite weights."""
    checkpoint = load(osp.expanduser(filename), map_location=map_location)
    check_finite_weights(checkpoint, filename)
    return checkpoint


def load_from_safe_http(filename, map_location=None):
    """mmengine loader for http(s) URLs: cached download, then :func:`load`."""
    cache_dir = osp.join(torch.hub.get_dir(), 'checkpoints')
    os.makedirs(cache_dir, exist_ok=True)
    cached = osp.join(cache_dir, osp.basename(filename.split('?')[0]))
    if not osp.isfile(cached):
        # Downloads to a temporary file and renames it: never half a file.
        torch.hub.download_url_to_file(filename, cached)
    checkpoint = load(cached, map_location=map_location)
    check_finite_weights(checkpoint, filename)
    return checkpoint


def load_from_unsupported(filename, map_location=None):
    raise CheckpointError(
        f'cannot load {filename}: poolformer_seg loads checkpoints only '
        'through its safe loader, which reads local paths and http(s) URLs; '
        'copy the file to a local path and pass that instead')


def register_mmengine_loaders() -> None:
    """Route mmengine's checkpoint loading through :func:`load`.

    * ``''`` (local paths) and ``http(s)://`` schemes: our loaders.
    * ``open-mmlab://``, ``mmcls://``, ``torchvision://`` resolve a name to a
      URL and then call ``mmengine.runner.checkpoint.load_from_http``, which
      is replaced by :func:`load_from_safe_http`.
    * ``pavi://``, ``s3://``, ``petrel://`` call ``torch.load`` directly on
      remote storage: refused with a message (copy the file locally).
    * ``HistoryBuffer`` pickles without its method table.
    """
    import mmengine.runner.checkpoint as mm_checkpoint
    from mmengine.logging.history_buffer import HistoryBuffer
    HistoryBuffer.__getstate__ = _history_buffer_getstate
    HistoryBuffer.__setstate__ = _history_buffer_setstate
    loader = mm_checkpoint.CheckpointLoader
    loader.register_scheme(prefixes='', loader=load_from_safe_local,
                           force=True)
    loader.register_scheme(prefixes=('http://', 'https://'),
                           loader=load_from_safe_http, force=True)
    loader.register_scheme(
        prefixes=['pavi://', r'(\S+\:)?s3://', r'(\S+\:)?petrel://'],
        loader=load_from_unsupported, force=True)
    mm_checkpoint.load_from_http = load_from_safe_http
