"""Resume through tools/train.py on the real segmentor: exact, even after
kill -9.

The runs use configs/fpn_poolformer_s12_ade20k.py at quarter scale on the
generated ADE20K data (``make_tiny_config``), with a tiny custom PoolFormer
(one block per stage, 8..64 channels) and FPN/head of 16 channels so that
an iteration takes a fraction of a second, and two dataloader workers.

Randomness in these runs, and what restores it on resume:

* data order -- InfiniteSampler seeded from the run's seed; mmengine replays
  the seen batches (the resumed runs are started *without* a seed, as
  mmseg's default, so the seed must come from the checkpoint);
* RandomResize/RandomCrop/RandomFlip/PhotoMetricDistortion -- run in the 2
  dataloader workers, seeded from the run's seed; the replay re-creates
  their RNG states;
* dropout (FPNHead, p=0.1) -- main-process torch RNG, restored from
  ``checkpoint['rng_state']`` by RNGStateHook;
* validation at iteration 4 -- its use of the RNG is undone by RNGStateHook.

CPU kernels are deterministic for a fixed thread count (OMP_NUM_THREADS=1 in
every run), so the weights must be equal bit for bit: no tolerance.
"""
import os
import os.path as osp
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from poolformer_seg.utils.safe_load import load
from tests.conftest import REPO

ITERS = 8
TINY_MODEL = {
    'model.backbone.arch': dict(_delete_=True, layers=[1, 1, 1, 1],
                                embed_dims=[8, 16, 32, 64]),
    'model.neck.in_channels': [8, 16, 32, 64],
    'model.neck.out_channels': 16,
    'model.decode_head.in_channels': [16, 16, 16, 16],
    'model.decode_head.channels': 16,
}
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')


@pytest.fixture(scope='module')
def config(make_tiny_config, tmp_path_factory):
    options = dict(TINY_MODEL)
    options.update({
        'train_cfg.val_interval': 4,
        'default_hooks.checkpoint.interval': 2,
        'param_scheduler.0.end': ITERS,  # same LR curve for every max_iters
        'train_dataloader.batch_size': 2,
        'train_dataloader.num_workers': 2,
        'train_dataloader.persistent_workers': True,
    })
    path = tmp_path_factory.mktemp('resume') / 'tiny.py'
    return make_tiny_config(path, max_iters=ITERS, **options)


def train(run_tool, config, work_dir, *extra):
    return run_tool('train.py', config, '--work-dir', work_dir, *extra,
                    env=ENV)


@pytest.fixture(scope='module')
def uninterrupted(run_tool, config, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('uninterrupted')
    train(run_tool, config, work_dir)
    return load(osp.join(work_dir, f'iter_{ITERS}.pth'))


def assert_same_run(resumed, reference):
    """Weights, optimizer and scheduler state equal; same iteration."""
    assert resumed['meta']['iter'] == reference['meta']['iter'] == ITERS
    for key, value in reference['state_dict'].items():
        assert torch.equal(resumed['state_dict'][key], value), key
    ref_opt, res_opt = reference['optimizer'], resumed['optimizer']
    assert ref_opt['param_groups'] == res_opt['param_groups']
    for index, state in ref_opt['state'].items():
        for name, value in state.items():
            assert torch.equal(res_opt['state'][index][name], value), name
    assert resumed['param_schedulers'] == reference['param_schedulers']


@pytest.mark.slow
def test_resume_n_then_m_equals_one_run(run_tool, config, uninterrupted,
                                        tmp_path):
    """Issue 3: 4 iterations, then --resume to 8 == 8 iterations at once."""
    train(run_tool, config, tmp_path,
          '--cfg-options', 'train_cfg.max_iters=4')
    proc = train(run_tool, config, tmp_path, '--resume',
                 '--cfg-options', 'randomness.seed=None')
    assert 'resumed epoch: 0, iter: 4' in proc.stdout
    assert_same_run(load(osp.join(tmp_path, f'iter_{ITERS}.pth')),
                    uninterrupted)


def _kill_at_random_moment(cmd, rng):
    """Start training; SIGKILL it a random delay after a random iteration
    (>= 3, so iter_2.pth exists) has been logged. Returns a description."""
    target = rng.randint(3, ITERS - 1)
    delay = rng.uniform(0, 0.5)
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(rf'Iter\(train\) \[{target}/{ITERS}\]', line):
            time.sleep(delay)
            break
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive, ('the run ended before it could be killed:\n' +
                   ''.join(lines[-40:]))
    return f'killed {delay:.2f}s after iteration {target} was logged'


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(config, uninterrupted,
                                                 run_tool, tmp_path):
    seed = int(os.environ.get('RESUME_KILL_SEED', time.time_ns() % 10**6))
    rng = random.Random(seed)
    cmd = [sys.executable, osp.join(REPO, 'tools', 'train.py'), config,
           '--work-dir', str(tmp_path)]
    moment = _kill_at_random_moment(cmd, rng)
    print(f'{moment} (RESUME_KILL_SEED={seed} reproduces it)')
    proc = train(run_tool, config, tmp_path, '--resume',
                 '--cfg-options', 'randomness.seed=None')
    resumed_at = int(re.search(r'resumed epoch: 0, iter: (\d+)',
                               proc.stdout).group(1))
    assert resumed_at >= 2, moment
    assert_same_run(load(osp.join(tmp_path, f'iter_{ITERS}.pth')),
                    uninterrupted)
