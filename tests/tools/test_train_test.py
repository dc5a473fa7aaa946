"""End to end: tools/train.py and tools/test.py on generated ADE20K data.

The runs use configs/fpn_poolformer_s12_ade20k.py (the real S12 model, 150
classes, the real pipelines) with every image scale divided by 4 (crops of
128 instead of 512) so that CPU runs take seconds per iteration; see
``make_tiny_config`` in tests/conftest.py.
"""
import os
import os.path as osp
import re
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from mmengine.config import Config
from poolformer_seg.utils.safe_load import load
from tests.conftest import REPO, S12_CONFIG, TRAIN_ITERS

NUM_CLASSES = 150
SUMMARY = re.compile(r'aAcc: ([\d.]+)\s+mIoU: ([\d.]+)\s+mAcc: ([\d.]+)\s*$',
                     re.M)


def summary_of(stdout):
    """(aAcc, mIoU, mAcc) from the summary line that tools/test.py prints."""
    found = SUMMARY.findall(stdout)
    assert found, stdout[-3000:]
    return tuple(float(v) for v in found[-1])


def numpy_metrics(pred_dir, gt_dir):
    """aAcc, mIoU, mAcc (percent) from label PNGs, computed independently.

    Predictions are saved in the dataset's label space (1..150); the ground
    truth is the raw ADE20K annotation (0 = other). reduce_zero_label maps
    k -> k - 1 and 0 -> 255, and 255 is ignored.
    """
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    names = sorted(os.listdir(gt_dir))
    assert sorted(os.listdir(pred_dir)) == names
    for name in names:
        gt = cv2.imread(osp.join(gt_dir, name), cv2.IMREAD_UNCHANGED)
        pred = cv2.imread(osp.join(pred_dir, name), cv2.IMREAD_UNCHANGED)
        assert pred.shape == gt.shape, name  # evaluated at original size
        assert pred.min() >= 1, 'predictions must be in 1..150'
        gt = gt.astype(np.int64) - 1          # 0 -> -1 (ignored)
        pred = pred.astype(np.int64) - 1
        valid = gt >= 0
        confusion += np.bincount(
            gt[valid] * NUM_CLASSES + pred[valid],
            minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)
    tp = np.diag(confusion).astype(float)
    gt_area, pred_area = confusion.sum(1), confusion.sum(0)
    union = gt_area + pred_area - tp
    with np.errstate(invalid='ignore', divide='ignore'):
        iou = tp / union          # nan where a class is neither GT nor pred
        acc = tp / gt_area        # nan where a class is not in the GT
    return (100 * tp.sum() / confusion.sum(), 100 * np.nanmean(iou),
            100 * np.nanmean(acc))


def majority_miou(gt_dir, first=None):
    """mIoU of predicting the most frequent valid class everywhere (on the
    ``first`` images if given)."""
    labels = np.concatenate([
        cv2.imread(osp.join(gt_dir, n), cv2.IMREAD_UNCHANGED).ravel()
        for n in sorted(os.listdir(gt_dir))[:first]])
    labels = labels[labels > 0]
    counts = np.bincount(labels)
    present = np.count_nonzero(counts)
    # one class has IoU = its frequency, the others 0
    return 100 * counts.max() / labels.size / present


@pytest.fixture(scope='session')
def tested_s12(trained_s12, run_tool, tmp_path_factory):
    """tools/test.py --out on the trained checkpoint."""
    root = tmp_path_factory.mktemp('tested_s12')
    out = str(root / 'preds')
    proc = run_tool('test.py', trained_s12.config, trained_s12.checkpoint,
                    '--work-dir', str(root / 'work'), '--out', out,
                    merge_stderr=False)
    return proc.stdout, out


def test_train_writes_checkpoint(trained_s12):
    state = load(trained_s12.checkpoint)
    assert state['meta']['iter'] == TRAIN_ITERS
    assert 'optimizer' in state and 'param_schedulers' in state
    assert any(k.startswith('backbone.stages.3.') for k in state['state_dict'])
    assert len(trained_s12.losses) == TRAIN_ITERS


def test_train_prints_no_known_upstream_warning(trained_s12):
    from poolformer_seg.engine.launch import KNOWN_WARNINGS
    patterns = [p for p, _, _ in KNOWN_WARNINGS] + [
        'MultiScaleDeformableAttention']
    shown = [p for p in patterns if re.search(p, trained_s12.stdout)]
    assert not shown, trained_s12.stdout[-3000:]


@pytest.mark.slow
def test_test_py_prints_table_and_summary(tested_s12):
    stdout, _ = tested_s12  # stdout alone, without stderr
    assert 'per class results:' in stdout
    # the table lists all 150 ADE20K classes with IoU and Acc columns
    assert re.search(r'\|\s+Class\s+\|\s+IoU\s+\|\s+Acc\s+\|', stdout)
    for name in ('wall', 'sky', 'flag', 'clock'):
        assert re.search(rf'\|\s+{name}\s+\|', stdout), name
    summary_of(stdout)


def test_miou_matches_numpy_confusion_matrix(tested_s12, ade_tiny):
    stdout, out = tested_s12
    reported = summary_of(stdout)
    expected = numpy_metrics(out, osp.join(ade_tiny, 'annotations',
                                           'validation'))
    print(f'\ntools/test.py aAcc/mIoU/mAcc {reported}; numpy '
          f'{tuple(round(float(v), 2) for v in expected)}')
    # mmseg rounds to 2 decimals
    np.testing.assert_allclose(reported, expected, atol=0.0051)


