"""A small synthetic dataset in the ADE20K (ADEChallengeData2016) layout.

For machines without ADE20K: tests, the demo, and a quick check that a
config trains. ``make_ade_dataset(out_dir)`` writes::

    out_dir/images/training/ADE_train_00000000.jpg ...
    out_dir/images/validation/ADE_val_00000000.jpg ...
    out_dir/annotations/training/ADE_train_00000000.png ...   (uint8 labels)
    out_dir/annotations/validation/ADE_val_00000000.png ...

Labels follow ADE20K: 0 is "other" (dropped by ``reduce_zero_label``) and
``k`` in 1..150 is the ADE20K class ``k`` (``ADE20KDataset`` class ``k - 1``
after the reduction). Each image is a background region of one class with
2-5 shapes of other classes on it, plus, in most images, a patch of grey
noise labelled 0. A class is recognisable from its colour (hues 45 degrees
apart, wider than the +-18 degree hue jitter of ``PhotoMetricDistortion``)
and its texture, so a network learns it within a few hundred iterations.
Sizes vary and are never multiples of 32, which exercises the test-time
resizing. The output is a pure function of the arguments (``seed`` included).
"""
import os
import os.path as osp
from dataclasses import dataclass
from typing import Dict, List, Tuple

import cv2
import numpy as np

SPLITS = (('training', 'train'), ('validation', 'val'))


@dataclass(frozen=True)
class ClassStyle:
    """How pixels of one ADE20K class are drawn."""
    label: int      # ADE20K label, 1..150
    name: str       # ADE20K class name
    hue: int        # OpenCV hue, 0..179 (= degrees / 2)
    pattern: str    # 'flat', 'hstripes', 'vstripes', 'checker', 'dots'


# Three background classes and five object classes, spread over 1..150.
BACKGROUND_CLASSES = (
    ClassStyle(1, 'wall', 15, 'hstripes'),
    ClassStyle(3, 'sky', 105, 'flat'),
    ClassStyle(4, 'floor', 37, 'checker'),
)
OBJECT_CLASSES = (
    ClassStyle(5, 'tree', 60, 'dots'),
    ClassStyle(13, 'person', 150, 'vstripes'),
    ClassStyle(21, 'car', 0, 'checker'),
    ClassStyle(77, 'boat', 82, 'hstripes'),
    ClassStyle(150, 'flag', 127, 'dots'),
)
CLASSES = BACKGROUND_CLASSES + OBJECT_CLASSES
OTHER_LABEL = 0


