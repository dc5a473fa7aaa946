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
    RowwiseEncoderDecoder, resized_argmax, source_positions,
    twice_resized_argmax)
from tests.helpers.heads import eval_logits, labelled_batch
from tests.helpers.upstream import randomize_

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


@pytest.mark.parametrize('block_rows', [1, 3, 7, None])
@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('sizes', SIZES)
def test_blocks_of_rows_equal_the_whole_image_exactly(
        sizes, align_corners, block_rows, monkeypatch):
    """Each block of output rows reads the right span of input rows (a
    one-row halo), and the labels are bit for bit those of the untiled
    computation, however the rows are blocked (None: scores within the
    memory bound, resized at once as mmseg does)."""
    from poolformer_seg.models.segmentors import rowwise_encoder_decoder
    (h, w), size = sizes
    logits = smooth_logits(19, h, w, seed=h * w)
    if block_rows is not None:
        monkeypatch.setattr(rowwise_encoder_decoder, 'WHOLE_IMAGE_BYTES', 0)
        monkeypatch.setattr(rowwise_encoder_decoder, 'BLOCK_BYTES',
                            block_rows * 19 * size[1] * 4)
    ours = resized_argmax(logits, size, align_corners)
    assert ours.shape == size and ours.dtype == torch.long
    if block_rows is None:
        expected = F.interpolate(logits[None], size, mode='bilinear',
                                 align_corners=align_corners)[0].argmax(0)
    else:
        expected = whole_image_formula(logits, size, align_corners)
    assert torch.equal(ours, expected)


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


@pytest.mark.parametrize('crop', [False, True])
def test_channels_last_logits_are_resized_in_channels_last(monkeypatch,
                                                           crop):
    """A classes-innermost image (the fast head's logits, one image of the
    batch, maybe cropped of its padding) is resized as channels_last, which
    PyTorch's CPU kernel does several times faster than NCHW, with the
    labels of the NCHW computation."""
    batch = smooth_logits(150, 40, 56, seed=3)[None].contiguous(
        memory_format=torch.channels_last)
    logits = batch[0, :, 1:-2, 3:] if crop else batch[0]
    layouts = []
    interpolate = F.interpolate

    def spy(*args, **kwargs):
        out = interpolate(*args, **kwargs)
        layouts.append(out.is_contiguous(memory_format=torch.channels_last)
                       and not out.is_contiguous())
        return out
    monkeypatch.setattr(F, 'interpolate', spy)
    labels = resized_argmax(logits, (61, 83), False)
    assert layouts == [True]
    expected = resized_argmax(logits.contiguous(), (61, 83), False)
    assert torch.equal(labels, expected)


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


def test_input_size_scores_follow_autocast_as_mmsegs(segmentor):
    """Under bf16 autocast ``encode_decode`` returns bf16 scores, as mmseg's
    ``EncoderDecoder`` does: the fp32 head logits resized into bf16, one
    rounding (2**-8 relative: bf16 keeps 8 bits) where mmseg's route has
    two (its logits', then its resize's). The head's logits
    (``mode='tensor'``) stay fp32."""
    inputs = torch.randn(1, 3, 64, 96)
    metas = [s.metainfo for s in samples()]
    with torch.no_grad():
        fp32 = segmentor.encode_decode(inputs, metas)
        with torch.autocast('cpu', torch.bfloat16):
            head = segmentor(inputs, mode='tensor')
            scores = segmentor.encode_decode(inputs, metas)
    assert fp32.dtype == head.dtype == torch.float32
    assert scores.dtype == torch.bfloat16 and scores.shape == fp32.shape
    resized = F.interpolate(head, size=(64, 96), mode='bilinear',
                            align_corners=False)
    error = (scores.float() - resized).abs()
    fp32_rounding = 1e-6 * resized.abs().max()  # ours' and PyTorch's
    assert 0 < error.max()
    assert (error <= 2**-8 * resized.abs() + fp32_rounding).all()


