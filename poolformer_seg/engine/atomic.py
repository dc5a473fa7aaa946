"""Crash-safe checkpoint files.

* :func:`atomic_write` writes a file so that readers see either the old or
  the new content, never a mix: the bytes go to a temporary file in the same
  directory, are flushed to disk, then ``os.replace`` renames it over the
  target (atomic on POSIX and Windows), and the directory entry is synced.
* :class:`AtomicLocalBackend` is mmengine's ``LocalBackend`` with atomic
  ``put``/``put_text``. It is registered as the file backend
  ``'local_atomic'``; :class:`~poolformer_seg.engine.hooks.SafeCheckpointHook`
  saves local checkpoints through it (mmengine's ``save_checkpoint`` ends in
  ``backend.put(bytes, path)``, which is the single place every checkpoint
  write goes through).
* :func:`find_resumable_checkpoint` picks what ``--resume`` should load: the
  file named in ``work_dir/last_checkpoint`` if it is complete, else the
  newest complete ``iter_*.pth``/``epoch_*.pth``. ``last_checkpoint`` holds
  a path relative to the work dir (:func:`pointer_to`), so a moved or copied
  work dir resumes from its own files.
"""
import errno
import glob
import os
import os.path as osp
import re
from pathlib import Path
from typing import Optional, Union

from mmengine.fileio import LocalBackend, register_backend
from mmengine.logging import print_log

from ..utils.safe_load import CheckpointError, verify_archive


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable after a power loss (POSIX only).
    if os.name != 'posix':
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# "No space left on device", "File too large", "Disk quota exceeded": the
# OS names no file, so the error is re-raised naming the target.
_DISK_FULL = {errno.ENOSPC, errno.EFBIG,
              getattr(errno, 'EDQUOT', errno.ENOSPC)}


class DiskFullError(OSError):
    """A save failed for lack of space (or a file size limit); the message
    names the file. The previous file at the path is intact."""


def _disk_full_message(err: OSError, path: str, size: int) -> str:
    return (f'cannot save {path} ({size / 2**20:.1f} MB): '
            f'{err.strerror or os.strerror(err.errno)}. The previous '
            f'version of the file, if any, is intact; free space in '
            f'{osp.dirname(osp.abspath(path))} or save elsewhere '
            '(e.g. --work-dir)')


def atomic_write(path: Union[str, Path], data: Union[bytes, str]) -> None:
    """Write ``data`` to ``path`` so that a crash never leaves a partial file.

    A process killed at any moment leaves ``path`` either untouched or
    complete; at worst a stray ``<path>.<pid>.tmp`` stays behind. A full
    disk (or file size limit) raises :class:`DiskFullError` naming ``path``.
    """
    path = str(path)
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if isinstance(data, str):
        data = data.encode('utf-8')
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if osp.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            raise DiskFullError(err.errno, _disk_full_message(
                err, path, len(data)), path) from err
        raise
    _fsync_dir(directory)


class AtomicLocalBackend(LocalBackend):
    """mmengine ``LocalBackend`` writing through :func:`atomic_write`."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        atomic_write(filepath, obj)

    def put_text(self, obj: str, filepath: Union[str, Path],
                 encoding: str = 'utf-8') -> None:
        atomic_write(filepath, obj.encode(encoding))


register_backend('local_atomic', AtomicLocalBackend, force=True)


def is_complete_checkpoint(path: str) -> bool:
    """True if ``path`` is a whole PyTorch (zip) checkpoint.

    ``torch.save`` writes a zip archive whose central directory comes last
    and whose members carry CRC-32 checksums, so a truncated or damaged file
    fails :func:`~poolformer_seg.utils.safe_load.verify_archive`. Nothing is
    unpickled.
    """
    try:
        verify_archive(path)
        return True
    except CheckpointError:
        return False


def pointer_to(checkpoint: str, work_dir: str) -> str:
    """What ``last_checkpoint`` records for ``checkpoint``: its path relative
    to ``work_dir`` when it lies inside (so that a moved or copied work dir
    resumes from its own copy), else the absolute path."""
    relative = osp.relpath(osp.abspath(checkpoint), osp.abspath(work_dir))
    inside = not relative.startswith(os.pardir) and not osp.isabs(relative)
    return relative if inside else osp.abspath(checkpoint)


def _resolve_pointer(named: str, work_dir: str) -> str:
    """The file ``last_checkpoint`` means: relative names are resolved
    against ``work_dir``; an absolute name whose file also exists in
    ``work_dir`` (a work dir copied with a pointer written by an older
    version or by mmengine) is taken from ``work_dir``."""
    if not osp.isabs(named):
        return osp.join(work_dir, named)
    own = osp.join(work_dir, osp.basename(named))
    if osp.abspath(osp.dirname(named)) != osp.abspath(work_dir) and \
            osp.isfile(own):
        print_log(f'last_checkpoint names {named}, outside this work dir; '
                  f'using its copy {own} in the work dir', logger='current')
        return own
    return named


def _step(path: str) -> int:
    match = re.search(r'(\d+)\.pth$', osp.basename(path))
    return int(match.group(1)) if match else -1


def find_resumable_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint that ``--resume`` should load, or None to start anew.

    Reads ``work_dir/last_checkpoint``. If the file that it names is missing
    or incomplete (e.g. written by a version without atomic saves), falls
    back to the newest complete ``iter_*.pth``/``epoch_*.pth`` next to it or
    in ``work_dir``, with a warning that names both files.

    Raises:
        FileNotFoundError: ``last_checkpoint`` names an unusable file and no
            complete checkpoint exists (resuming would silently restart).
    """
    pointer = osp.join(work_dir, 'last_checkpoint')
    named = None
    if osp.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip() or None
        if named:
            named = _resolve_pointer(named, work_dir)
        if named and is_complete_checkpoint(named):
            return named
    folders = {work_dir} | ({osp.dirname(named)} if named else set())
    candidates = sorted(
        {p for folder in folders
         for pattern in ('iter_*.pth', 'epoch_*.pth')
         for p in glob.glob(osp.join(folder, pattern))},
        key=_step, reverse=True)
    found = next((p for p in candidates if is_complete_checkpoint(p)), None)
    if named is None and found is None:
        return None
    problem = (f'{pointer} is empty' if named is None and osp.isfile(pointer)
               else f'there is no {pointer}' if named is None else
               f'{pointer} names {named}, which is '
               f'{"missing" if not osp.exists(named) else "incomplete"}')
    if found is None:
        raise FileNotFoundError(
            f'cannot resume: {problem}, and no other complete checkpoint '
            f'(iter_*.pth) exists in {sorted(folders)}. Train without '
            '--resume to start over.')
    print_log(f'{problem}; resuming from {found}, the newest complete '
              'checkpoint, instead', logger='current', level=30)
    return found