def _texture(style: ClassStyle, height: int, width: int,
             rng: np.random.Generator) -> np.ndarray:
    """``height x width x 3`` uint8 BGR texture of one class."""
    period = int(rng.integers(8, 14))
    ys, xs = np.mgrid[:height, :width]
    if style.pattern == 'hstripes':
        mask = (ys // (period // 2)) % 2 == 0
    elif style.pattern == 'vstripes':
        mask = (xs // (period // 2)) % 2 == 0
    elif style.pattern == 'checker':
        mask = ((ys // period) + (xs // period)) % 2 == 0
    elif style.pattern == 'dots':
        mask = ((ys % period - period / 2) ** 2 +
                (xs % period - period / 2) ** 2) < (period / 3) ** 2
    else:  # flat
        mask = np.zeros((height, width), dtype=bool)
    value = np.where(mask, 235, 165).astype(np.float32)
    value += rng.normal(0, 6, size=(height, width))
    hsv = np.empty((height, width, 3), dtype=np.uint8)
    hue = (style.hue + int(rng.integers(-4, 5))) % 180
    hsv[..., 0] = hue
    hsv[..., 1] = int(rng.integers(170, 230))
    hsv[..., 2] = np.clip(value, 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def _shape_mask(height: int, width: int,
                rng: np.random.Generator) -> np.ndarray:
    """A random ellipse, rectangle or triangle covering 3-25% of the image."""
    mask = np.zeros((height, width), dtype=np.uint8)
    side = min(height, width)
    cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
    rx, ry = (int(rng.integers(side // 7, side // 3)) for _ in range(2))
    kind = rng.integers(3)
    if kind == 0:
        cv2.ellipse(mask, (cx, cy), (rx, ry), float(rng.uniform(0, 180)), 0,
                    360, 1, thickness=-1)
    elif kind == 1:
        cv2.rectangle(mask, (cx - rx, cy - ry), (cx + rx, cy + ry), 1,
                      thickness=-1)
    else:
        angles = rng.uniform(0, 2 * np.pi, size=3)
        points = np.stack([cx + 1.5 * rx * np.cos(angles),
                           cy + 1.5 * ry * np.sin(angles)], axis=1)
        cv2.fillPoly(mask, [points.astype(np.int32)], 1)
    return mask.astype(bool)


def _size(rng: np.random.Generator, low: int, high: int) -> int:
    size = int(rng.integers(low, high + 1))
    return size + 1 if size % 32 == 0 else size


def make_sample(rng: np.random.Generator, min_size: int = 160,
                max_size: int = 360) -> Tuple[np.ndarray, np.ndarray]:
    """One ``(image BGR uint8 H x W x 3, label uint8 H x W)`` pair.

    ``H`` and ``W`` are drawn from ``[min_size, max_size]``, never multiples
    of 32.
    """
    height = _size(rng, min_size, max_size)
    width = _size(rng, min_size, max_size)
    background = BACKGROUND_CLASSES[rng.integers(len(BACKGROUND_CLASSES))]
    image = _texture(background, height, width, rng)
    label = np.full((height, width), background.label, dtype=np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        style = OBJECT_CLASSES[rng.integers(len(OBJECT_CLASSES))]
        mask = _shape_mask(height, width, rng)
        image[mask] = _texture(style, height, width, rng)[mask]
        label[mask] = style.label
    if rng.random() < 0.75:  # an unlabelled ("other") patch of grey noise
        mask = _shape_mask(height, width, rng)
        grey = rng.integers(60, 200, size=(height, width, 1), dtype=np.uint8)
        image[mask] = np.repeat(grey, 3, axis=2)[mask]
        label[mask] = OTHER_LABEL
    return image, label


def make_ade_dataset(out_dir: str, num_train: int = 40, num_val: int = 10,
                     seed: int = 0, min_size: int = 160,
                     max_size: int = 360) -> Dict[str, List[str]]:
    """Write the dataset under ``out_dir`` (see the module docstring).

    Refuses to write into a directory that already holds ``images`` or
    ``annotations``, so that real data is never overwritten.

    Returns:
        dict: split name (``'training'``, ``'validation'``) -> list of the
        image basenames written, without suffix.
    """
    for name, value in (('num_train', num_train), ('num_val', num_val)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive int, got {value!r}')
    if not 8 <= min_size <= max_size:
        raise ValueError(f'need 8 <= min_size <= max_size, got '
                         f'min_size={min_size}, max_size={max_size}')
    for sub in ('images', 'annotations'):
        if osp.exists(osp.join(out_dir, sub)):
            raise FileExistsError(
                f'{osp.join(out_dir, sub)} exists; make_ade_dataset writes '
                'only into a new or empty directory')
    written = {}
    for split_index, ((split, prefix), count) in enumerate(
            zip(SPLITS, (num_train, num_val))):
        img_dir = osp.join(out_dir, 'images', split)
        ann_dir = osp.join(out_dir, 'annotations', split)
        os.makedirs(img_dir)
        os.makedirs(ann_dir)
        names = []
        for index in range(count):
            rng = np.random.default_rng([seed, split_index, index])
            image, label = make_sample(rng, min_size, max_size)
            name = f'ADE_{prefix}_{index:08d}'
            # JPEG like ADE20K; quality 95 keeps colours and textures clear.
            cv2.imwrite(osp.join(img_dir, name + '.jpg'), image,
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(osp.join(ann_dir, name + '.png'), label)
            names.append(name)
        written[split] = names
    return written
