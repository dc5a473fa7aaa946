"""tools/export_onnx.py: the ONNX graph (onnxruntime) against PyTorch.

The reference is mmseg's own path, ``data_preprocessor`` + ``encode_decode``
(normalisation, network, bilinear resize of the logits to the input size),
not the export wrapper, so the wrapper is checked too.
"""
import json
import os.path as osp

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import poolformer_seg  # noqa: F401
from mmseg.datasets import ADE20KDataset
from mmseg.models.utils import Upsample
from mmseg.structures import SegDataSample
from poolformer_seg.apis import init_model, predict_mask
from poolformer_seg.apis.export import (SegmentorForExport, _ShapeUpsample,
                                        postprocess, preprocess)

from tests.apis.tiny import TINY_MODEL, save_random_checkpoint
from tests.conftest import REPO


@pytest.fixture(scope='module')
def exported(make_tiny_config, run_tool, tmp_path_factory):
    root = tmp_path_factory.mktemp('onnx')
    config = make_tiny_config(root / 'tiny.py', **TINY_MODEL)
    checkpoint = str(root / 'tiny.pth')
    save_random_checkpoint(config, checkpoint)
    path = str(root / 'tiny.onnx')
    proc = run_tool('export_onnx.py', config, checkpoint, '--out', path,
                    '--shape', '96', '128')
    model = init_model(config, checkpoint, device='cpu')
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return model, session, path, proc.stdout


def smooth_image(height, width, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 6 + 1, width // 6 + 1, 3),
                         dtype=np.uint8)
    return cv2.resize(small, (width, height))  # BGR uint8


def reference_logits(model, images_bgr):
    """mmseg's preprocessing + encode_decode: N x C x H x W logits."""
    height, width = images_bgr[0].shape[:2]
    meta = dict(img_shape=(height, width), ori_shape=(height, width),
                pad_shape=(height, width), padding_size=[0, 0, 0, 0])
    data = dict(inputs=[torch.from_numpy(image).permute(2, 0, 1)
                        for image in images_bgr],
                data_samples=[SegDataSample(metainfo=meta)
                              for _ in images_bgr])
    with torch.no_grad():
        data = model.data_preprocessor(data, False)
        return model.encode_decode(data['inputs'], [meta] * len(images_bgr))


def onnx_input(images_bgr):
    """N x 3 x H x W float32 RGB 0..255, the graph's input convention."""
    return np.stack([image[..., ::-1].transpose(2, 0, 1)
                     for image in images_bgr]).astype(np.float32)


