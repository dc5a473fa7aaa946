"""The five Semantic FPN configs: values as upstream, models build and run."""
import os.path as osp

import cv2
import numpy as np
import pytest
import torch

import poolformer_seg  # noqa: F401  (before mmseg)
from mmcv.transforms import Compose
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from tests.conftest import REPO
from tests.helpers.heads import eval_logits, labelled_batch
from tests.helpers.upstream import randomize_

VARIANTS = ('s12', 's24', 's36', 'm36', 'm48')
# Parameter counts of mmseg 1.2.2's own PoolFormer configs (built with
# mmpretrain's backbone, 150 classes): backbone, FPN neck, FPNHead.
# Source: /work/shared/reference/upstream.md section 1.2.
UPSTREAM_PARAMS = {
    's12': (11_403_200, 2_623_488, 1_643_158),
    's24': (20_876_992, 2_623_488, 1_643_158),
    's36': (30_350_784, 2_623_488, 1_643_158),
    'm36': (55_404_864, 2_729_984, 1_643_158),
    'm48': (72_705_792, 2_729_984, 1_643_158),
}
OPENMMLAB = 'https://download.openmmlab.com/mmclassification/v0/poolformer/'


def config_path(variant):
    return osp.join(REPO, 'configs', f'fpn_poolformer_{variant}_ade20k.py')


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_s12_values_match_upstream():
    cfg = Config.fromfile(config_path('s12'))
    model = cfg.model
    # mmseg's EncoderDecoder with a row-by-row label map (same layers)
    assert model.type == 'RowwiseEncoderDecoder'
    assert model.impl == 'fast'  # impl='plain': FPN, FPNHead as upstream
    assert model.data_preprocessor == dict(
        type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
        seg_pad_val=255, size=(512, 512))
    backbone = model.backbone
    assert (backbone.type, backbone.arch, backbone.out_indices,
            backbone.frozen_stages, backbone.drop_path_rate) == \
        ('PoolFormer', 's12', (0, 1, 2, 3), -1, 0.)
    assert backbone.init_cfg == dict(
        type='Pretrained', checkpoint=OPENMMLAB + 'poolformer-s12_3rdparty_'
        '32xb128_in1k_20220414-f8d83051.pth')
    assert model.neck == dict(type='FastFPN', in_channels=[64, 128, 320, 512],
                              out_channels=256, num_outs=4)
    head = model.decode_head
    assert (head.type, head.channels, head.dropout_ratio, head.num_classes,
            head.norm_cfg.type, head.align_corners, head.in_index,
            head.feature_strides) == ('FastFPNHead', 128, 0.1, 150, 'SyncBN',
                                      False, [0, 1, 2, 3], [4, 8, 16, 32])
    assert head.loss_decode == dict(type='CrossEntropyLoss',
                                    use_sigmoid=False, loss_weight=1.0)
    # compile='auto': compiled by init_model on CUDA, eager in the tools
    assert model.test_cfg == dict(mode='whole', compile='auto')

    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=0.0002,
                                               weight_decay=0.0001)
    assert cfg.optim_wrapper.type == 'AmpOnCudaOptimWrapper'
    assert cfg.param_scheduler == [dict(type='PolyLR', power=0.9,
                                        eta_min=0.0, begin=0, end=40000,
                                        by_epoch=False)]
    assert cfg.train_cfg == dict(type='IterBasedTrainLoop', max_iters=40000,
                                 val_interval=4000)
    assert cfg.default_hooks.checkpoint.interval == 4000
    assert cfg.default_hooks.checkpoint.by_epoch is False
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=32)
    assert cfg.train_dataloader.batch_size == 4  # x 8 GPUs = 32
    assert cfg.train_dataloader.sampler.type == 'InfiniteSampler'
    assert cfg.val_evaluator == dict(type='IoUMetric', iou_metrics=['mIoU'])
    assert cfg.train_dataloader.dataset.pipeline == [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', reduce_zero_label=True),
        dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0),
             keep_ratio=True),
        dict(type='RandomCrop', crop_size=(512, 512), cat_max_ratio=0.75),
        dict(type='RandomFlip', prob=0.5),
        dict(type='PhotoMetricDistortion'),
        dict(type='PackSegInputs')]
    for loader in (cfg.val_dataloader, cfg.test_dataloader):
        assert loader.dataset.type == 'CheckedADE20KDataset'
        assert loader.dataset.data_root == 'data/ade/ADEChallengeData2016'
        assert loader.batch_size == 1


