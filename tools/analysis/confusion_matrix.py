"""Confusion matrix and per-class IoU of a test run's saved predictions.

    python tools/test.py CONFIG CHECKPOINT --out preds/
    python tools/analysis/confusion_matrix.py CONFIG preds/ --out-dir analysis/

PRED_DIR holds one ``<image name>.png`` label map per test image, as
``tools/test.py --out`` writes them (MMSeg's ``IoUMetric(output_dir=...)``:
the dataset's own label space, so ADE20K predictions are 1..150). The ground
truth is the config's ``test_dataloader`` dataset, loaded with MMSeg's
``LoadAnnotations`` exactly as evaluation does (``reduce_zero_label``: 0
becomes the ignore index 255 and ``k`` becomes ``k - 1``). Writes to
``--out-dir``:

* ``confusion_matrix.npy``  ``C x C`` int64 pixel counts, rows = ground
  truth, columns = prediction, ignored pixels left out;
* ``per_class_iou.csv``     class, IoU %, Acc % (recall), GT and predicted
  pixels (IoU/Acc empty where undefined: class absent from both / from GT);
* ``confusion_matrix.png``  rows normalised to 1, restricted to the
  ``--max-classes`` most frequent ground-truth classes;
* ``per_class_iou.png``     IoU of every class present, sorted, with mIoU.

The printed aAcc / mIoU / mAcc use MMSeg's definitions (mean over classes
with a defined value), so they equal ``tools/test.py``'s numbers.
"""
import argparse
import csv
import os
import os.path as osp
import sys

import poolformer_seg  # noqa: F401  (must precede mmseg imports)
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.datasets.transforms import LoadAnnotations  # noqa: E402
from mmseg.registry import DATASETS  # noqa: E402
from PIL import Image  # noqa: E402

from poolformer_seg.apis import load_config  # noqa: E402
from poolformer_seg.datasets import DataError, check_input_file  # noqa: E402
from poolformer_seg.engine import add_debug_argument, run_tool  # noqa: E402


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int,
                     ignore_index: int = 255) -> np.ndarray:
    """``C x C`` counts of (ground truth, prediction) pairs.

    Pixels whose ground truth is ``ignore_index`` are skipped; any other
    label outside ``0..C-1`` (in either map) is an error.
    """
    if gt.shape != pred.shape:
        raise ValueError(f'prediction {pred.shape} and ground truth '
                         f'{gt.shape} differ in size')
    keep = gt != ignore_index
    gt, pred = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    for name, labels in (('ground truth', gt), ('prediction', pred)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f'{name} has labels {labels.min()}..'
                             f'{labels.max()} outside 0..{num_classes - 1}')
    return np.bincount(gt * num_classes + pred,
                       minlength=num_classes**2).reshape(num_classes,
                                                         num_classes)


def metrics(matrix: np.ndarray) -> dict:
    """MMSeg IoUMetric quantities from a confusion matrix (in %)."""
    intersect = np.diag(matrix).astype(np.float64)
    gt_area = matrix.sum(axis=1).astype(np.float64)
    pred_area = matrix.sum(axis=0).astype(np.float64)
    with np.errstate(divide='ignore', invalid='ignore'):
        iou = intersect / (gt_area + pred_area - intersect)
        acc = intersect / gt_area
    return dict(aAcc=100 * intersect.sum() / max(gt_area.sum(), 1),
                mIoU=100 * np.nanmean(iou), mAcc=100 * np.nanmean(acc),
                IoU=100 * iou, Acc=100 * acc, gt_area=gt_area,
                pred_area=pred_area)


def load_prediction(path: str, reduce_zero_label: bool) -> np.ndarray:
    """Read a ``tools/test.py --out`` PNG back into model class indices."""
    if not osp.lexists(path):
        raise FileNotFoundError(f'no prediction {path} (run tools/test.py '
                                '--out on the same test set)')
    rerun = 'write it again with tools/test.py --out'
    check_input_file(path, 'prediction', fix=rerun)
    try:
        with Image.open(path) as image:
            pred = np.asarray(image).astype(np.int64)
    except (OSError, SyntaxError) as err:  # PIL: damaged or not an image
        raise DataError(f'prediction {path} cannot be decoded ({err}); '
                        f'{rerun}') from None
    if pred.ndim != 2:
        raise ValueError(f'{path}: expected a single-channel label PNG')
    if reduce_zero_label:  # IoUMetric saved label + 1
        if pred.size and pred.min() < 1:
            raise ValueError(f'{path} has label 0, but with '
                             'reduce_zero_label predictions are 1..C')
        pred = pred - 1
    return pred