def test_validation_during_training_agrees(trained_s12, tested_s12):
    """The ValLoop at the last iteration saw the same model and data."""
    val = re.findall(r'Iter\(val\) \[10/10\]\s+aAcc: ([\d.]+)\s+mIoU: '
                     r'([\d.]+)\s+mAcc: ([\d.]+)', trained_s12.stdout)
    assert len(val) == 1
    assert tuple(map(float, val[0])) == summary_of(tested_s12[0])


def test_learning_beats_chance(trained_s12, tested_s12, ade_tiny):
    losses = trained_s12.losses
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    _, miou, _ = summary_of(tested_s12[0])
    chance = majority_miou(osp.join(ade_tiny, 'annotations', 'validation'))
    print(f'\nS12 (quarter scale), {TRAIN_ITERS} iterations on CPU: loss '
          f'{first:.3f} (first 5) -> {last:.3f} (last 10); val mIoU '
          f'{miou:.2f} vs {chance:.2f} for the majority class')
    assert last < 0.65 * first
    assert miou > 3 * chance


@pytest.mark.slow
def test_tta_reports_miou(trained_s12, tested_s12, run_tool, ade_tiny,
                          tmp_path):
    # 3 of the validation images: TTA makes 12 passes per image
    out = tmp_path / 'preds'
    proc = run_tool('test.py', trained_s12.config, trained_s12.checkpoint,
                    '--work-dir', str(tmp_path), '--tta', '--out', str(out),
                    '--cfg-options', 'test_dataloader.dataset.indices=3')
    _, miou, _ = summary_of(proc.stdout)
    names = sorted(os.listdir(out))
    assert len(names) == 3
    chance = majority_miou(osp.join(ade_tiny, 'annotations', 'validation'),
                           first=3)
    print(f'\nmIoU with multi-scale + flip (3 images) {miou:.2f}, majority '
          f'class {chance:.2f}')
    assert miou > 3 * chance
    # the merged predictions differ from the single-scale ones
    single_dir = tested_s12[1]
    changed = sum(
        np.count_nonzero(cv2.imread(str(out / n), cv2.IMREAD_UNCHANGED) !=
                         cv2.imread(osp.join(single_dir, n),
                                    cv2.IMREAD_UNCHANGED)) for n in names)
    assert changed > 0


@pytest.mark.slow
def test_strict_checkpoint_loading(trained_s12, run_tool, tmp_path):
    state = load(trained_s12.checkpoint)
    del state['state_dict']['decode_head.conv_seg.weight']
    broken = str(tmp_path / 'broken.pth')
    torch.save({'state_dict': state['state_dict']}, broken)
    args = [trained_s12.config, broken, '--work-dir', str(tmp_path / 'w')]
    proc = run_tool('test.py', *args, check=False)
    assert proc.returncode != 0
    assert 'CheckpointMismatchError' in proc.stdout
    assert 'decode_head.conv_seg.weight' in proc.stdout
    show_dir = tmp_path / 'show'
    proc = run_tool('test.py', *args, '--allow-partial-load', '--show-dir',
                    str(show_dir))
    assert 'decode_head.conv_seg.weight' in proc.stdout
    summary_of(proc.stdout)
    # --show-dir: one painted prediction per validation image
    painted = [f for _, _, files in os.walk(show_dir) for f in files
               if f.endswith('.png')]
    assert len(painted) == 10, painted


def test_amp_flag(load_tool, monkeypatch):
    monkeypatch.setenv('LOCAL_RANK', '0')
    train = load_tool('train.py')
    config = osp.join(REPO, 'configs', 'fpn_poolformer_s12_ade20k.py')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit, match='--amp needs a CUDA device'):
        train.main([config, '--amp'])
    # with CUDA: our configs already use AMP there; plain OptimWrapper
    # configs switch to AmpOptimWrapper as in mmseg
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    cfg = train.build_config(train.parse_args([config, '--amp']))
    assert 'already enabled' in train.enable_amp(cfg)
    cfg.optim_wrapper.type = 'OptimWrapper'
    train.enable_amp(cfg)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 'dynamic'


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_distributed_gloo_replicas_identical(make_tiny_config, tmp_path):
    """2 processes, torchrun + gloo, via tools/dist_train.sh."""
    iters = 2
    config = make_tiny_config(
        tmp_path / 'config.py', max_iters=iters,
        custom_imports=dict(imports=['poolformer_seg',
                                     'tests.tools.dump_params_hook'],
                            allow_failed_imports=False),
        custom_hooks=Config.fromfile(S12_CONFIG).get('custom_hooks', []) +
        [dict(type='DumpParamsHook')])
    work_dir = tmp_path / 'work'
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(free_port()),
               PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        ['bash', osp.join(REPO, 'tools', 'dist_train.sh'), config, '2',
         '--work-dir', str(work_dir)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert 'nccl -> gloo' in proc.stdout
    ranks = [load(str(work_dir / f'params_rank{r}.pth')) for r in (0, 1)]
    # the two ranks trained on different images ...
    seen = [set(r['images']) for r in ranks]
    assert seen[0] and seen[1] and seen[0] != seen[1]
    # ... and still hold identical parameters, which moved from the init
    names = ranks[0]['final'].keys()
    assert names == ranks[1]['final'].keys() and len(names) > 100
    for name in names:
        assert torch.equal(ranks[0]['final'][name], ranks[1]['final'][name]), \
            name
    moved = [n for n in names
             if not torch.equal(ranks[0]['initial'][n], ranks[0]['final'][n])]
    assert len(moved) > 0.9 * len(names)
    # the checkpoint holds the same weights
    saved = load(str(work_dir / f'iter_{iters}.pth'))['state_dict']
    for name in names:
        assert torch.equal(saved[name], ranks[0]['final'][name]), name