@pytest.mark.parametrize('variant', VARIANTS)
def test_test_pipeline_resizes_to_multiple_of_32(variant):
    cfg = Config.fromfile(config_path(variant))
    pipeline = cfg.test_dataloader.dataset.pipeline
    assert pipeline == cfg.val_dataloader.dataset.pipeline
    types = [t['type'] for t in pipeline]
    assert types == ['LoadImageFromFile', 'Resize', 'ResizeToMultiple',
                     'LoadAnnotations', 'PackSegInputs']
    assert pipeline[1] == dict(type='Resize', scale=(2048, 512),
                               keep_ratio=True)
    assert pipeline[2] == dict(type='ResizeToMultiple', size_divisor=32)
    assert pipeline[3] == dict(type='LoadAnnotations', reduce_zero_label=True)


@pytest.fixture(scope='module')
def sample_image(tmp_path_factory):
    """A 333 x 340 image and label map: no side a multiple of 32."""
    root = tmp_path_factory.mktemp('sample')
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(333, 340, 3), dtype=np.uint8)
    label = rng.integers(0, 151, size=(333, 340), dtype=np.uint8)
    cv2.imwrite(str(root / 'img.jpg'), img)
    cv2.imwrite(str(root / 'img.png'), label)
    return str(root / 'img.jpg'), str(root / 'img.png')


@pytest.mark.slow
@pytest.mark.parametrize('variant', VARIANTS)
def test_builds_and_runs(variant, sample_image):
    cfg = Config.fromfile(config_path(variant))
    arch = cfg.model.backbone.arch
    assert arch == variant
    assert cfg.model.backbone.init_cfg.checkpoint.startswith(
        OPENMMLAB + f'poolformer-{variant}_3rdparty_32xb128_in1k_')
    init_default_scope('mmseg')
    cfg.model.backbone.init_cfg = None  # no network in tests
    torch.manual_seed(0)
    model = revert_sync_batchnorm(MODELS.build(cfg.model)).eval()
    assert (count(model.backbone), count(model.neck),
            count(model.decode_head)) == UPSTREAM_PARAMS[variant]

    with torch.no_grad():
        logits = model(torch.randn(1, 3, 512, 512), mode='tensor')
    assert logits.shape == (1, 150, 128, 128)

    img_path, seg_path = sample_image
    pipeline = Compose(cfg.test_dataloader.dataset.pipeline)
    data = pipeline(dict(img_path=img_path, seg_map_path=seg_path,
                         reduce_zero_label=True, seg_fields=[]))
    # short side 333 -> 512, long side 340 * 512 / 333 = 523 -> 544
    assert data['inputs'].shape == (3, 512, 544)
    with torch.no_grad():
        result, = model.test_step(pseudo_collate([data]))
    assert result.pred_sem_seg.data.shape == (1, 333, 340)
    assert 'seg_logits' not in result  # only with keep_seg_logits=True
    assert result.gt_sem_seg.data.shape == (1, 333, 340)


def build_config_model(variant, impl=None, device=None):
    """The config's segmentor, without downloads (``init_cfg=None``);
    ``impl``: ``model.impl`` as ``--cfg-options model.impl=...`` sets it."""
    init_default_scope('mmseg')
    cfg = Config.fromfile(config_path(variant))
    if impl is not None:
        cfg.merge_from_dict({'model.impl': impl})
    cfg.model.backbone.init_cfg = None
    with torch.device(device or 'cpu'):
        return revert_sync_batchnorm(MODELS.build(cfg.model))


def blocks_of(model):
    return [block for stage in model.backbone.stages
            for block in stage.blocks]


