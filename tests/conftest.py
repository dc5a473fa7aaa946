"""Shared fixtures: a generated ADE20K-layout dataset, a small-scale S12
config, a helper that runs the tools, and one trained S12 checkpoint.

Fixtures (all session-scoped, so a whole test run pays for them once):

``ade_tiny``
    Root of a synthetic ADE20K-layout dataset (16 training and 10 validation
    images, sides 96-200 px) written by
    :func:`poolformer_seg.datasets.synthetic.make_ade_dataset`, seed 0.
``make_tiny_config``
    ``make_tiny_config(path, max_iters=..., **overrides) -> path``: writes
    ``configs/fpn_poolformer_s12_ade20k.py`` with every image scale divided
    by 4 (crops 128, test short side 128; see :func:`quarter_scale`), data
    from ``ade_tiny``, no pretrained init, no data-loader workers, seed 0,
    and ``overrides`` merged last (``Config.merge_from_dict`` keys).
``run_tool``
    ``run_tool(script, *args, timeout=1800, env=None, check=True,
    merge_stderr=True) -> CompletedProcess``: runs ``tools/<script>`` with
    the project's Python from the repository root, output captured as text
    (stderr into stdout unless ``merge_stderr=False``); with ``check`` a
    non-zero exit fails the test, showing the output tail.
``load_tool``
    ``load_tool(script) -> module``: imports ``tools/<script>`` in-process
    (each tool has ``main(argv)``), for checks that need no subprocess.
``trained_s12``
    A :class:`TrainedRun` (``config``, ``work_dir``, ``checkpoint``,
    ``losses``, ``stdout``): the quarter-scale S12 trained for
    ``TRAIN_ITERS`` iterations by ``tools/train.py`` on ``ade_tiny``.
"""
import importlib.util
import json
import os
import os.path as osp
import subprocess
import sys
from dataclasses import dataclass
from glob import glob
from typing import List

import pytest

import poolformer_seg  # noqa: F401  (before mmseg)
from mmengine.config import Config
from poolformer_seg.datasets.synthetic import make_ade_dataset

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
S12_CONFIG = osp.join(REPO, 'configs', 'fpn_poolformer_s12_ade20k.py')
TRAIN_ITERS = 40


def quarter_scale(node):
    """Divide every ADE20K image scale in a config tree by 4, in place.

    ``scale=(2048, 512)`` and its TTA multiples become ``(512, 128)`` etc.,
    ``crop_size``/``size=(512, 512)`` become ``(128, 128)``. The model is
    untouched. Returns the number of values changed.
    """
    count = 0
    if isinstance(node, dict):
        for key in ('scale', 'crop_size', 'size'):
            value = node.get(key)
            if isinstance(value, (tuple, list)) and len(value) == 2 and \
                    all(isinstance(v, int) for v in value):
                node[key] = (value[0] // 4, value[1] // 4)
                count += 1
        for value in node.values():
            count += quarter_scale(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += quarter_scale(value)
    return count


@pytest.fixture(scope='session')
def ade_tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('ade_tiny'))
    make_ade_dataset(root, num_train=16, num_val=10, seed=0, min_size=96,
                     max_size=200)
    return root


@pytest.fixture(scope='session')
def make_tiny_config(ade_tiny):

    def make(path, max_iters=4, **overrides):
        cfg = Config.fromfile(S12_CONFIG)
        keys = ('model', 'train_dataloader', 'val_dataloader',
                'test_dataloader', 'tta_pipeline', 'test_pipeline_aligned')
        assert sum(quarter_scale(cfg[key]) for key in keys) > 0
        options = {
            'model.backbone.init_cfg': None,
            'train_cfg.max_iters': max_iters,
            'train_cfg.val_interval': max_iters,
            'default_hooks.checkpoint.interval': max_iters,
            'default_hooks.logger.interval': 1,
            'randomness': dict(seed=0),
            'env_cfg.cudnn_benchmark': False,
        }
        for loader in ('train_dataloader', 'val_dataloader',
                       'test_dataloader'):
            options[f'{loader}.dataset.data_root'] = ade_tiny
            options[f'{loader}.num_workers'] = 0
            options[f'{loader}.persistent_workers'] = False
        options.update(overrides)
        cfg.merge_from_dict(options)
        cfg.dump(str(path))
        return str(path)

    return make


def _run_tool(script, *args, timeout=1800, env=None, check=True,
              merge_stderr=True):
    cmd = [sys.executable, osp.join(REPO, 'tools', script), *map(str, args)]
    proc = subprocess.run(
        cmd, cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        pytest.fail(f'{" ".join(cmd)} exited with {proc.returncode}:\n'
                    f'{proc.stdout[-6000:]}\n{(proc.stderr or "")[-3000:]}')
    return proc


@pytest.fixture
def narrow_s12_config(tmp_path):
    """The S12 config with one block per stage and a narrow backbone, neck
    and head: the same code paths, quick to run and to compile."""
    path = tmp_path / 'narrow_s12.py'
    path.write_text(
        f"_base_ = {S12_CONFIG!r}\n"
        "model = dict(\n"
        "    backbone=dict(arch=dict(_delete_=True, layers=[1, 1, 1, 1],\n"
        "                            embed_dims=[8, 16, 24, 32])),\n"
        "    neck=dict(in_channels=[8, 16, 24, 32], out_channels=16),\n"
        "    decode_head=dict(in_channels=[16] * 4, channels=8))\n"
        "test_dataloader = dict(num_workers=0, persistent_workers=False)\n")
    return str(path)


@pytest.fixture
def winograd_on(monkeypatch):
    """Winograd runs where its other conditions hold, whatever this CPU's
    instruction set (it is chosen per CPU: ``winograd.FASTER_ON``), so
    that its tests exercise it on every machine."""
    from poolformer_seg.models import winograd
    monkeypatch.setattr(winograd, 'ON_THIS_CPU', True)


@pytest.fixture(scope='session')
def run_tool():
    return _run_tool


@pytest.fixture(scope='session')
def load_tool():

    def load(script):
        name = 'tools_' + osp.splitext(script)[0]
        spec = importlib.util.spec_from_file_location(
            name, osp.join(REPO, 'tools', script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@dataclass
class TrainedRun:
    config: str
    work_dir: str
    checkpoint: str
    losses: List[float]
    stdout: str


def read_losses(work_dir) -> List[float]:
    """Training losses per logged iteration, from mmengine's scalars.json."""
    files = glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))
    assert len(files) == 1, files
    with open(files[0]) as f:
        rows = [json.loads(line) for line in f]
    return [row['loss'] for row in rows if 'loss' in row]


@pytest.fixture(scope='session')
def trained_s12(tmp_path_factory, make_tiny_config):
    root = tmp_path_factory.mktemp('trained_s12')
    config = make_tiny_config(root / 'config.py', max_iters=TRAIN_ITERS)
    work_dir = str(root / 'work')
    proc = _run_tool('train.py', config, '--work-dir', work_dir)
    checkpoint = osp.join(work_dir, f'iter_{TRAIN_ITERS}.pth')
    assert osp.isfile(checkpoint), os.listdir(work_dir)
    return TrainedRun(config, work_dir, checkpoint, read_losses(work_dir),
                      proc.stdout)


# Session fixtures that train a model or run a tool end to end: every test
# that uses one belongs to the slow tier, wherever it is.
SLOW_FIXTURES = {'trained_s12', 'tested_s12', 'noisy_predictions', 'exported',
                 'tool_output', 'uninterrupted', 'report'}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, 'fixturenames', ())):
            item.add_marker(pytest.mark.slow)