@pytest.mark.parametrize('flip', [None, 'horizontal'])
def test_labels_under_autocast_come_from_fp32_products(segmentor, flip):
    """``predict`` under bf16 autocast takes its labels from the fp32 head
    logits through fp32 products (autocast would run the interpolation
    products in bf16): the labels of the same logits without autocast."""
    inputs = torch.randn(1, 3, 64, 96)
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        head = segmentor(inputs, mode='tensor')
        predicted, = segmentor.predict(inputs, samples(flip))
    labels = twice_resized_argmax(head[0], (64, 96), (0, 0, 0, 0), flip,
                                  (75, 121), segmentor.align_corners)
    assert torch.equal(predicted.pred_sem_seg.data[0], labels)


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


# ----------------------------------------------------------------------------
# impl: the fast path (default) or upstream mmseg's computation


def s12_segmentor(model_impl=None, **backbone):
    """The S12 config's segmentor, no download; ``model_impl`` is
    ``model.impl``, ``backbone`` updates ``model.backbone``."""
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm

    from tests.conftest import S12_CONFIG
    init_default_scope('mmseg')
    cfg = Config.fromfile(S12_CONFIG)
    cfg.model.backbone.init_cfg = None
    cfg.model.backbone.update(backbone)
    if model_impl is not None:
        cfg.model.impl = model_impl
    return revert_sync_batchnorm(MODELS.build(cfg.model))


def test_fast_and_plain_checkpoints_are_interchangeable():
    """A state dict of either loads strictly into the other, and both give
    the same logits (fp32, eval, a size that is no multiple of 32, random
    non-trivial weights: layer scales 0.2..1, varied norms and BN)."""
    from tests.helpers.upstream import randomize_
    fast, plain = s12_segmentor(), s12_segmentor('plain')
    assert fast.backbone.stages[0].blocks[0].fused
    assert not plain.backbone.stages[0].blocks[0].fused
    images = torch.randn(1, 3, 100, 132,
                         generator=torch.Generator().manual_seed(0))
    metas = [dict(img_shape=(100, 132), pad_shape=(100, 132))]
    for source, target, seed in ((fast, plain, 1), (plain, fast, 2)):
        with torch.no_grad():
            randomize_(source, seed)
        target.load_state_dict(source.state_dict(), strict=True)
        with torch.no_grad():
            want = source.eval().encode_decode(images, metas)
            got = target.eval().encode_decode(images, metas)
        assert want.shape == (1, 150, 100, 132)
        assert want.abs().max() > 1  # not a vacuous comparison
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_bad_impl_values_are_refused_naming_the_keys():
    with pytest.raises(ValueError, match=r"model\.impl='fused' is not "
                       r"known; choose one of \['fast', 'plain'\]"):
        s12_segmentor('fused')
    # the model says plain, the backbone says fast: a contradiction
    with pytest.raises(ValueError, match=r"model\.impl='plain' contradicts "
                       r"model\.backbone\.impl='fast'"):
        s12_segmentor('plain', impl='fast')
    with pytest.raises(ValueError, match=r"impl='quick' is not an "
                       r"implementation of PoolFormer; choose one of "
                       r"\['fast', 'plain'\]"):
        s12_segmentor(impl='quick')
    # BN in the blocks: only the plain implementation computes it
    with pytest.raises(ValueError, match=r"impl='fast' needs GroupNorm\(1\)"
                       r".*norm_cfg=\{'type': 'BN'\}.*set impl='plain'"):
        s12_segmentor(norm_cfg=dict(type='BN'))
    plain = s12_segmentor('plain', norm_cfg=dict(type='BN'))
    assert type(plain.backbone.stages[0].blocks[0].norm1).__name__ == \
        'BatchNorm2d'


