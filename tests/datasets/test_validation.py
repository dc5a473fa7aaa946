"""Bad data gives an error that names the file and the fix; odd but valid
images (grayscale, RGBA, 16-bit, tiny) load correctly."""
import os
import os.path as osp

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.registry import init_default_scope
from torch.utils.data import DataLoader

import poolformer_seg  # noqa: F401
from mmseg.registry import MODELS
from poolformer_seg.datasets import CheckedADE20KDataset, DataError
from tests.conftest import S12_CONFIG

SPLIT = dict(img_path='images/training', seg_map_path='annotations/training')
TINY_MODEL = dict(
    backbone=dict(arch=dict(layers=[1, 1, 1, 1], embed_dims=[8, 16, 32, 64]),
                  init_cfg=None),
    neck=dict(in_channels=[8, 16, 32, 64], out_channels=16),
    decode_head=dict(in_channels=[16] * 4, channels=16,
                     norm_cfg=dict(type='BN', requires_grad=True)))


def write_sample(root, name='a', image=None, label=None, size=(40, 50)):
    """Write an image/annotation pair; returns (image path, label path)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*size, 3), np.uint8) if image is None \
        else image
    label = rng.integers(0, 151, size, np.uint8) if label is None else label
    img_path = osp.join(root, SPLIT['img_path'], f'{name}.jpg')
    seg_path = osp.join(root, SPLIT['seg_map_path'], f'{name}.png')
    os.makedirs(osp.dirname(img_path), exist_ok=True)
    os.makedirs(osp.dirname(seg_path), exist_ok=True)
    if isinstance(image, bytes):
        open(img_path, 'wb').write(image)
    else:
        ext = '.png' if image.dtype != np.uint8 or image.ndim == 2 or \
            image.shape[-1] == 4 else '.jpg'
        ok, data = cv2.imencode(ext, image)  # lossless PNG where it matters
        open(img_path, 'wb').write(data.tobytes())
    if isinstance(label, bytes):
        open(seg_path, 'wb').write(label)
    else:
        cv2.imwrite(seg_path, label)
    return img_path, seg_path


@pytest.fixture(autouse=True, scope='module')
def mmseg_scope():
    init_default_scope('mmseg')


LOAD = [dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', reduce_zero_label=True)]


def dataset(root, pipeline=LOAD, **kwargs):
    return CheckedADE20KDataset(data_root=str(root), data_prefix=SPLIT,
                                pipeline=pipeline, **kwargs)


# ----------------------------------------------------------------------------
# Checked when the dataset is built


def test_missing_data_root(tmp_path):
    root = tmp_path / 'no_such_dir'
    with pytest.raises(DataError) as err:
        dataset(root)
    message = str(err.value)
    assert f"data_root '{root}' does not exist" in message
    assert 'train_dataloader.dataset.data_root=PATH' in message
    assert 'tools/make_ade_dataset.py' in message


def test_missing_split_folder(tmp_path):
    write_sample(tmp_path)
    with pytest.raises(DataError, match=r'dataset folder .*images/validation'
                       ' does not exist'):
        CheckedADE20KDataset(
            data_root=str(tmp_path), pipeline=LOAD,
            data_prefix=dict(img_path='images/validation',
                             seg_map_path='annotations/validation'))


def test_empty_split(tmp_path):
    os.makedirs(tmp_path / 'images' / 'training')
    os.makedirs(tmp_path / 'annotations' / 'training')
    open(tmp_path / 'images' / 'training' / 'notes.txt', 'w').close()
    with pytest.raises(DataError, match=r"no images ending in '\.jpg' in "
                       r'.*images/training: this split is empty'):
        dataset(tmp_path)


def test_missing_annotation(tmp_path):
    write_sample(tmp_path, 'a')
    img_path, seg_path = write_sample(tmp_path, 'b')
    os.remove(seg_path)
    with pytest.raises(DataError) as err:
        dataset(tmp_path)
    assert '1 image(s)' in str(err.value) and img_path in str(err.value)
    assert 'Add the annotations or remove these images' in str(err.value)


def test_upper_case_extensions_are_found_once(tmp_path):
    """mmseg lists ``img_suffix='.jpg'`` case-sensitively, so a.JPG was left
    out without a word; every case is found, each file once, and an
    annotation with an upper-case suffix is matched too."""
    img_a, _ = write_sample(tmp_path, 'a')
    img_b, seg_b = write_sample(tmp_path, 'b')
    img_c, seg_c = write_sample(tmp_path, 'c')
    os.rename(img_b, img_b[:-4] + '.JPG')
    os.rename(img_c, img_c[:-4] + '.Jpg')
    os.rename(seg_c, seg_c[:-4] + '.PNG')
    data = dataset(tmp_path)
    assert [osp.basename(data.get_data_info(i)['img_path'])
            for i in range(len(data))] == ['a.jpg', 'b.JPG', 'c.Jpg']
    assert osp.basename(data.get_data_info(2)['seg_map_path']) == 'c.PNG'
    assert data.get_data_info(1)['seg_map_path'] == seg_b
    assert data[2]['gt_seg_map'].shape == (40, 50)


def test_same_name_in_two_cases_is_an_error(tmp_path):
    img_a, _ = write_sample(tmp_path, 'a')
    with open(img_a, 'rb') as f, open(img_a[:-4] + '.JPG', 'wb') as g:
        g.write(f.read())
    with pytest.raises(DataError, match='differ only in letter case') as err:
        dataset(tmp_path)
    assert f"{img_a[:-4]}.JPG and {img_a}" in str(err.value)


def test_named_pipe_in_split_folder_is_an_error(tmp_path):
    write_sample(tmp_path, 'a')
    pipe = osp.join(tmp_path, SPLIT['img_path'], 'b.jpg')
    os.mkfifo(pipe)
    with pytest.raises(DataError) as err:
        dataset(tmp_path)
    assert f'{pipe} is a named pipe (FIFO)' in str(err.value)


# ----------------------------------------------------------------------------
# Checked when a sample is loaded


@pytest.mark.parametrize('pipeline', ['train_pipeline', 'test_pipeline'])
@pytest.mark.parametrize('empty', ['annotation', 'image'])
def test_zero_byte_file_names_the_file(tmp_path, pipeline, empty):
    """Was an OpenCV assertion (``!buf.empty()``) without a path. Found when
    the dataset is built, and when the file is emptied afterwards."""
    img_path, seg_path = write_sample(tmp_path)
    path = seg_path if empty == 'annotation' else img_path
    steps = Config.fromfile(S12_CONFIG)[pipeline]
    data = dataset(tmp_path, pipeline=steps)
    open(path, 'wb').close()
    with pytest.raises(DataError) as err:
        data[0]
    assert str(err.value).startswith(f'{empty} {path} is empty (0 bytes); '
                                     're-download it or remove it')
    with pytest.raises(DataError, match=f'cannot be read: {path} is empty'):
        dataset(tmp_path, pipeline=steps)


def _jpeg(size=(40, 50)):
    image = np.random.default_rng(1).integers(0, 256, (*size, 3), np.uint8)
    return cv2.imencode('.jpg', image)[1].tobytes()


def _png_with_bad_data(size=(40, 50)):
    image = np.random.default_rng(1).integers(0, 256, (*size, 3), np.uint8)
    data = bytearray(cv2.imencode('.png', image)[1].tobytes())
    start = data.find(b'IDAT') + 30
    data[start:start + 30] = bytes(30)  # header and IEND intact, CRC not
    return bytes(data)


@pytest.mark.parametrize('damage,message', [
    ('truncated', 'is a truncated JPEG'),
    ('not_an_image', 'is not a readable image'),
    ('bad_data', 'cannot be decoded: the image data is corrupt'),
])
def test_corrupt_image(tmp_path, damage, message):
    data = {'truncated': lambda: _jpeg()[:len(_jpeg()) * 2 // 3],
            'not_an_image': lambda: b'<html>not found</html>' * 20,
            'bad_data': _png_with_bad_data}[damage]()
    img_path, _ = write_sample(tmp_path, image=data)
    with pytest.raises(DataError, match=message) as err:
        dataset(tmp_path)[0]
    assert str(err.value).startswith(img_path)
    assert 're-download it or remove it' in str(err.value)


def test_truncated_png_annotation(tmp_path):
    label = np.random.default_rng(0).integers(0, 151, (40, 50), np.uint8)
    data = cv2.imencode('.png', label)[1].tobytes()
    _, seg_path = write_sample(tmp_path, label=data[:len(data) - 20])
    with pytest.raises(DataError, match='is a truncated PNG') as err:
        dataset(tmp_path)[0]
    assert seg_path in str(err.value)


def test_annotation_size_differs(tmp_path):
    img_path, seg_path = write_sample(
        tmp_path, label=np.ones((40, 49), np.uint8))
    with pytest.raises(DataError) as err:
        dataset(tmp_path)[0]
    assert str(err.value).startswith(
        f'annotation {seg_path} is 40x49 (HxW) but its image {img_path} is '
        '40x50')


@pytest.mark.parametrize('bad', [151, 200, 254])
def test_label_above_150_not_255(tmp_path, bad):
    label = np.full((40, 50), 7, np.uint8)
    label[0, :3] = bad
    _, seg_path = write_sample(tmp_path, label=label)
    with pytest.raises(DataError) as err:
        dataset(tmp_path)[0]
    message = str(err.value)
    assert f'annotation {seg_path} has label values [{bad}] (3 pixels)' \
        in message
    assert 'valid values are 0..150 and 255' in message


def test_legal_raw_labels_and_reduce_zero_label(tmp_path):
    """Raw 0 (other) and 255 are ignored, k in 1..150 becomes k - 1."""
    label = np.array([[0, 1, 150, 255]] * 3, np.uint8)
    write_sample(tmp_path, label=label, size=(3, 4))
    seg = dataset(tmp_path)[0]['gt_seg_map']
    assert seg.tolist() == [[255, 0, 149, 255]] * 3


def test_sixteen_bit_annotation(tmp_path):
    """uint16 labels load when valid; values > 255 are reported, not
    wrapped around by uint8 (mmseg's LoadAnnotations alone turns 257 into
    1, a valid class)."""
    label = np.array([[0, 1, 150, 255]] * 2, np.uint16)
    write_sample(tmp_path, 'ok', label=label, size=(2, 4))
    assert dataset(tmp_path)[0]['gt_seg_map'].tolist() == \
        [[255, 0, 149, 255]] * 2
    write_sample(tmp_path, 'wrap', size=(2, 4),
                 label=np.array([[257, 1, 2, 3]] * 2, np.uint16))
    with pytest.raises(DataError, match=r'wrap\.png has label values \[257'):
        dataset(tmp_path)[1]


def test_colour_coded_annotation(tmp_path):
    _, seg_path = write_sample(tmp_path,
                               label=np.zeros((40, 50, 3), np.uint8))
    with pytest.raises(DataError, match='has 3 channels; it must be a '
                       'single-channel label map'):
        dataset(tmp_path)[0]


def test_error_names_file_through_dataloader_worker(tmp_path):
    img_path, _ = write_sample(tmp_path, image=_jpeg()[:300])
    loader = DataLoader(dataset(tmp_path), batch_size=1, num_workers=1,
                        collate_fn=pseudo_collate)
    with pytest.raises(DataError, match='truncated JPEG') as err:
        next(iter(loader))
    assert img_path in str(err.value)


# ----------------------------------------------------------------------------
# Odd but valid images: converted to 8-bit BGR


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['gray', 'rgba', 'uint16', 'uint16_gray'])
def test_image_modes_convert_to_8bit_bgr(tmp_path, kind):
    rng = np.random.default_rng(2)
    size = (20, 30)
    raw = {
        'gray': lambda: rng.integers(0, 256, size, np.uint8),
        'rgba': lambda: rng.integers(0, 256, (*size, 4), np.uint8),
        'uint16': lambda: rng.integers(0, 65536, (*size, 3), np.uint16),
        'uint16_gray': lambda: rng.integers(0, 65536, size, np.uint16),
    }[kind]()
    write_sample(tmp_path, image=raw, size=size)
    image = dataset(tmp_path)[0]['img']
    expected = raw[..., :3] if kind == 'rgba' else raw
    if raw.dtype == np.uint16:
        expected = (expected >> 8).astype(np.uint8)
    if expected.ndim == 2:
        expected = np.repeat(expected[..., None], 3, axis=2)
    assert image.dtype == np.uint8 and image.shape == (*size, 3)
    np.testing.assert_array_equal(image, expected)


# ----------------------------------------------------------------------------
# Images smaller than the crop (512) and than 32 px: the real pipelines


@pytest.fixture(scope='module')
def tiny_segmentor():
    """The S12 config's segmentor with a tiny backbone, and the config."""
    cfg = Config.fromfile(S12_CONFIG)
    model = cfg.model
    model.backbone.update(TINY_MODEL['backbone'])
    model.neck.update(TINY_MODEL['neck'])
    model.decode_head.update(TINY_MODEL['decode_head'])
    segmentor = MODELS.build(model)
    segmentor.init_weights()
    return cfg, segmentor


@pytest.mark.slow
@pytest.mark.parametrize('size', [(20, 17), (9, 300)])
def test_small_images_train_and_test(tmp_path, tiny_segmentor, size):
    cfg, model = tiny_segmentor
    write_sample(tmp_path, size=size)
    for pipeline, mode in ((cfg.train_pipeline, 'train'),
                           (cfg.test_pipeline, 'test')):
        sample = dataset(tmp_path, pipeline=pipeline)[0]
        batch = pseudo_collate([sample])
        if mode == 'train':
            # below the crop: RandomResize scales it up, RandomCrop keeps
            # what there is, the data preprocessor pads to 512x512
            model.train()
            data = model.data_preprocessor(batch, True)
            assert data['inputs'].shape[-2:] == (512, 512)
            losses = model.loss(data['inputs'], data['data_samples'])
            assert torch.isfinite(losses['decode.loss_ce'])
        else:
            model.eval()
            with torch.no_grad():
                result = model.test_step(batch)[0]
            # prediction at the original size, for the metric
            assert tuple(result.pred_sem_seg.data.shape[-2:]) == size
