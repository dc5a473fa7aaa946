"""Colour masks, overlays and legends, against plain numpy references."""
import numpy as np
import pytest

import poolformer_seg  # noqa: F401
from poolformer_seg.apis import (as_palette, class_areas, colorize_mask,
                                 overlay_mask, render_legend, side_by_side)

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]],
                   np.uint8)
CLASSES = ('red', 'green', 'blue', 'dark')


def test_colorize_mask_is_a_palette_lookup():
    mask = np.array([[0, 1], [3, 3], [2, 0]])
    color = colorize_mask(mask, PALETTE)
    assert color.shape == (3, 2, 3) and color.dtype == np.uint8
    for (y, x), label in np.ndenumerate(mask):
        np.testing.assert_array_equal(color[y, x], PALETTE[label])


@pytest.mark.parametrize('bad', [np.array([[0, 4]]), np.array([[-1, 0]]),
                                 np.array([[255, 0]])])
def test_colorize_rejects_labels_outside_the_palette(bad):
    with pytest.raises(ValueError, match='labels span'):
        colorize_mask(bad, PALETTE)


def test_colorize_rejects_float_masks_and_bad_palettes():
    with pytest.raises(ValueError, match='integer label map'):
        colorize_mask(np.zeros((2, 2)), PALETTE)
    with pytest.raises(ValueError, match='N x 3'):
        as_palette([[1, 2]])
    with pytest.raises(ValueError, match='0..255'):
        as_palette([[1, 2, 256]])


@pytest.mark.parametrize('opacity', [0., 0.3, 0.5, 1.])
def test_overlay_blends_linearly(opacity):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, (5, 7))
    out = overlay_mask(image, mask, PALETTE, opacity)
    expected = (1 - opacity) * image + opacity * PALETTE[mask].astype(float)
    assert np.abs(out.astype(float) - expected).max() <= 0.5 + 1e-6
    if opacity == 0.:
        np.testing.assert_array_equal(out, image)
    if opacity == 1.:
        np.testing.assert_array_equal(out, PALETTE[mask])


def test_overlay_checks_its_arguments():
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match='opacity'):
        overlay_mask(image, np.zeros((4, 4), int), PALETTE, 1.5)
    with pytest.raises(ValueError, match='differ in size'):
        overlay_mask(image, np.zeros((4, 5), int), PALETTE)
    with pytest.raises(ValueError, match='uint8'):
        overlay_mask(image.astype(np.float32), np.zeros((4, 4), int), PALETTE)


def test_class_areas_sorted_by_area():
    mask = np.array([[2, 2, 2, 0], [2, 1, 1, 0]])
    assert class_areas(mask) == [(2, 0.5), (0, 0.25), (1, 0.25)]


def test_legend_lists_present_classes_by_area():
    mask = np.array([[2, 2, 2, 0], [2, 1, 1, 0]])  # blue, red, green
    row = 28
    legend = render_legend(mask, CLASSES, PALETTE, row_height=row)
    assert legend.dtype == np.uint8 and legend.shape[1] == 300
    assert legend.shape[0] == 3 * row + 8
    # the centre of each row's swatch has that class's colour, in area order
    for i, label in enumerate([2, 0, 1]):
        centre = legend[4 + i * row + (row - 8) // 2, 6 + (row - 8) // 2]
        np.testing.assert_array_equal(centre, PALETTE[label])
    # 'dark' is absent: its colour appears nowhere
    assert not (legend == PALETTE[3]).all(axis=-1).any()
    # taller when asked to match a photo
    assert render_legend(mask, CLASSES, PALETTE, height=500).shape[0] == 500


def test_side_by_side_pads_to_the_tallest():
    a = np.zeros((4, 3, 3), np.uint8)
    b = np.full((6, 2, 3), 7, np.uint8)
    out = side_by_side(a, b, gap=1)
    assert out.shape == (6, 6, 3)
    assert (out[4:, :3] == 255).all() and (out[:, 4:] == 7).all()