def test_plain_leaves_backbones_without_impl_alone():
    """MetaFormer has no fast path: model.impl='plain' passes it nothing
    and still swaps the neck and head for mmseg's."""
    from mmseg.models.decode_heads import FPNHead
    from mmseg.models.necks import FPN

    from poolformer_seg.models.backbones.metaformer import MetaFormer
    tiny = dict(type='MetaFormer', arch='poolformerv2_s12', init_cfg=None)
    model = RowwiseEncoderDecoder(
        backbone=tiny, impl='plain',
        neck=dict(type='FastFPN', in_channels=[64, 128, 320, 512],
                  out_channels=8, num_outs=4),
        decode_head=dict(type='FastFPNHead', in_channels=[8] * 4,
                         in_index=[0, 1, 2, 3], feature_strides=[4, 8, 16, 32],
                         channels=8, num_classes=3))
    assert isinstance(model.backbone, MetaFormer)
    assert type(model.neck) is FPN and type(model.decode_head) is FPNHead


def test_plain_swaps_every_auxiliary_head():
    """``model.impl='plain'`` builds mmseg's head for each fast auxiliary
    head, also in a list, and leaves mmseg's own heads as they are."""
    from mmseg.models.decode_heads import FCNHead, UPerHead

    from poolformer_seg.models import FastFCNHead, FastUPerHead
    fcn = dict(in_channels=16, in_index=2, channels=8, num_convs=1,
               concat_input=False, num_classes=3)
    kwargs = dict(
        backbone=dict(type='MetaFormer', init_cfg=None, arch=dict(
            layers=[1] * 4, embed_dims=[8, 16, 16, 16],
            token_mixers=['pool'] * 4)),
        decode_head=dict(type='FastUPerHead', in_channels=[8, 16, 16, 16],
                         in_index=[0, 1, 2, 3], channels=8, num_classes=3),
        auxiliary_head=[dict(fcn, type='FastFCNHead'),
                        dict(fcn, type='FCNHead', in_index=1)])
    fast = RowwiseEncoderDecoder(**kwargs)
    plain = RowwiseEncoderDecoder(impl='plain', **kwargs)
    assert [type(head) for head in fast.auxiliary_head] == [FastFCNHead,
                                                            FCNHead]
    assert [type(head) for head in plain.auxiliary_head] == [FCNHead,
                                                             FCNHead]
    assert (type(fast.decode_head), type(plain.decode_head)) == (
        FastUPerHead, UPerHead)
    assert fast.state_dict().keys() == plain.state_dict().keys()


def test_plain_types_name_the_mmseg_class_each_fast_module_derives_from():
    """``PLAIN_TYPES`` (config names) agrees with the class hierarchy that
    ONNX export uses (``mmseg_base``), for every fast neck and head."""
    from poolformer_seg.models import (FastFCNHead, FastFPN, FastFPNHead,
                                       FastUPerHead)
    from poolformer_seg.models.decode_heads.fast_head import mmseg_base
    from poolformer_seg.models.segmentors.rowwise_encoder_decoder import \
        PLAIN_TYPES
    fast = (FastFPN, FastFPNHead, FastUPerHead, FastFCNHead)
    assert PLAIN_TYPES == {cls.__name__: mmseg_base(cls).__name__
                           for cls in fast}


# ----------------------------------------------------------------------------
# the labels straight from the head's logits (two resizes in one pass)

TWICE = [  # head logits (h, w), resize_to, crop (top, bottom, left, right),
    # original size
    ((16, 24), (64, 96), (0, 0, 0, 0), (75, 121)),
    ((16, 24), (64, 96), (3, 5, 0, 7), (40, 61)),
    ((13, 9), (52, 36), (0, 0, 0, 0), (52, 36)),
    ((20, 30), (80, 120), (1, 0, 2, 0), (300, 200)),
]


