"""tools/analysis/: get_flops.py, plot_curves.py, confusion_matrix.py."""
import glob
import json
import os
import os.path as osp
import re
import shutil

import cv2
import numpy as np
import pytest
import torch

import poolformer_seg  # noqa: F401
from mmseg.evaluation import IoUMetric
from poolformer_seg.apis import build_segmentor
from poolformer_seg.apis.complexity import count_flops, count_parameters

from tests.apis.tiny import TINY_MODEL
from tests.conftest import REPO, TRAIN_ITERS
from tests.helpers.hang_guard import hang_guard

# Built-model counts of mmseg 1.x's PoolFormer segmentors (150 classes),
# see /work/shared/reference/upstream.md section 1.2.
KNOWN_PARAMS = {
    's12': (11_403_200, 2_623_488, 1_643_158, 15_669_846),
    's24': (20_876_992, 2_623_488, 1_643_158, 25_143_638),
    's36': (30_350_784, 2_623_488, 1_643_158, 34_617_430),
    'm36': (55_404_864, 2_729_984, 1_643_158, 59_778_006),
    'm48': (72_705_792, 2_729_984, 1_643_158, 77_078_934),
}


def config_of(variant):
    return osp.join(REPO, 'configs', f'fpn_poolformer_{variant}_ade20k.py')


# ---------------------------------------------------------------- get_flops

@pytest.mark.slow
@pytest.mark.parametrize('variant', sorted(KNOWN_PARAMS))
def test_parameter_counts_equal_the_known_ones(variant):
    counts = count_parameters(build_segmentor(config_of(variant)))
    assert (counts['backbone'], counts['neck'], counts['decode_head'],
            counts['total']) == KNOWN_PARAMS[variant]


def analytic_backbone_flops(backbone, shape):
    """Conv multiply-adds + 5 per GroupNorm element, from layer shapes."""
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * module.in_channels // module.groups * kh * kw

    def norm_hook(module, inputs, output):
        nonlocal total
        total += 5 * inputs[0].numel()

    handles = [m.register_forward_hook(
        conv_hook if isinstance(m, torch.nn.Conv2d) else norm_hook)
        for m in backbone.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.GroupNorm))]
    with torch.no_grad():
        backbone(torch.zeros(1, 3, *shape))
    for handle in handles:
        handle.remove()
    return total


