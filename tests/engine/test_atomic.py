"""Atomic writes and the choice of the checkpoint that --resume loads."""
import errno
import os
import os.path as osp
import shutil

import pytest
import torch
from mmengine.fileio import get_file_backend

import poolformer_seg.engine.atomic as atomic
from poolformer_seg.engine import (AtomicLocalBackend, atomic_write,
                                   find_resumable_checkpoint,
                                   is_complete_checkpoint)
from poolformer_seg.engine.atomic import pointer_to


class _HalfThenFullDisk:
    """File object that writes half of what it is given, then fails."""

    def __init__(self, f, code=errno.ENOSPC):
        self._f = f
        self._code = code

    def write(self, data):
        self._f.write(data[:len(data) // 2])
        self._f.flush()
        raise OSError(self._code, os.strerror(self._code))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fail_half_way(monkeypatch, target_suffix, after=0, code=errno.ENOSPC):
    """Make atomic_write of files ending in ``target_suffix`` die half-way
    with OSError ``code``, once ``after`` such writes have succeeded."""
    seen = []

    def fake_open(path, mode='r', *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        base = str(path).rsplit('.', 2)[0]  # strip '.<pid>.tmp'
        if not base.endswith(target_suffix):
            return f
        seen.append(path)
        return _HalfThenFullDisk(f, code) if len(seen) > after else f

    monkeypatch.setattr(atomic, 'open', fake_open, raising=False)


def test_atomic_write_failure_keeps_old_content(tmp_path, monkeypatch):
    path = tmp_path / 'last_checkpoint'
    atomic_write(path, 'old')
    fail_half_way(monkeypatch, 'last_checkpoint')
    with pytest.raises(OSError, match='No space left'):
        atomic_write(path, 'new content that is long')
    assert path.read_text() == 'old'
    assert os.listdir(tmp_path) == ['last_checkpoint']  # no temp file left


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EFBIG])
def test_full_disk_error_names_the_file(tmp_path, monkeypatch, code):
    """The OS says only "No space left on device" / "File too large"; the
    error names the checkpoint, its size and what to do, and keeps the
    errno, so callers that test it still work."""
    path = tmp_path / 'iter_8.pth'
    atomic_write(path, b'old')
    fail_half_way(monkeypatch, '.pth', code=code)
    backend = get_file_backend(str(path), backend_args=dict(
        backend='local_atomic'))
    with pytest.raises(OSError) as err:
        backend.put(b'x' * 3 * 2**20, str(path))
    assert err.value.errno == code
    message = str(err.value)
    assert f'cannot save {path} (3.0 MB): {os.strerror(code)}' in message
    assert 'free space in' in message and '--work-dir' in message
    assert path.read_bytes() == b'old'
    assert os.listdir(tmp_path) == ['iter_8.pth']


def test_atomic_backend_is_registered(tmp_path):
    backend = get_file_backend(backend_args=dict(backend='local_atomic'))
    assert isinstance(backend, AtomicLocalBackend)
    backend.put(b'abc', tmp_path / 'sub' / 'f.bin')
    backend.put_text('text', tmp_path / 'f.txt')
    assert (tmp_path / 'sub' / 'f.bin').read_bytes() == b'abc'
    assert (tmp_path / 'f.txt').read_text() == 'text'


def _save(path, value):
    torch.save({'w': torch.full((256, ), float(value))}, path)
    return str(path)


def test_is_complete_checkpoint(tmp_path):
    good = _save(tmp_path / 'good.pth', 1)
    data = open(good, 'rb').read()
    (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # inside the tensor bytes: bad CRC
    (tmp_path / 'flip.pth').write_bytes(bytes(flipped))
    assert is_complete_checkpoint(good)
    assert not is_complete_checkpoint(str(tmp_path / 'cut.pth'))
    assert not is_complete_checkpoint(str(tmp_path / 'flip.pth'))
    assert not is_complete_checkpoint(str(tmp_path / 'missing.pth'))


@pytest.fixture
def log(monkeypatch):
    messages = []
    monkeypatch.setattr(atomic, 'print_log',
                        lambda msg, **kwargs: messages.append(msg))
    return messages


def test_resume_uses_last_checkpoint_when_complete(tmp_path, log):
    _save(tmp_path / 'iter_2.pth', 2)
    last = _save(tmp_path / 'iter_4.pth', 4)
    atomic_write(tmp_path / 'last_checkpoint', last)
    assert find_resumable_checkpoint(str(tmp_path)) == last
    assert log == []


@pytest.mark.parametrize('damage', ['truncated', 'missing'])
def test_resume_falls_back_to_newest_complete(tmp_path, log, damage):
    _save(tmp_path / 'iter_2.pth', 2)
    four = _save(tmp_path / 'iter_4.pth', 4)
    six = _save(tmp_path / 'iter_6.pth', 6)
    atomic_write(tmp_path / 'last_checkpoint', six)
    if damage == 'missing':
        os.remove(six)
    else:
        data = open(six, 'rb').read()
        open(six, 'wb').write(data[:100])
    assert find_resumable_checkpoint(str(tmp_path)) == four
    assert len(log) == 1 and six in log[0] and four in log[0]
    assert ('missing' if damage == 'missing' else 'incomplete') in log[0]


def test_resume_without_pointer_takes_newest_complete(tmp_path, log):
    _save(tmp_path / 'iter_2.pth', 2)
    ten = _save(tmp_path / 'iter_10.pth', 10)  # numeric, not lexical, order
    assert find_resumable_checkpoint(str(tmp_path)) == ten
    assert 'last_checkpoint' in log[0] and ten in log[0]


def test_resume_with_nothing_starts_anew(tmp_path, log):
    assert find_resumable_checkpoint(str(tmp_path)) is None


def test_resume_with_only_broken_checkpoints_is_an_error(tmp_path):
    (tmp_path / 'iter_2.pth').write_bytes(b'PK\x03\x04 truncated')
    atomic_write(tmp_path / 'last_checkpoint', str(tmp_path / 'iter_2.pth'))
    with pytest.raises(FileNotFoundError,
                       match=r'cannot resume: .*iter_2\.pth.*incomplete.*'
                       r'without --resume'):
        find_resumable_checkpoint(str(tmp_path))


def test_pointer_is_relative_inside_the_work_dir(tmp_path):
    assert pointer_to(str(tmp_path / 'iter_4.pth'), str(tmp_path)) == \
        'iter_4.pth'
    assert pointer_to(str(tmp_path / 'ckpts' / 'iter_4.pth'),
                      str(tmp_path)) == osp.join('ckpts', 'iter_4.pth')
    outside = str(tmp_path.parent / 'elsewhere' / 'iter_4.pth')
    assert pointer_to(outside, str(tmp_path)) == outside


def test_absolute_pointer_of_a_copied_work_dir_uses_the_copy(tmp_path, log):
    """A work dir copied with an absolute pointer (older versions, plain
    mmengine) into the original folder: its own file of that name wins."""
    original, copy = tmp_path / 'original', tmp_path / 'copy'
    original.mkdir()
    _save(original / 'iter_2.pth', 2)
    atomic_write(original / 'last_checkpoint', str(original / 'iter_2.pth'))
    shutil.copytree(original, copy)
    assert find_resumable_checkpoint(str(copy)) == str(copy / 'iter_2.pth')
    assert find_resumable_checkpoint(str(original)) == \
        str(original / 'iter_2.pth')