@pytest.mark.parametrize('flip', [None, 'horizontal', 'vertical'])
@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('case', TWICE)
def test_twice_resized_argmax_equals_mmseg_resize_crop_flip_resize(
        case, align_corners, flip):
    """mmseg's predict_by_feat resize, crop, flip, postprocess resize and
    arg-max, in one pass: the scores round once instead of twice, so
    labels may differ only where the best two classes are a few ulps
    apart."""
    from poolformer_seg.models.segmentors.rowwise_encoder_decoder import \
        twice_resized_argmax
    (h, w), resize_to, (top, bottom, left, right), size = case
    logits = smooth_logits(150, h, w, seed=h * w + top)
    scores = F.interpolate(logits[None], size=resize_to, mode='bilinear',
                           align_corners=align_corners)[0]
    scores = scores[:, top:resize_to[0] - bottom,
                    left:resize_to[1] - right]
    if flip is not None:
        scores = scores.flip(2 if flip == 'horizontal' else 1)
    scores = F.interpolate(scores[None], size=size, mode='bilinear',
                           align_corners=align_corners)[0]
    ours = twice_resized_argmax(logits, resize_to, (top, bottom, left,
                                                    right), flip, size,
                                align_corners)
    assert ours.shape == size and ours.dtype == torch.long
    chosen = scores.gather(0, ours[None])[0]
    best = scores.max(0).values
    assert torch.all(best - chosen <= 4e-6 * best.abs().clamp_min(1))
    assert (ours != scores.argmax(0)).float().mean() < 1e-3


def test_predict_takes_the_one_pass_labels_and_falls_back_when_too_wide(
        segmentor, monkeypatch):
    """The fast segmentor's predict computes labels from the head's logits
    (no input-size scores); beyond the memory bound it takes mmseg's two
    steps, with the same labels up to near-ties."""
    from poolformer_seg.models.segmentors import rowwise_encoder_decoder
    calls = []
    real = rowwise_encoder_decoder.twice_resized_argmax

    def spy(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]
    monkeypatch.setattr(rowwise_encoder_decoder, 'twice_resized_argmax', spy)
    inputs = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        one_pass, = segmentor.predict(inputs, samples())
        assert len(calls) == 1 and calls[0] is not None
        monkeypatch.setattr(rowwise_encoder_decoder, 'WHOLE_IMAGE_BYTES', 0)
        two_steps, = segmentor.predict(inputs, samples())
    assert calls[1] is None
    differ = (one_pass.pred_sem_seg.data != two_steps.pred_sem_seg.data)
    assert differ.float().mean() < 1e-3



def test_the_wide_fallback_takes_labels_from_fp32_scores(segmentor,
                                                         monkeypatch):
    """Beyond the memory bound, under bf16 autocast, predict's two steps
    resize the fp32 head logits into fp32 scores (not the autocast dtype
    of ``encode_decode``'s), as the one-pass labels do."""
    from poolformer_seg.models.segmentors import rowwise_encoder_decoder
    monkeypatch.setattr(rowwise_encoder_decoder, 'WHOLE_IMAGE_BYTES', 0)
    seen = []
    real = type(segmentor).postprocess_result

    def spy(self, seg_logits, data_samples=None):
        seen.append(seg_logits.dtype)
        return real(self, seg_logits, data_samples)
    monkeypatch.setattr(type(segmentor), 'postprocess_result', spy)
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        segmentor.predict(torch.randn(1, 3, 64, 96), samples())
    assert seen == [torch.float32]

def composing_segmentors(head=None, **extra):
    """A small S12-layout segmentor whose head composes FPN's finest output
    (8 input, 32 FPN and 8 head channels), fast and plain, equal weights,
    in float64; ``head`` updates the decode head's config, ``extra`` the
    model's."""
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm

    from tests.conftest import S12_CONFIG
    init_default_scope('mmseg')
    cfg = Config.fromfile(S12_CONFIG)
    cfg.model.backbone.init_cfg = None
    cfg.model.backbone.arch = dict(layers=[1, 1, 1, 1],
                                   embed_dims=[8, 16, 32, 64])
    cfg.model.neck.update(in_channels=[8, 16, 32, 64], out_channels=32)
    cfg.model.decode_head.update({'in_channels': [32] * 4, 'channels': 8,
                                  'num_classes': 5, **(head or {})})
    cfg.model.update(extra)
    models = []
    for impl in ('fast', 'plain'):
        cfg.model.impl = impl
        torch.manual_seed(0)
        models.append(revert_sync_batchnorm(MODELS.build(cfg.model)).double())
    fast, plain = models
    with torch.no_grad():
        randomize_(plain, 0)
    fast.load_state_dict(plain.state_dict())
    return fast, plain


