"""resized_argmax: the label map of a bilinear resize, one row at a time;
RowwiseEncoderDecoder: mmseg's EncoderDecoder with it."""
import copy

import pytest
import torch
import torch.nn.functional as F
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

import poolformer_seg  # noqa: F401
from poolformer_seg.models.segmentors.rowwise_encoder_decoder import (
    RowwiseEncoderDecoder, resized_argmax, source_positions)

# (input h, w) -> (output H, W): up, down, odd, equal, one row/column
SIZES = [((17, 23), (101, 131)), ((33, 45), (333, 340)),
         ((64, 64), (63, 65)), ((31, 29), (300, 301)), ((20, 30), (20, 30)),
         ((1, 7), (5, 9)), ((9, 1), (4, 3)), ((12, 16), (1, 1))]


def smooth_logits(num_classes, height, width, seed):
    """Random scores with near-ties, as real logits have."""
    torch.manual_seed(seed)
    coarse = torch.randn(1, num_classes, max(height // 4, 1),
                         max(width // 4, 1))
    return F.interpolate(coarse, size=(height, width), mode='bilinear',
                         align_corners=False)[0]


def whole_image_formula(logits, size, align_corners):
    """The arithmetic of resized_argmax on the whole image at once: every
    input row resized along the width, then every output row blended."""
    rows0, rows1, row_w0, row_w1 = source_positions(
        logits.shape[1], size[0], align_corners)
    cols0, cols1, col_w0, col_w1 = source_positions(
        logits.shape[2], size[1], align_corners)
    pixels = logits.permute(1, 2, 0)  # h x w x C
    wide = pixels[:, cols0] * col_w0[:, None] + \
        pixels[:, cols1] * col_w1[:, None]  # h x W x C
    full = wide[rows0] * row_w0[:, None, None] + \
        wide[rows1] * row_w1[:, None, None]  # H x W x C
    return full.argmax(-1)


@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('sizes', SIZES)
def test_row_by_row_equals_the_whole_image_exactly(sizes, align_corners):
    """Each output row reads the right two input rows (a one-row halo), and
    the labels are bit for bit those of the untiled computation."""
    (h, w), size = sizes
    logits = smooth_logits(19, h, w, seed=h * w)
    ours = resized_argmax(logits, size, align_corners)
    assert ours.shape == size and ours.dtype == torch.long
    assert torch.equal(ours, whole_image_formula(logits, size,
                                                 align_corners))


@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('in_size,out_size', [(17, 101), (128, 500),
                                              (64, 63), (5, 5), (1, 9),
                                              (9, 1), (333, 4000)])
def test_source_positions_are_pytorchs(in_size, out_size, align_corners):
    """Resizing one-hot rows with F.interpolate reveals the kernel's own
    indices and weights; ours are the same bits."""
    eye = torch.eye(in_size)[None, None]
    weights = F.interpolate(eye, size=(out_size, in_size), mode='bilinear',
                            align_corners=align_corners)[0, 0]
    i0, i1, w0, w1 = source_positions(in_size, out_size, align_corners)
    expected = torch.zeros(out_size, in_size)
    rows = torch.arange(out_size)
    expected[rows, i0] += w0
    expected[rows, i1] += w1
    assert torch.equal(weights, expected)


@pytest.mark.slow
@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('sizes', SIZES)
def test_labels_agree_with_mmseg_resize_then_argmax(sizes, align_corners):
    """F.interpolate rounds its sums in another order: the logits may differ
    by a few ulps, so labels may differ only where the best two classes are
    that close."""
    (h, w), size = sizes
    logits = smooth_logits(150, h, w, seed=h + w)
    reference = F.interpolate(logits[None], size=size, mode='bilinear',
                              align_corners=align_corners)[0]
    ours = resized_argmax(logits, size, align_corners)
    ours_scores = reference.gather(0, ours[None])[0]
    best = reference.max(0).values
    assert torch.all(best - ours_scores <= 4e-6 * best.abs().clamp_min(1))
    assert (ours != reference.argmax(0)).float().mean() < 1e-3


@pytest.fixture(scope='module')
def segmentor():
    init_default_scope('mmseg')
    from tests.conftest import S12_CONFIG
    from mmengine.config import Config
    cfg = Config.fromfile(S12_CONFIG)
    cfg.model.backbone.init_cfg = None
    cfg.model.decode_head.norm_cfg = dict(type='BN', requires_grad=True)
    cfg.model.backbone.arch = dict(layers=[1, 1, 1, 1],
                                   embed_dims=[8, 16, 32, 64])
    cfg.model.neck.update(in_channels=[8, 16, 32, 64], out_channels=16)
    cfg.model.decode_head.update(in_channels=[16] * 4, channels=16)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    assert type(model) is RowwiseEncoderDecoder
    return model


def samples(flip=None):
    sample = SegDataSample(metainfo=dict(
        ori_shape=(75, 121), img_shape=(64, 96), pad_shape=(64, 96),
        padding_size=[0, 0, 0, 0], flip=flip is not None, img_path='x.jpg',
        flip_direction=flip))
    return [sample]


@pytest.mark.parametrize('flip', [None, 'horizontal', 'vertical'])
def test_segmentor_labels_match_mmseg_postprocess(segmentor, flip):
    """Same pred_sem_seg as mmseg's EncoderDecoder (up to ulp ties), no
    seg_logits; with keep_seg_logits mmseg's output, seg_logits included."""
    inputs = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours, = segmentor.predict(inputs, samples(flip))
        keeper = copy.copy(segmentor)
        keeper.keep_seg_logits = True
        kept, = keeper.predict(inputs, samples(flip))
    assert 'seg_logits' not in ours
    assert kept.seg_logits.data.shape == (150, 75, 121)
    reference = kept.pred_sem_seg.data
    assert ours.pred_sem_seg.data.shape == reference.shape == (1, 75, 121)
    differ = (ours.pred_sem_seg.data != reference).float().mean()
    assert differ < 1e-3
    chosen = kept.seg_logits.data.gather(0, ours.pred_sem_seg.data)
    assert torch.allclose(chosen, kept.seg_logits.data.max(0).values,
                          rtol=0, atol=1e-5)


def test_tta_model_of_the_configs_keeps_the_logits_it_averages(segmentor):
    """mmseg's SegTTAModel reads seg_logits of every view; the configs'
    tta_model turns them on (mmseg's own tools/test.py --tta uses it)."""
    from mmengine.config import Config
    from tests.conftest import S12_CONFIG
    tta_cfg = Config.fromfile(S12_CONFIG).tta_model
    module = copy.deepcopy(segmentor)
    assert not module.keep_seg_logits
    tta = MODELS.build(dict(tta_cfg, module=module))
    assert tta.module is module and module.keep_seg_logits
    inputs = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        views = [module.predict(inputs, samples(flip))
                 for flip in (None, 'horizontal')]
    merged, = tta.merge_preds([[view[0] for view in views]])
    assert merged.pred_sem_seg.data.shape == (1, 75, 121)
