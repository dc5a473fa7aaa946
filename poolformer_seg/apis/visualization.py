"""Colour masks, overlays and legends for label maps (numpy + OpenCV only).

Conventions: a label map (``mask``) is an ``H x W`` integer array of class
indices ``0..N-1``; a palette is an ``N x 3`` uint8 array of **RGB** colours
(the order of ``dataset_meta['palette']`` in MMSegmentation); every image
these functions take or return is ``H x W x 3`` uint8 **RGB**.
:func:`write_rgb` / :func:`read_rgb` convert at the file boundary, where
OpenCV uses BGR.
"""
import os
import os.path as osp
from typing import List, Sequence

import cv2
import numpy as np

__all__ = ['as_palette', 'colorize_mask', 'overlay_mask', 'class_areas',
           'render_legend', 'side_by_side', 'read_rgb', 'write_rgb']

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def as_palette(palette, num_classes: int = None) -> np.ndarray:
    """Return ``palette`` as an ``N x 3`` uint8 array, checking its values."""
    array = np.asarray(palette)
    if array.ndim != 2 or array.shape[1] != 3 or array.size == 0:
        raise ValueError(f'palette must be N x 3 RGB colours, got shape '
                         f'{array.shape}')
    if array.min() < 0 or array.max() > 255:
        raise ValueError('palette colours must lie in 0..255')
    if num_classes is not None and len(array) < num_classes:
        raise ValueError(f'palette has {len(array)} colours for '
                         f'{num_classes} classes')
    return array.astype(np.uint8)


def _check_mask(mask, num_colors: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f'mask must be an H x W integer label map, got '
                         f'{mask.dtype} array of shape {mask.shape}')
    if mask.size and (mask.min() < 0 or mask.max() >= num_colors):
        raise ValueError(f'mask labels span {mask.min()}..{mask.max()} but '
                         f'the palette has {num_colors} colours')
    return mask


def colorize_mask(mask, palette) -> np.ndarray:
    """Paint label ``k`` with ``palette[k]``: ``H x W`` -> ``H x W x 3`` RGB.

    Labels outside the palette (including an ignore index such as 255) are
    an error, not silently painted black.
    """
    palette = as_palette(palette)
    return palette[_check_mask(mask, len(palette))]


def overlay_mask(image, mask, palette, opacity: float = 0.5) -> np.ndarray:
    """Blend the colour mask over ``image``: ``(1 - a) * image + a * colour``.

    Args:
        image: ``H x W x 3`` uint8 RGB photo.
        mask: ``H x W`` label map of the same size.
        opacity (float): ``a`` in [0, 1]; 0 shows the photo, 1 the mask.
    """
    if not 0. <= opacity <= 1.:
        raise ValueError(f'opacity must be in [0, 1], got {opacity}')
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f'image must be H x W x 3 uint8, got {image.dtype} '
                         f'{image.shape}')
    color = colorize_mask(mask, palette)
    if color.shape != image.shape:
        raise ValueError(f'mask {mask.shape} and image {image.shape[:2]} '
                         'differ in size')
    return cv2.addWeighted(image, 1. - opacity, color, opacity, 0.)


def class_areas(mask) -> List[tuple]:
    """``[(label, fraction of pixels), ...]`` of the labels present,
    largest first (ties by label)."""
    labels, counts = np.unique(np.asarray(mask), return_counts=True)
    order = sorted(zip(labels.tolist(), counts.tolist()),
                   key=lambda lc: (-lc[1], lc[0]))
    total = max(int(counts.sum()), 1)
    return [(label, count / total) for label, count in order]


def render_legend(mask, classes: Sequence[str], palette, height: int = None,
                  row_height: int = 28, width: int = 300) -> np.ndarray:
    """Legend of the classes present in ``mask``: swatch, name, % of pixels.

    Rows are ordered by area, largest first. The image is ``width`` pixels
    wide and ``max(height, rows * row_height)`` tall (pass the photo's height
    to place it beside the photo); white background, RGB uint8.
    """
    palette = as_palette(palette, len(classes))
    mask = _check_mask(mask, len(classes))
    rows = class_areas(mask)
    total_height = max(height or 0, len(rows) * row_height + 8)
    legend = np.full((total_height, width, 3), 255, np.uint8)
    swatch = row_height - 8
    scale = swatch / 30.  # Hershey glyphs are ~30 px tall at scale 1
    for i, (label, fraction) in enumerate(rows):
        top = 4 + i * row_height
        color = tuple(int(c) for c in palette[label])
        cv2.rectangle(legend, (6, top), (6 + swatch, top + swatch), color, -1)
        cv2.rectangle(legend, (6, top), (6 + swatch, top + swatch),
                      (0, 0, 0), 1)
        share = f'{100 * fraction:.1f}%' if fraction >= .001 else '<0.1%'
        text = f'{classes[label]}  {share}'
        cv2.putText(legend, text, (14 + swatch, top + swatch - 3), _FONT,
                    scale, (0, 0, 0), 1, cv2.LINE_AA)
    return legend


def side_by_side(*images, gap: int = 8) -> np.ndarray:
    """Concatenate RGB images left to right on white, top-aligned."""
    height = max(image.shape[0] for image in images)
    parts = []
    for i, image in enumerate(images):
        padded = np.full((height, image.shape[1], 3), 255, np.uint8)
        padded[:image.shape[0]] = image
        parts.append(padded)
        if i < len(images) - 1:
            parts.append(np.full((height, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def read_rgb(path: str) -> np.ndarray:
    """Read an image file as ``H x W x 3`` uint8 RGB."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f'cannot read image {path!r} (missing or '
                                'not an image)')
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def write_rgb(path: str, image: np.ndarray) -> None:
    """Write an RGB image (format from the file extension, e.g. PNG)."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f'could not write {path!r}')
