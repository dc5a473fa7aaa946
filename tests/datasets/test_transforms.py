"""AlignedResize against a cv2 reference of the paper's AlignResize."""
import math

import cv2
import numpy as np
import pytest

import poolformer_seg  # noqa: F401  (before mmseg)
from mmcv.transforms import Compose
from mmengine.registry import init_default_scope
from mmseg.registry import TRANSFORMS
from poolformer_seg.datasets.transforms import AlignedResize


def reference(image, scale=(2048, 512), divisor=32, nearest=False):
    """The official semantics, written with cv2 only.

    1. keep-ratio rescale: factor = min(long_max / long, short_max / short),
       new size = round-half-up(size * factor) (mmcv.imrescale);
    2. resize (not pad) to ceil(h / 32) * 32 x ceil(w / 32) * 32.
    """
    inter = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    h, w = image.shape[:2]
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    size = (int(w * factor + 0.5), int(h * factor + 0.5))
    image = cv2.resize(image, size, interpolation=inter)
    h, w = image.shape[:2]
    aligned = (math.ceil(w / divisor) * divisor,
               math.ceil(h / divisor) * divisor)
    return cv2.resize(image, aligned, interpolation=inter)


SHAPES = [(333, 517), (517, 333), (480, 640), (100, 1500), (2000, 257)]


@pytest.mark.parametrize('shape', SHAPES)
def test_matches_reference(shape):
    rng = np.random.default_rng(shape[0])
    img = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    seg = rng.integers(0, 151, size=shape, dtype=np.uint8)
    out = AlignedResize(scale=(2048, 512))(
        dict(img=img.copy(), gt_seg_map=seg.copy(), seg_fields=['gt_seg_map']))
    expected = reference(img)
    np.testing.assert_array_equal(out['img'], expected)
    np.testing.assert_array_equal(out['gt_seg_map'],
                                  reference(seg, nearest=True))
    h, w = expected.shape[:2]
    assert h % 32 == 0 and w % 32 == 0
    assert out['img_shape'] == out['pad_shape'] == (h, w)
    assert out['scale_factor'] == (w / shape[1], h / shape[0])
    # labels are never interpolated
    assert set(np.unique(out['gt_seg_map'])) <= set(np.unique(seg))


def test_same_as_resize_then_resize_to_multiple():
    """The replacement mmseg uses (its mIoU* column) gives the same image."""
    init_default_scope('mmseg')
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(333, 517, 3), dtype=np.uint8)
    two_step = Compose([dict(type='Resize', scale=(2048, 512),
                             keep_ratio=True),
                        dict(type='ResizeToMultiple', size_divisor=32)])
    aligned = TRANSFORMS.build(dict(type='AlignedResize', scale=(2048, 512),
                                    keep_ratio=True))
    np.testing.assert_array_equal(aligned(dict(img=img.copy()))['img'],
                                  two_step(dict(img=img.copy()))['img'])
    # and ResizeToMultiple after AlignedResize changes nothing, so that
    # switching the Resize entry of the test pipeline to AlignedResize works
    once = aligned(dict(img=img.copy()))
    again = TRANSFORMS.build(dict(type='ResizeToMultiple', size_divisor=32))(
        dict(once, img=once['img'].copy()))
    np.testing.assert_array_equal(again['img'], once['img'])


def test_already_aligned_size_is_untouched_by_step_two():
    img = np.random.default_rng(1).integers(0, 256, (512, 640, 3), np.uint8)
    out = AlignedResize(scale=(2048, 512))(dict(img=img.copy()))
    np.testing.assert_array_equal(out['img'], img)


@pytest.mark.parametrize('kwargs, message', [
    (dict(scale=512), 'scale'),
    (dict(scale=(2048, 512), keep_ratio=False), 'keep_ratio'),
    (dict(scale=(2048, 512), size_divisor=0), 'size_divisor'),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlignedResize(**kwargs)


def test_rejects_mismatched_seg_and_boxes():
    img = np.zeros((100, 120, 3), np.uint8)
    with pytest.raises(ValueError, match='gt_seg_map'):
        AlignedResize(scale=(2048, 512))(
            dict(img=img, gt_seg_map=np.zeros((99, 120), np.uint8)))
    with pytest.raises(ValueError, match='gt_bboxes'):
        AlignedResize(scale=(2048, 512))(
            dict(img=img, gt_bboxes=np.zeros((1, 4))))
