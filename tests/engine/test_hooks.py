"""SafeCheckpointHook, RNGStateHook and FiniteLossHook on a tiny Runner.

The end-to-end versions on the real segmentor, through tools/train.py, are
in tests/tools/test_resume.py; these run in seconds and isolate each part.
"""
import os
import os.path as osp
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from poolformer_seg.engine import (NonFiniteError, SafeCheckpointHook,
                                   is_complete_checkpoint)
from poolformer_seg.utils.safe_load import load
from tests.engine.test_atomic import fail_half_way
from tests.engine.toy_runner import final_weights, stop_workers, toy_runner

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _pointer(work_dir):
    """The file that last_checkpoint names (relative to the work dir)."""
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return osp.join(str(work_dir), f.read())


def _assert_equal_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    """8 iterations in one go, validation every 2 (seed 0)."""
    runner = toy_runner(tmp_path_factory.mktemp('full'), max_iters=8,
                        val=True)
    runner.train()
    return final_weights(runner)


@pytest.mark.slow
@pytest.mark.parametrize('num_workers', [0, 2])
def test_resume_is_exact(tmp_path, uninterrupted, num_workers):
    """4 iterations, then --resume to 8 == 8 in one go, bit for bit.

    The resumed run is started without a seed (mmseg's default), so it also
    checks that the data order follows the checkpoint's seed.
    """
    first = toy_runner(tmp_path, max_iters=4, val=True,
                       num_workers=num_workers)
    first.train()
    resumed = toy_runner(tmp_path, max_iters=8, val=True, resume=True,
                         seed=None, num_workers=num_workers)
    resumed.train()
    if num_workers == 0:
        _assert_equal_weights(final_weights(resumed), uninterrupted)
    else:  # workers draw augmentation from their own, re-seeded RNGs
        reference = toy_runner(tmp_path / 'ref', max_iters=8, val=True,
                               num_workers=num_workers)
        reference.train()
        _assert_equal_weights(final_weights(resumed),
                              final_weights(reference))
        stop_workers(first, resumed, reference)


def test_resume_without_rng_hook_differs(tmp_path, uninterrupted):
    """Negative control: the test above can fail (dropout, augmentation)."""
    toy_runner(tmp_path, max_iters=4, val=True, rng_hook=False).train()
    resumed = toy_runner(tmp_path, max_iters=8, val=True, resume=True,
                         rng_hook=False)
    resumed.train()
    weights = final_weights(resumed)
    assert any(not torch.equal(weights[k], uninterrupted[k])
               for k in weights)


@pytest.mark.slow
@pytest.mark.parametrize('failing,after', [('iter_6.pth', 0),
                                           ('last_checkpoint', 2)])
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch,
                                                    failing, after):
    """The disk fills up half-way through writing the checkpoint at 6 (or
    its pointer); with max_keep_ckpts=1 mmengine would already have deleted
    iter_4.pth. The previous checkpoint and pointer stay intact, resume
    works."""
    fail_half_way(monkeypatch, failing, after)
    runner = toy_runner(tmp_path, max_iters=8, max_keep_ckpts=1)
    with pytest.raises(OSError, match='No space left'):
        runner.train()
    four = osp.join(str(tmp_path), 'iter_4.pth')
    assert _pointer(tmp_path) == four
    assert is_complete_checkpoint(four)
    assert load(four)['meta']['iter'] == 4
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]
    if failing == 'iter_6.pth':
        assert not osp.exists(osp.join(str(tmp_path), 'iter_6.pth'))
    monkeypatch.undo()
    resumed = toy_runner(tmp_path, max_iters=8, max_keep_ckpts=1,
                         resume=True)
    resumed.train()
    assert resumed.iter == 8
    assert sorted(f for f in os.listdir(tmp_path)
                  if f.endswith('.pth')) == ['iter_8.pth']


