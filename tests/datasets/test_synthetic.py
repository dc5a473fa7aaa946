"""tools/make_ade_dataset.py and poolformer_seg.datasets.synthetic."""
import hashlib
import os
import os.path as osp

import cv2
import numpy as np
import pytest

import poolformer_seg  # noqa: F401  (before mmseg)
from mmengine.registry import init_default_scope
from mmseg.datasets import ADE20KDataset
from poolformer_seg.datasets.synthetic import (CLASSES, OTHER_LABEL,
                                               make_ade_dataset)


def digest(root):
    """sha256 over every file's relative path and bytes."""
    sha = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = osp.join(folder, name)
            sha.update(osp.relpath(path, root).encode())
            with open(path, 'rb') as f:
                sha.update(f.read())
    return sha.hexdigest()


def read_split(root, split):
    names = sorted(n[:-4] for n in os.listdir(
        osp.join(root, 'images', split)))
    images = [cv2.imread(osp.join(root, 'images', split, n + '.jpg'))
              for n in names]
    labels = [cv2.imread(osp.join(root, 'annotations', split, n + '.png'),
                         cv2.IMREAD_UNCHANGED) for n in names]
    return names, images, labels


def test_cli_writes_ade_layout(tmp_path, load_tool, capsys):
    make = load_tool('make_ade_dataset.py')
    out = tmp_path / 'ade'
    make.main([str(out), '--num-train', '5', '--num-val', '3', '--seed', '1'])
    assert 'wrote 5 training and 3 validation images' in \
        capsys.readouterr().out
    for split, count in (('training', 5), ('validation', 3)):
        prefix = 'train' if split == 'training' else 'val'
        names, images, labels = read_split(str(out), split)
        assert names == [f'ADE_{prefix}_{i:08d}' for i in range(count)]
        for image, label in zip(images, labels):
            assert image.dtype == np.uint8 and image.ndim == 3
            assert label.dtype == np.uint8 and label.ndim == 2
            assert label.shape == image.shape[:2]
    # refuses to write over an existing dataset
    with pytest.raises(SystemExit, match='exists'):
        make.main([str(out)])


def test_deterministic_given_seed(tmp_path):
    make_ade_dataset(str(tmp_path / 'a'), 3, 2, seed=7)
    make_ade_dataset(str(tmp_path / 'b'), 3, 2, seed=7)
    make_ade_dataset(str(tmp_path / 'c'), 3, 2, seed=8)
    assert digest(tmp_path / 'a') == digest(tmp_path / 'b')
    assert digest(tmp_path / 'a') != digest(tmp_path / 'c')


def test_labels_sizes_and_classes(tmp_path):
    make_ade_dataset(str(tmp_path), 24, 2, seed=0)
    _, images, labels = read_split(str(tmp_path), 'training')
    shapes = {image.shape[:2] for image in images}
    assert len(shapes) == len(images)  # sizes vary
    assert all(h % 32 and w % 32 for h, w in shapes)
    used = np.unique(np.concatenate([label.ravel() for label in labels]))
    expected = {OTHER_LABEL} | {c.label for c in CLASSES}
    assert set(used.tolist()) == expected  # every class appears, nothing else
    assert all(1 <= c.label <= 150 for c in CLASSES)
    assert max(c.label for c in CLASSES) - min(c.label for c in CLASSES) > 100


def test_class_visible_from_colour(tmp_path):
    """A nearest-mean classifier on blurred pixel colours already separates
    the classes: the content is learnable."""
    make_ade_dataset(str(tmp_path), 12, 6, seed=3)
    feats = {}
    for split in ('training', 'validation'):
        _, images, labels = read_split(str(tmp_path), split)
        pixels, targets = [], []
        for image, label in zip(images, labels):
            hsv = cv2.cvtColor(cv2.blur(image, (9, 9)), cv2.COLOR_BGR2HSV)
            # hue as a point on the circle, plus saturation and value
            angle = hsv[..., 0].astype(float) * np.pi / 90
            feat = np.stack([np.cos(angle) * 100, np.sin(angle) * 100,
                             hsv[..., 1], hsv[..., 2]], axis=-1)
            keep = cv2.erode((label > 0).astype(np.uint8),
                             np.ones((9, 9), np.uint8)) > 0
            pixels.append(feat[keep])
            targets.append(label[keep])
        feats[split] = np.concatenate(pixels), np.concatenate(targets)
    x, y = feats['training']
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    xv, yv = feats['validation']
    pred = classes[np.argmin(((xv[:, None] - means[None]) ** 2).sum(-1), 1)]
    accuracy = (pred == yv).mean()
    print(f'\nnearest-mean colour classifier, validation pixel accuracy '
          f'{accuracy:.3f}')
    assert accuracy > 0.9


def test_ade20k_dataset_reads_it(tmp_path):
    make_ade_dataset(str(tmp_path), 4, 2, seed=0)
    init_default_scope('mmseg')
    dataset = ADE20KDataset(
        data_root=str(tmp_path),
        data_prefix=dict(img_path='images/validation',
                         seg_map_path='annotations/validation'),
        pipeline=[dict(type='LoadImageFromFile'),
                  dict(type='LoadAnnotations', reduce_zero_label=True)])
    assert len(dataset) == 2
    sample = dataset[0]
    raw = cv2.imread(osp.join(str(tmp_path), 'annotations', 'validation',
                              'ADE_val_00000000.png'), cv2.IMREAD_UNCHANGED)
    expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
    np.testing.assert_array_equal(sample['gt_seg_map'], expected)


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_train=0), 'num_train'),
    (dict(num_val=1.5), 'num_val'),
    (dict(min_size=300, max_size=200), 'min_size'),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_ade_dataset(str(tmp_path), **kwargs)
