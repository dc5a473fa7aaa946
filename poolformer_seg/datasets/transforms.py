"""Data transforms.

``AlignedResize`` is the test-time resize of the PoolFormer paper's
segmentation code (``segmentation/align_resize.py`` in sail-sg/poolformer,
for mmseg 0.x), written for mmseg 1.x.
"""
import math
from typing import Sequence, Tuple

import mmcv
from mmcv.transforms import BaseTransform
from mmseg.registry import TRANSFORMS


def aligned_size(height: int, width: int, size_divisor: int
                 ) -> Tuple[int, int]:
    """``(height, width)`` rounded *up* to multiples of ``size_divisor``."""
    return (math.ceil(height / size_divisor) * size_divisor,
            math.ceil(width / size_divisor) * size_divisor)


@TRANSFORMS.register_module()
class AlignedResize(BaseTransform):
    """Keep-ratio resize, then stretch each side up to a multiple of 32.

    Step 1 rescales the image so that it fits ``scale`` = (long edge, short
    edge) as large as possible without changing its aspect ratio
    (``mmcv.imrescale``; for ADE20K, ``scale=(2048, 512)`` makes the short
    side 512). Step 2 resizes -- not pads -- the result to
    ``ceil(h / size_divisor) * size_divisor`` by
    ``ceil(w / size_divisor) * size_divisor``, so every stride of the network
    divides the input exactly. Equivalent to mmseg's
    ``Resize(scale, keep_ratio=True)`` followed by
    ``ResizeToMultiple(size_divisor)``.

    Images use ``interpolation`` (bilinear by default); segmentation maps
    (``gt_seg_map`` and every key in ``seg_fields``) use nearest neighbour.
    Boxes and keypoints are not supported (the transform is for semantic
    segmentation) and raise an error.

    Args:
        scale (tuple[int, int]): (long edge, short edge) bound.
        keep_ratio (bool): must be True; accepted so that a ``Resize`` entry
            of a pipeline can be switched to ``AlignedResize`` by its type
            alone.
        size_divisor (int): Default 32 (the backbone's output stride).
        interpolation (str): image interpolation of both steps.

    Modified keys: ``img``, ``img_shape``, ``pad_shape``, ``scale_factor``
    (``(w_scale, h_scale)`` from the original to the final size),
    ``keep_ratio`` and the segmentation maps.
    """

    def __init__(self,
                 scale: Sequence[int],
                 keep_ratio: bool = True,
                 size_divisor: int = 32,
                 interpolation: str = 'bilinear'):
        if (not isinstance(scale, (tuple, list)) or len(scale) != 2
                or not all(isinstance(s, int) and s > 0 for s in scale)):
            raise ValueError('AlignedResize: scale must be two positive ints '
                             f'(long edge, short edge), got {scale!r}')
        if keep_ratio is not True:
            raise ValueError('AlignedResize: keep_ratio must be True; it '
                             'always keeps the aspect ratio in its first '
                             'step')
        if not isinstance(size_divisor, int) or size_divisor < 1:
            raise ValueError('AlignedResize: size_divisor must be a positive '
                             f'int, got {size_divisor!r}')
        self.scale = tuple(scale)
        self.size_divisor = size_divisor
        self.interpolation = interpolation

    def _resize(self, image, interpolation):
        image = mmcv.imrescale(image, self.scale, interpolation=interpolation)
        height, width = aligned_size(*image.shape[:2], self.size_divisor)
        if (height, width) != image.shape[:2]:
            image = mmcv.imresize(image, (width, height),
                                  interpolation=interpolation)
        return image

    def transform(self, results: dict) -> dict:
        for key in ('gt_bboxes', 'gt_keypoints'):
            if key in results:
                raise ValueError(f'AlignedResize does not resize {key!r}; '
                                 'use Resize + ResizeToMultiple instead')
        ori_h, ori_w = results['img'].shape[:2]
        img = self._resize(results['img'], self.interpolation)
        height, width = img.shape[:2]
        results['img'] = img
        results['img_shape'] = (height, width)
        results['pad_shape'] = (height, width)
        results['scale_factor'] = (width / ori_w, height / ori_h)
        results['keep_ratio'] = True
        seg_keys = set(results.get('seg_fields', []))
        if 'gt_seg_map' in results:
            seg_keys.add('gt_seg_map')
        for key in sorted(seg_keys):
            if results[key].shape[:2] != (ori_h, ori_w):
                raise ValueError(
                    f'AlignedResize: {key} has shape {results[key].shape} '
                    f'but the image is {ori_h} x {ori_w}')
            results[key] = self._resize(results[key], 'nearest')
        return results

    def __repr__(self):
        return (f'{self.__class__.__name__}(scale={self.scale}, '
                f'size_divisor={self.size_divisor}, '
                f'interpolation={self.interpolation})')