KILLED_DURING_SAVE = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, {repo!r})
    import poolformer_seg.engine.atomic as atomic
    from tests.engine.toy_runner import toy_runner

    def slow_open(path, mode='r', *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if 'iter_4.pth' not in str(path):
            return f

        class Half:
            def write(self, data):
                f.write(data[:len(data) // 2]); f.flush()
                open({flag!r}, 'w').close()
                time.sleep(120)  # killed here, half-way through the save
            def __getattr__(self, name): return getattr(f, name)
            def __enter__(self): return self
            def __exit__(self, *exc): f.close()
        return Half()

    atomic.open = slow_open
    toy_runner({work_dir!r}, max_iters=8).train()
''')


@pytest.mark.slow
def test_kill_9_during_save(tmp_path):
    """SIGKILL while iter_4.pth is half written: iter_2 and the pointer are
    intact, and resuming from them completes the run."""
    work_dir, flag = str(tmp_path / 'run'), str(tmp_path / 'half_written')
    script = KILLED_DURING_SAVE.format(repo=REPO, flag=flag,
                                       work_dir=work_dir)
    proc = subprocess.Popen([sys.executable, '-c', script],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not osp.exists(flag):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, 'the save was never reached'
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    two = osp.join(work_dir, 'iter_2.pth')
    assert _pointer(work_dir) == two
    assert load(two)['meta']['iter'] == 2
    assert not osp.exists(osp.join(work_dir, 'iter_4.pth'))
    half = [f for f in os.listdir(work_dir) if f.endswith('.tmp')]
    assert len(half) == 1 and half[0].startswith('iter_4.pth.')
    resumed = toy_runner(work_dir, max_iters=8, resume=True)
    resumed.train()
    assert resumed.iter == 8 and is_complete_checkpoint(
        osp.join(work_dir, 'iter_4.pth'))
    assert not [f for f in os.listdir(work_dir) if f.endswith('.tmp')]


def test_resume_falls_back_from_truncated_checkpoint(tmp_path):
    """last_checkpoint names a truncated file (e.g. written by plain
    mmengine): --resume takes the newest complete checkpoint instead."""
    toy_runner(tmp_path, max_iters=4).train()
    four = osp.join(str(tmp_path), 'iter_4.pth')
    data = open(four, 'rb').read()
    open(four, 'wb').write(data[:len(data) // 2])
    resumed = toy_runner(tmp_path, max_iters=6, resume=True)
    resumed.train()
    log = open(resumed.logger.log_file).read()
    assert f'names {four}, which is incomplete; resuming from ' \
           f'{osp.join(str(tmp_path), "iter_2.pth")}' in log
    assert 'resumed epoch: 0, iter: 2' in log


def test_nan_loss_stops_before_checkpoint(tmp_path):
    runner = toy_runner(tmp_path, max_iters=8, interval=1, nan_at_call=3)
    with pytest.raises(NonFiniteError) as err:
        runner.train()
    two = osp.join(str(tmp_path), 'iter_2.pth')
    assert 'training stopped at iteration 3: non-finite loss' in str(err.value)
    assert f'the last good one is {two}' in str(err.value)
    assert 'Lower the learning rate' in str(err.value)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith('.pth')) \
        == ['iter_1.pth', 'iter_2.pth']
    assert _pointer(tmp_path) == two
    for name in ('iter_1.pth', 'iter_2.pth'):
        state = load(osp.join(str(tmp_path), name))['state_dict']
        assert all(torch.isfinite(v).all() for v in state.values())


def test_non_finite_weights_are_never_saved(tmp_path):
    runner = toy_runner(tmp_path, max_iters=2)
    runner.train()
    hook = next(h for h in runner.hooks
                if isinstance(h, SafeCheckpointHook))
    runner.model.fc1.weight.data[0, 0] = float('inf')
    with pytest.raises(NonFiniteError, match=r"\['fc1.weight'\] contain "
                       'NaN/Inf'):
        hook._save_checkpoint_with_step(runner, 3, dict(epoch=0, iter=3))
    assert not osp.exists(osp.join(str(tmp_path), 'iter_3.pth'))
    assert _pointer(tmp_path).endswith('iter_2.pth')


def test_copied_work_dir_resumes_from_its_own_checkpoint(tmp_path):
    """last_checkpoint holds 'iter_2.pth', so a copy of the work dir
    resumes from its own file (and --resume says which), not from the
    folder it was copied from."""
    original, copy = tmp_path / 'original', tmp_path / 'copy'
    toy_runner(original, max_iters=2).train()
    with open(original / 'last_checkpoint') as f:
        assert f.read() == 'iter_2.pth'
    shutil.copytree(original, copy)
    resumed = toy_runner(copy, max_iters=4, resume=True)
    resumed.train()
    log = open(resumed.logger.log_file).read()
    own = osp.join(str(copy), 'iter_2.pth')
    assert f'--resume: resuming from {own} (the last checkpoint in ' \
        f'{copy})' in log
    assert f'Load checkpoint from {own}' in log
    assert f'Load checkpoint from {original}' not in log