@pytest.mark.slow
def test_get_flops_tool_on_s12(load_tool, tmp_path, capsys):
    out = str(tmp_path / 'flops.json')
    load_tool('analysis/get_flops.py').main(
        [config_of('s12'), '--shape', '64', '96', '--json', out])
    printed = capsys.readouterr().out
    assert re.search(r'backbone\s+11,403,200', printed)
    assert 'not counted' in printed and 'avg_pool2d' in printed
    with open(out) as f:
        result = json.load(f)
    assert result['input_shape'] == [3, 64, 96]
    assert result['params']['backbone'] == 11_403_200
    flops = result['flops']
    assert sum(v for k, v in flops.items() if k != 'total') == \
        flops['total']
    # 'other': FPNHead's three same-size bilinear resizes of its 128-channel
    # 1/4-resolution maps (4 FLOPs per output element), which the tracer
    # files under the segmentor
    assert flops['other'] == 3 * 4 * 128 * (64 // 4) * (96 // 4)
    model = build_segmentor(config_of('s12'), {'model.impl': 'plain'})
    assert flops['backbone'] == analytic_backbone_flops(model.backbone,
                                                        (64, 96))
    # every counted op is per pixel: twice the side, four times the FLOPs
    doubled, _ = count_flops(model, (128, 192))
    assert doubled == {part: 4 * value for part, value in flops.items()}


# -------------------------------------------------------------- plot_curves

@pytest.mark.slow
def test_plot_curves_from_a_real_log(trained_s12, load_tool, tmp_path):
    """The shared fixture's tools/train.py run: S12, TRAIN_ITERS iterations,
    a log line per iteration, validation at the end."""
    work_dir, stdout = trained_s12.work_dir, trained_s12.stdout
    tool = load_tool('analysis/plot_curves.py')
    curves = tool.load_curves(work_dir)
    # the text log that mmengine prints lists the same loss and mIoU
    logged_losses = [float(v) for v in re.findall(
        rf'Iter\(train\)\s+\[\s*\d+/{TRAIN_ITERS}\].*?\sloss: ([\d.]+)',
        stdout)]
    logged_miou = [float(v) for v in re.findall(
        r'Iter\(val\).*?mIoU: ([\d.]+)', stdout)]
    steps, losses = curves['train']['loss']
    assert steps == list(range(1, TRAIN_ITERS + 1))
    assert len(logged_losses) == TRAIN_ITERS
    np.testing.assert_allclose(losses, logged_losses, atol=5e-5)
    steps, miou = curves['val']['mIoU']
    assert steps == [TRAIN_ITERS] and len(logged_miou) == 1
    np.testing.assert_allclose(miou, logged_miou, atol=5e-3)
    steps, lr = curves['train']['lr']
    assert lr[0] == pytest.approx(2e-4) and lr[-1] < lr[0]  # poly decay

    out = str(tmp_path / 'curves.png')
    tool.main([work_dir, work_dir, '--labels', 'run a', 'run b', '--out',
               out, '--keys', 'loss', 'lr', 'mIoU'])
    image = cv2.imread(out)
    assert image is not None and image.shape[0] > 600  # three subplots
    assert osp.getsize(out) > 10_000
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # not blank


def test_resumed_run_continues_the_curve(trained_s12, load_tool, tmp_path):
    work_dir = trained_s12.work_dir
    run = tmp_path / 'resumed'
    first = glob.glob(osp.join(work_dir, '*', 'vis_data',
                               'scalars.json'))[0]
    shutil.copytree(osp.dirname(osp.dirname(first)), run / '20000101_000000')
    later = run / '20990101_000000' / 'vis_data'
    os.makedirs(later)
    (later / 'scalars.json').write_text(
        json.dumps(dict(lr=1e-5, loss=0.5, iter=TRAIN_ITERS,
                        step=TRAIN_ITERS)) + '\n' +
        json.dumps(dict(lr=1e-5, loss=0.25, iter=TRAIN_ITERS + 1,
                        step=TRAIN_ITERS + 1)) + '\n')
    steps, losses = load_tool('analysis/plot_curves.py').load_curves(
        str(run))['train']['loss']
    assert steps == list(range(1, TRAIN_ITERS + 2))
    assert losses[-2:] == [0.5, 0.25]


def test_plot_curves_names_missing_keys(trained_s12, load_tool, tmp_path):
    tool = load_tool('analysis/plot_curves.py')
    with pytest.raises(SystemExit, match="no run logged 'mDice'.*mIoU"):
        tool.main([trained_s12.work_dir, '--keys', 'mDice', '--out',
                   str(tmp_path / 'x.png')])
    with pytest.raises(SystemExit, match='neither a work dir'):
        tool.main([str(tmp_path / 'nothing'), '--out',
                   str(tmp_path / 'x.png')])


# --------------------------------------------------------- confusion_matrix

@pytest.fixture(scope='module')
def noisy_predictions(ade_tiny, make_tiny_config, tmp_path_factory):
    """Label PNGs like tools/test.py --out writes (1..150): the ground truth
    with 30% of the pixels replaced by random classes."""
    root = tmp_path_factory.mktemp('confusion')
    config = make_tiny_config(root / 'tiny.py', **TINY_MODEL)
    rng = np.random.default_rng(0)
    pred_dir = root / 'preds'
    os.makedirs(pred_dir)
    pairs = []
    gt_dir = osp.join(ade_tiny, 'annotations', 'validation')
    for name in sorted(os.listdir(gt_dir)):
        gt = cv2.imread(osp.join(gt_dir, name), cv2.IMREAD_UNCHANGED)
        pred = np.where(gt > 0, gt, rng.integers(1, 151, gt.shape))
        noise = rng.random(gt.shape) < 0.3
        pred[noise] = rng.integers(1, 151, noise.sum())
        cv2.imwrite(str(pred_dir / name), pred.astype(np.uint8))
        pairs.append((gt, pred))
    return config, str(pred_dir), pairs


@pytest.mark.slow
def test_confusion_matrix_matches_numpy_and_iou_metric(
        noisy_predictions, load_tool, tmp_path, capsys):
    config, pred_dir, pairs = noisy_predictions
    out = str(tmp_path / 'out')
    load_tool('analysis/confusion_matrix.py').main(
        [config, pred_dir, '--out-dir', out])
    matrix = np.load(osp.join(out, 'confusion_matrix.npy'))
    # reference: reduce_zero_label by hand, count pixel pairs with add.at
    expected = np.zeros((150, 150), np.int64)
    metric = IoUMetric()
    areas = []
    for gt, pred in pairs:
        valid = gt > 0
        np.add.at(expected, (gt[valid] - 1, pred[valid] - 1), 1)
        label = torch.from_numpy(np.where(valid, gt.astype(np.int64) - 1,
                                          255))
        areas.append(metric.intersect_and_union(
            torch.from_numpy(pred.astype(np.int64) - 1), label, 150, 255))
    np.testing.assert_array_equal(matrix, expected)
    totals = [sum(a[i] for a in areas) for i in range(4)]
    reference = IoUMetric.total_area_to_metrics(*totals, ['mIoU'])
    printed = capsys.readouterr().out
    miou = float(re.search(r'mIoU ([\d.]+)', printed).group(1))
    assert miou == pytest.approx(100 * np.nanmean(reference['IoU']),
                                 abs=0.005)
    aacc = float(re.search(r'aAcc ([\d.]+)', printed).group(1))
    assert aacc == pytest.approx(100 * reference['aAcc'], abs=0.005)
    with open(osp.join(out, 'per_class_iou.csv')) as f:
        rows = {row.split(',')[0]: row.strip().split(',') for row in f}
    wall = 100 * reference['IoU'][0]
    assert float(rows['wall'][1]) == pytest.approx(wall, abs=0.005)
    for name in ('confusion_matrix.png', 'per_class_iou.png'):
        assert cv2.imread(osp.join(out, name)) is not None


def test_confusion_matrix_reports_missing_predictions(
        noisy_predictions, load_tool, tmp_path):
    config, pred_dir, _ = noisy_predictions
    partial = tmp_path / 'partial'
    shutil.copytree(pred_dir, partial)
    os.remove(partial / sorted(os.listdir(partial))[0])
    with pytest.raises(SystemExit, match='no prediction .*png'):
        load_tool('analysis/confusion_matrix.py').main(
            [config, str(partial), '--out-dir', str(tmp_path / 'o')])


@pytest.mark.parametrize('kind', ['pipe', 'empty', 'not an image'])
def test_confusion_matrix_refuses_unusable_predictions(
        noisy_predictions, load_tool, tmp_path, kind):
    """A named pipe was reported as a missing prediction, an empty or
    damaged file ended in PIL's UnidentifiedImageError traceback."""
    config, pred_dir, _ = noisy_predictions
    broken = tmp_path / 'broken'
    shutil.copytree(pred_dir, broken)
    victim = broken / sorted(os.listdir(broken))[0]
    os.remove(victim)
    if kind == 'pipe':
        os.mkfifo(victim)
    else:
        victim.write_bytes(b'' if kind == 'empty' else b'no PNG at all')
    expected = {'pipe': 'is a named pipe', 'empty': r'is empty \(0 bytes\)',
                'not an image': 'cannot be decoded'}[kind]
    with hang_guard(), pytest.raises(
            SystemExit, match=f'prediction {victim} {expected}.*tools/test.py'
            ' --out'):
        load_tool('analysis/confusion_matrix.py').main(
            [config, str(broken), '--out-dir', str(tmp_path / 'o')])


def test_plot_curves_refuses_a_named_pipe(load_tool, tmp_path):
    pipe = tmp_path / 'scalars.json'
    os.mkfifo(pipe)
    with hang_guard(), pytest.raises(SystemExit,
                                     match=f'{pipe} is a named pipe'):
        load_tool('analysis/plot_curves.py').main(
            [str(pipe), '--out', str(tmp_path / 'x.png')])


# ----------------------------------------------------------- benchmark_eval

@pytest.mark.slow
def test_benchmark_eval_runs_both_routes_on_equal_weights(
        load_tool, tmp_path, capsys, narrow_s12_config):
    """The whole-evaluation benchmark runs the test loop with ours and with
    the upstream route on the same weights: same predictions, so the same
    mIoU; nothing is compiled on CPU."""
    tool = load_tool('analysis/benchmark_eval.py')
    tool.main([narrow_s12_config, '--num-images', '2', '--threads', '1',
               '--work-dir', str(tmp_path / 'work')])
    rows = [line.split('|')[1:-1] for line in capsys.readouterr().out
            .splitlines() if line.startswith('| ours') or
            line.startswith('| reference')]
    assert [r[0].strip() for r in rows] == ['ours', 'reference']
    for row in rows:
        assert float(row[1]) > 0 and int(row[4]) == 0  # wall s; compiled
    assert float(rows[0][5]) == float(rows[1][5])  # mIoU