@pytest.mark.parametrize('variant', VARIANTS)
def test_configs_build_the_fast_path_and_model_impl_plain_the_plain_one(
        variant):
    """The configs as they are: every block fused, channels_last weights,
    FastFPN, FastFPNHead. ``model.impl=plain``: mmseg's FPN and FPNHead
    (exact classes), plain NCHW blocks, mmseg's postprocess (full-size
    seg_logits). Built on ``meta``: the structure, not the numbers."""
    from mmseg.models.decode_heads import FPNHead
    from mmseg.models.necks import FPN
    from mmseg.models.segmentors import EncoderDecoder

    from poolformer_seg.models import FastFPN, FastFPNHead
    fast = build_config_model(variant, device='meta')
    plain = build_config_model(variant, 'plain', device='meta')
    layers = dict(s12=12, s24=24, s36=36, m36=36, m48=48)[variant]
    assert len(blocks_of(fast)) == len(blocks_of(plain)) == layers
    assert fast.backbone.impl == 'fast'
    assert all(block.fused for block in blocks_of(fast))
    convs = [p for p in fast.backbone.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in convs)
    assert not fast.backbone.stem.proj.weight.is_contiguous()  # 7x7: NHWC
    assert type(fast.neck) is FastFPN and type(fast.decode_head) is FastFPNHead

    assert plain.backbone.impl == 'plain'
    assert not any(block.fused for block in blocks_of(plain))
    assert all(p.is_contiguous() for p in plain.backbone.parameters())
    assert type(plain.neck) is FPN and type(plain.decode_head) is FPNHead
    assert plain.state_dict().keys() == fast.state_dict().keys()

    # postprocess: mmseg's (full-size seg_logits) only for impl='plain'
    logits = torch.randn(1, 150, 8, 10)
    for model, mmseg_postprocess in ((plain, True), (fast, False)):
        sample = SegDataSample(metainfo=dict(
            ori_shape=(30, 41), img_shape=(32, 40), pad_shape=(32, 40),
            padding_size=[0, 0, 0, 0]))
        result, = model.postprocess_result(logits, [sample])
        assert ('seg_logits' in result) == mmseg_postprocess
        assert result.pred_sem_seg.data.shape == (1, 30, 41)
        if mmseg_postprocess:
            want, = EncoderDecoder.postprocess_result(
                plain, logits, [SegDataSample(metainfo=sample.metainfo)])
            assert torch.equal(result.seg_logits.data, want.seg_logits.data)


@pytest.mark.slow
@pytest.mark.parametrize('variant', VARIANTS)
def test_fast_config_computes_the_plain_config(variant):
    """The config as it is (fast) and with ``model.impl=plain`` differ only
    by the fast path: same parameters, the same logits in fp32 (to 1e-4),
    and in float64 the same training loss and gradients to 1e-9 (fp32
    alone cannot tell: BN over the 3x4 stride-32 maps of a small batch
    amplifies rounding to ~1e-2)."""
    plain = build_config_model(variant, 'plain')
    fast = build_config_model(variant)
    assert all(block.fused for block in blocks_of(fast))
    assert fast.backbone.stem.proj.weight.is_contiguous(
        memory_format=torch.channels_last)
    assert type(fast.decode_head).__name__ == 'FastFPNHead'
    with torch.no_grad():  # non-trivial weights: healthy gradients
        randomize_(plain, 0)
    fast.load_state_dict(plain.state_dict(), strict=True)

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 96, 128, generator=gen)
    batch = labelled_batch(torch.randint(0, 150, (2, 1, 96, 128),
                                         generator=gen))
    ours, ref = eval_logits((fast, plain), images, batch)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    results = []
    for model in (plain.double(), fast.double()):
        model.train()
        torch.manual_seed(0)  # the same dropout mask in the head
        losses = model.loss(images.double(), batch)
        losses['decode.loss_ce'].backward()
        results.append((losses, {n: p.grad for n, p in
                                 model.named_parameters()}))
    (ref, ref_grads), (ours, our_grads) = results
    torch.testing.assert_close(ours['decode.loss_ce'], ref['decode.loss_ce'],
                               rtol=1e-12, atol=0)
    for name, grad in ref_grads.items():
        err = (our_grads[name] - grad).norm() / (grad.norm() + 1e-30)
        if not name.endswith('norm1.bias'):  # zero vs rounding noise
            assert err < 1e-9, f'{name}: {err:.3g}'