# the traced size, another multiple of 32, and neither
@pytest.mark.slow
@pytest.mark.parametrize('shape', [(96, 128), (128, 160), (100, 150)])
def test_onnx_matches_pytorch(exported, shape):
    model, session, _, _ = exported
    images = [smooth_image(*shape, seed=i) for i in range(2)]  # batch 2
    reference = reference_logits(model, images).numpy()
    logits, labels = session.run(None, {'image': onnx_input(images)})
    assert logits.shape == (2, 150, *shape) and labels.shape == (2, *shape)
    assert labels.dtype == np.int64
    diff = np.abs(logits - reference).max()
    print(f'\n{shape}: max |ONNX - PyTorch| = {diff:.2e}')
    assert diff < 1e-4
    # labels are the argmax wherever the top two logits are not tied
    top2 = np.sort(reference, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    np.testing.assert_array_equal(labels[clear],
                                  reference.argmax(1)[clear])
    assert clear.mean() > 0.99


def test_tool_reports_its_check_and_stores_metadata(exported):
    _, _, path, stdout = exported
    assert 'check 96x128:' in stdout and 'check 73x97:' in stdout
    assert stdout.count('-> ok') == 2
    graph = onnx.load(path)
    props = {p.key: p.value for p in graph.metadata_props}
    assert tuple(json.loads(props['classes'])) == \
        ADE20KDataset.METAINFO['classes']
    assert [i.name for i in graph.graph.input] == ['image']
    assert [o.name for o in graph.graph.output] == ['logits', 'labels']


def test_deployment_recipe_reproduces_predict_mask(exported, tmp_path):
    """docs/deployment.md: preprocess -> ONNX -> postprocess on a photo."""
    model, session, _, _ = exported
    photo = smooth_image(70, 101, seed=7)  # not a multiple of 32
    path = str(tmp_path / 'photo.png')
    cv2.imwrite(path, photo)
    image = preprocess(model.cfg, cv2.imread(path))
    assert image.shape == (1, 3, 128, 192)  # short side 128, then x32
    logits, _ = session.run(None, {'image': image})
    labels = postprocess(logits, photo.shape)
    expected = predict_mask(model, path)
    assert labels.shape == expected.shape == (70, 101)
    assert (labels == expected).mean() > 0.999


@pytest.mark.parametrize('size', [(7, 9), (12, 16), (33, 20)])
def test_shape_upsample_equals_mmseg_upsample(size):
    x = torch.randn(1, 4, *size)
    for mode, align in (('bilinear', False), ('nearest', None)):
        ours = _ShapeUpsample(2, mode, align)(x)
        theirs = Upsample(scale_factor=2, mode=mode, align_corners=align)(x)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_export_refuses_sliding_window(exported):
    model = exported[0]
    whole = model.test_cfg
    model.test_cfg = dict(mode='slide', crop_size=(64, 64), stride=(32, 32))
    try:
        with pytest.raises(ValueError, match='mode="whole"'):
            SegmentorForExport(model)
    finally:
        model.test_cfg = whole


def deployment_snippet():
    """The onnxruntime code block of docs/deployment.md, without its last
    two lines (which open 's12.onnx' and 'photo.jpg')."""
    with open(osp.join(REPO, 'docs', 'deployment.md')) as f:
        text = f.read()
    block = text.split('```python\n')[1].split('```')[0]
    return block.split('\nsession = ')[0]


def test_docs_snippet_reproduces_predict_mask(exported, tmp_path):
    model, session, _, _ = exported
    namespace = {}
    exec(deployment_snippet(), namespace)
    namespace.update(LONG_SIDE=512, SHORT_SIDE=128)  # quarter-scale config
    photo = smooth_image(83, 61, seed=9)
    path = str(tmp_path / 'photo.png')
    cv2.imwrite(path, photo)
    ours = namespace['segment'](session, cv2.imread(path))
    expected = predict_mask(model, path)
    assert ours.shape == expected.shape == (83, 61)
    # the snippet's own resize equals the config's test transforms
    np.testing.assert_array_equal(namespace['preprocess'](photo),
                                  preprocess(model.cfg, photo))
    assert (ours == expected).mean() > 0.999


@pytest.mark.slow
def test_fast_path_model_exports_and_matches(make_tiny_config, tmp_path):
    """A fast-path model (impl='fast': fused blocks, channels_last,
    FastFPNHead) exports through the plain blocks and computes the same
    logits."""
    from poolformer_seg.apis.export import export_onnx
    config = make_tiny_config(tmp_path / 'tiny.py', **TINY_MODEL)
    checkpoint = str(tmp_path / 'tiny.pth')
    save_random_checkpoint(config, checkpoint)
    model = init_model(config, checkpoint, device='cpu', cfg_options={
        'model.impl': 'fast', 'model.decode_head.type': 'FastFPNHead'})
    assert model.backbone.stages[0].blocks[0].fused
    path = str(tmp_path / 'fast.onnx')
    export_onnx(model, path, example_shape=(96, 128))
    assert model.backbone.stages[0].blocks[0].fused  # the original is kept
    assert type(model.neck).__name__ == 'FastFPN'
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    images = [smooth_image(96, 128, seed=i) for i in range(2)]
    reference = reference_logits(model, images).numpy()
    logits, _ = session.run(None, {'image': onnx_input(images)})
    assert np.abs(logits - reference).max() < 1e-4