def test_the_head_composes_fpns_finest_output_in_inference_and_training(
        monkeypatch):
    """The FPN configs' segmentor leaves FPN's finest output to the head,
    which composes it with its first convolution: in inference (logits) and
    in training (loss and every gradient), the plain model's results in
    float64."""
    from poolformer_seg.models.necks import fast_fpn
    calls = []
    original = fast_fpn.composed_conv_of_finest
    monkeypatch.setattr(fast_fpn, 'composed_conv_of_finest',
                        lambda *a: calls.append(1) or original(*a))
    fast, plain = composing_segmentors()
    assert fast.defers_finest() and not plain.defers_finest()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 40, 72, generator=gen, dtype=torch.float64)
    batch = labelled_batch(torch.randint(0, 5, (2, 1, 40, 72),
                                         generator=gen))
    ours, ref = eval_logits((fast, plain), images, batch)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    assert calls == [1]
    grads = []
    for model in (fast, plain):
        model.train()
        torch.manual_seed(0)
        loss = model.loss(images, batch)['decode.loss_ce']
        loss.backward()
        grads.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    assert calls == [1, 1]
    (loss, ours), (ref_loss, ref) = grads
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for name, grad in ref.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-8, atol=1e-10,
                                   msg=name)


@pytest.mark.parametrize('in_index', [[1, 2, 3], [1, 0, 2, 3]])
def test_a_head_that_reads_the_finest_level_elsewhere_gets_it_computed(
        in_index):
    strides = [[4, 8, 16, 32][i] for i in in_index]
    fast, plain = composing_segmentors(head=dict(
        in_index=in_index, in_channels=[32] * len(in_index),
        feature_strides=sorted(strides)))
    assert not fast.defers_finest()
    images = torch.randn(1, 3, 40, 72, dtype=torch.float64)
    batch = labelled_batch(torch.zeros(1, 1, 40, 72, dtype=torch.long))
    ours, ref = eval_logits((fast, plain), images, batch)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


def test_an_auxiliary_head_gets_the_finest_output_computed():
    fcn = dict(type='FastFCNHead', in_channels=32, in_index=0, channels=8,
               num_convs=1, concat_input=False, num_classes=5)
    fast, _ = composing_segmentors(auxiliary_head=fcn)
    assert not fast.defers_finest()
    images = torch.randn(1, 3, 40, 72, dtype=torch.float64)
    features = fast.head_inputs(images)
    assert all(isinstance(x, torch.Tensor) for x in features)


def test_inference_follows_changed_weights():
    """The kernels that inference composes and keeps between calls are
    composed again after the weights change: by ``load_state_dict``, by a
    training step, and by a swap through ``.data`` (mmengine's EMA hook),
    which leaves the version counts as they were."""
    fast, plain = composing_segmentors()
    images = torch.randn(1, 3, 40, 72, dtype=torch.float64)
    batch = labelled_batch(torch.zeros(1, 1, 40, 72, dtype=torch.long))

    def agree():
        ours, ref = eval_logits((fast, plain), images, batch)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)

    agree()
    with torch.no_grad():
        randomize_(plain, 1)
    fast.load_state_dict(plain.state_dict())
    agree()
    for model in (fast, plain):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(0)  # the same dropout mask in the head
        model.loss(images, batch)['decode.loss_ce'].backward()
        optimizer.step()
    agree()
    with torch.no_grad():
        for model in (fast, plain):
            for p in model.parameters():
                p.data.copy_(p.data * 1.1)
    agree()