def accumulate(dataset, pred_dir: str, num_classes: int,
               ignore_index: int = 255) -> np.ndarray:
    """Sum the confusion matrices of every image of ``dataset``."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    if len(dataset) == 0:
        raise ValueError('the test dataset is empty')
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        name = osp.splitext(osp.basename(info['img_path']))[0]
        pred = load_prediction(osp.join(pred_dir, f'{name}.png'),
                               info.get('reduce_zero_label', False))
        loader = LoadAnnotations(
            reduce_zero_label=info.get('reduce_zero_label', False))
        gt = loader(dict(seg_map_path=info['seg_map_path'],
                         reduce_zero_label=info.get('reduce_zero_label'),
                         label_map=info.get('label_map'),
                         seg_fields=[]))['gt_seg_map']
        matrix += confusion_matrix(gt, pred, num_classes, ignore_index)
    return matrix


def write_csv(path, classes, result):
    def cell(value):
        return '' if np.isnan(value) else f'{value:.2f}'

    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['class', 'IoU', 'Acc', 'gt_pixels', 'pred_pixels'])
        for i, name in enumerate(classes):
            writer.writerow([name, cell(result['IoU'][i]),
                             cell(result['Acc'][i]),
                             int(result['gt_area'][i]),
                             int(result['pred_area'][i])])


def plot_matrix(path, matrix, classes, max_classes):
    """Row-normalised heat map of the most frequent ground-truth classes."""
    order = np.argsort(-matrix.sum(axis=1), kind='stable')
    shown = [i for i in order[:max_classes] if matrix[i].sum() > 0]
    sub = matrix[np.ix_(shown, shown)].astype(np.float64)
    rows = matrix[shown].sum(axis=1, keepdims=True)  # all predictions
    sub = np.divide(sub, rows, out=np.zeros_like(sub), where=rows > 0)
    size = max(4., .32 * len(shown) + 2.)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(sub, cmap='Blues', vmin=0, vmax=1)
    names = [classes[i] for i in shown]
    ax.set_xticks(range(len(shown)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(shown)), names, fontsize=7)
    ax.set_xlabel('prediction')
    ax.set_ylabel('ground truth')
    ax.set_title(f'confusion (rows sum to 1 over all {len(classes)} '
                 f'predictions; {len(shown)} most frequent GT classes)',
                 fontsize=8)
    fig.colorbar(image, ax=ax, fraction=.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_iou(path, classes, result):
    present = [i for i in range(len(classes))
               if not np.isnan(result['IoU'][i])]
    present.sort(key=lambda i: result['IoU'][i])
    fig, ax = plt.subplots(figsize=(6, max(2.5, .22 * len(present) + 1)))
    ax.barh(range(len(present)), [result['IoU'][i] for i in present],
            color='C0')
    ax.set_yticks(range(len(present)), [classes[i] for i in present],
                  fontsize=7)
    ax.axvline(result['mIoU'], color='C3', linestyle='--',
               label=f'mIoU {result["mIoU"]:.2f}')
    ax.set_xlim(0, 100)
    ax.set_xlabel('IoU (%)')
    ax.legend(loc='lower right', fontsize='small')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Confusion matrix and per-class IoU of saved predictions')
    parser.add_argument('config', help='config whose test_dataloader '
                        'dataset is the ground truth')
    parser.add_argument('pred_dir', help='label PNGs from tools/test.py '
                        '--out')
    parser.add_argument('--out-dir', default='confusion_out',
                        help='output folder (default: ./confusion_out)')
    parser.add_argument('--max-classes', type=int, default=40,
                        help='classes shown in the matrix picture, most '
                        'frequent in the ground truth first (default: 40)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    add_debug_argument(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    classes = dataset.metainfo['classes']
    ignore_index = cfg.get('test_evaluator', {}).get('ignore_index', 255)
    try:
        matrix = accumulate(dataset, args.pred_dir, len(classes),
                            ignore_index)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f'error: {err}')
    result = metrics(matrix)
    os.makedirs(args.out_dir, exist_ok=True)
    np.save(osp.join(args.out_dir, 'confusion_matrix.npy'), matrix)
    write_csv(osp.join(args.out_dir, 'per_class_iou.csv'), classes, result)
    plot_matrix(osp.join(args.out_dir, 'confusion_matrix.png'), matrix,
                classes, args.max_classes)
    plot_iou(osp.join(args.out_dir, 'per_class_iou.png'), classes, result)
    print(f'{len(dataset)} images: aAcc {result["aAcc"]:.2f}  mIoU '
          f'{result["mIoU"]:.2f}  mAcc {result["mAcc"]:.2f}')
    print(f'wrote confusion_matrix.npy/.png, per_class_iou.csv/.png to '
          f'{args.out_dir}')


if __name__ == '__main__':
    run_tool(main)
