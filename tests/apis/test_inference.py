"""poolformer_seg.apis.inference: init_model / inference_model / predict_mask.

Reference: mmseg's own ``mmseg.apis.inference_model`` on the same model.
"""
import copy
import os

import cv2
import numpy as np
import pytest
import torch

import poolformer_seg  # noqa: F401
from mmseg.datasets import ADE20KDataset
from poolformer_seg.apis import (inference_model, init_model, predict_mask,
                                 inference_transforms)
from poolformer_seg.datasets import DataError
from poolformer_seg.utils.loading import CheckpointMismatchError

from tests.apis.tiny import TINY_MODEL, save_random_checkpoint
from tests.helpers.hang_guard import hang_guard


@pytest.fixture(scope='module')
def tiny(make_tiny_config, tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny_api')
    config = make_tiny_config(root / 'tiny.py', **TINY_MODEL)
    checkpoint = str(root / 'tiny.pth')
    save_random_checkpoint(config, checkpoint)
    model = init_model(config, checkpoint, device='cpu')
    return config, checkpoint, model


def random_image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 256, (height // 8 + 1, width // 8 + 1,
                                             3), dtype=np.uint8),
                       (width, height))  # smooth, so predictions vary
    return image


def test_mask_has_input_size_and_valid_labels(tiny, tmp_path):
    _, _, model = tiny
    image = random_image(70, 101)
    mask = predict_mask(model, image)
    assert mask.shape == (70, 101) and mask.dtype == np.int64
    assert 0 <= mask.min() and mask.max() < 150
    assert len(np.unique(mask)) > 1  # not a constant map
    path = str(tmp_path / 'image.png')
    cv2.imwrite(path, image)
    np.testing.assert_array_equal(predict_mask(model, path), mask)
    masks = predict_mask(model, [path, random_image(40, 33, seed=1)])
    assert [m.shape for m in masks] == [(70, 101), (40, 33)]
    np.testing.assert_array_equal(masks[0], mask)


def test_matches_mmseg_inference_model(tiny, tmp_path):
    from mmseg.apis import inference_model as mmseg_inference_model
    _, _, model = tiny
    path = str(tmp_path / 'image.png')
    cv2.imwrite(path, random_image(90, 64, seed=2))
    ours = inference_model(model, path)
    reference_model = copy.copy(model)  # mmseg edits cfg.test_pipeline
    reference_model.cfg = copy.deepcopy(model.cfg)
    reference_model.cfg.test_pipeline = \
        model.cfg.test_dataloader.dataset.pipeline
    reference = mmseg_inference_model(reference_model, path)
    torch.testing.assert_close(ours.pred_sem_seg.data,
                               reference.pred_sem_seg.data)
    assert 'seg_logits' not in ours  # the row-by-row label map only
    rowwise = ours.pred_sem_seg.data
    # with keep_seg_logits: mmseg's full-size logits, and the same labels
    model.keep_seg_logits = reference_model.keep_seg_logits = True
    try:
        ours = inference_model(model, path)
        reference = mmseg_inference_model(reference_model, path)
    finally:
        model.keep_seg_logits = False
    torch.testing.assert_close(rowwise, ours.pred_sem_seg.data)
    torch.testing.assert_close(ours.seg_logits.data,
                               reference.seg_logits.data)
    assert ours.seg_logits.data.shape == (150, 90, 64)
    torch.testing.assert_close(ours.pred_sem_seg.data,
                               reference.pred_sem_seg.data)


def test_uses_the_test_pipeline_and_leaves_the_config_alone(tiny):
    _, _, model = tiny
    before = copy.deepcopy(model.cfg.to_dict())
    result = inference_model(model, random_image(50, 200))
    predict_mask(model, random_image(30, 30))
    assert model.cfg.to_dict() == before
    # quarter-scale config: Resize(512, 128), keep ratio, then multiple of 32
    assert result.metainfo['img_shape'] == (128, 512)
    assert result.metainfo['ori_shape'] == (50, 200)
    assert [t['type'] for t in inference_transforms(model.cfg)] == \
        ['Resize', 'ResizeToMultiple', 'PackSegInputs']


def test_checkpoint_weights_are_loaded(tiny, tmp_path):
    config, _, _ = tiny
    checkpoint = str(tmp_path / 'other.pth')
    saved = save_random_checkpoint(config, checkpoint, seed=5)
    loaded = init_model(config, checkpoint, device='cpu')
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    image = random_image(64, 64, seed=3)
    np.testing.assert_array_equal(predict_mask(loaded, image),
                                  predict_mask(saved, image))


def test_loading_is_strict(tiny, tmp_path):
    config, checkpoint, _ = tiny
    state = torch.load(checkpoint, weights_only=True)
    del state['state_dict']['decode_head.conv_seg.weight']
    broken = str(tmp_path / 'broken.pth')
    torch.save(state, broken)
    with pytest.raises(CheckpointMismatchError,
                       match='decode_head.conv_seg.weight'):
        init_model(config, broken, device='cpu')
    init_model(config, broken, device='cpu', allow_partial=True)


def test_class_names_from_checkpoint_else_config(tiny, tmp_path):
    config, checkpoint, model = tiny
    assert model.dataset_meta['classes'] == ADE20KDataset.METAINFO['classes']
    state = torch.load(checkpoint, weights_only=True)
    names = tuple(f'c{i}' for i in range(150))
    state['meta'] = dict(dataset_meta=dict(
        classes=names, palette=[[i, i, i] for i in range(150)]))
    named = str(tmp_path / 'named.pth')
    torch.save(state, named)
    assert init_model(config, named, device='cpu').dataset_meta[
        'classes'] == names
    state['meta']['dataset_meta']['classes'] = names[:19]
    torch.save(state, named)
    with pytest.raises(ValueError, match='19 classes'):
        init_model(config, named, device='cpu')


def test_bad_inputs_are_named(tiny, tmp_path):
    _, _, model = tiny
    with pytest.raises(FileNotFoundError, match='nope.jpg'):
        predict_mask(model, str(tmp_path / 'nope.jpg'))
    with pytest.raises(ValueError, match='uint8'):
        predict_mask(model, np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match='H x W x 3'):
        predict_mask(model, np.zeros((8, 8), np.uint8))
    with pytest.raises(FileNotFoundError, match='config file not found'):
        init_model(str(tmp_path / 'missing.py'))


def test_unusable_image_files_are_named(tiny, tmp_path):
    """A named pipe blocked the loader forever; an empty file gave an
    OpenCV/mmcv assertion without the path."""
    _, _, model = tiny
    pipe, empty = tmp_path / 'pipe.jpg', tmp_path / 'empty.jpg'
    os.mkfifo(pipe)
    empty.write_bytes(b'')
    with hang_guard(), pytest.raises(
            DataError, match=f'image file {pipe} is a named pipe'):
        predict_mask(model, str(pipe))
    with pytest.raises(DataError,
                       match=rf'image file {empty} is empty \(0 bytes\)'):
        predict_mask(model, empty)
