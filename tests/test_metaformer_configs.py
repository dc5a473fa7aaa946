"""The MetaFormer configs: values, build, inference, one training step.

Semantic FPN + PoolFormerV2 (the PoolFormer recipe) and UPerNet + ConvFormer/
CAFormer (mmseg's UPerNet recipe for ConvNeXt). Every config builds and runs
one 512x512 forward and one inference on an image whose sides are not
multiples of 32; the smallest variant of each family also trains one
iteration. The big variants are marked slow.
"""
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
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from poolformer_seg.models.backbones.metaformer import ARCH_SETTINGS
from tests.conftest import REPO
from tests.helpers.timm_ref import TIMM_FEATURE_PARAMS

FPN = [f'fpn_poolformerv2_{v}_ade20k' for v in ('s12', 's24', 's36', 'm36',
                                                 'm48')]
UPERNET = [f'upernet_{family}_{v}_ade20k' for family in ('convformer',
                                                         'caformer')
           for v in ('s18', 's36', 'm36', 'b36')]
SMALLEST = ['fpn_poolformerv2_s12_ade20k', 'upernet_convformer_s18_ade20k',
            'upernet_caformer_s18_ade20k']
SAIL = 'https://huggingface.co/sail/dl/resolve/main/'


# Fast tier: the smallest variant of each family, UPerNet heads slimmed
# (see build); slow tier: every other config as it is.
RUNS = [(name, name.startswith('upernet')) for name in SMALLEST] + [
    pytest.param(name, False, marks=pytest.mark.slow)
    for name in FPN + UPERNET if name != SMALLEST[0]]


def load(name):
    return Config.fromfile(osp.join(REPO, 'configs', f'{name}.py'))


def arch_of(name):
    return name.split('_', 1)[1].rsplit('_', 1)[0]


def build(cfg, slim_heads=False):
    """The config's model without pretrained weights (no network in tests);
    with ``slim_heads`` the UPerNet heads get 32/16 channels instead of
    512/256, which are three quarters of the cost on a CPU and not what the
    fast tier tests (the slow tier runs the configs unchanged)."""
    init_default_scope('mmseg')
    cfg.model.backbone.init_cfg = None
    if slim_heads and cfg.model.decode_head.type == 'FastUPerHead':
        cfg.model.decode_head.channels = 32
        cfg.model.auxiliary_head.channels = 16
    torch.manual_seed(0)
    return revert_sync_batchnorm(MODELS.build(cfg.model))


def count(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------
# Values


@pytest.mark.parametrize('name', FPN)
def test_fpn_configs_follow_the_poolformer_recipe(name):
    cfg, reference = load(name), load('fpn_poolformer_s12_ade20k')
    arch = arch_of(name)
    dims = ARCH_SETTINGS[arch]['embed_dims']
    assert cfg.model.backbone == dict(
        type='MetaFormer', arch=arch, out_indices=(0, 1, 2, 3),
        frozen_stages=-1, drop_path_rate=0.,
        init_cfg=dict(type='Pretrained',
                      checkpoint=f'{SAIL}poolformerv2/{arch}.pth'))
    assert cfg.model.neck.in_channels == dims
    # everything but the backbone and the neck's input is the v1 recipe
    for key in ('decode_head', 'data_preprocessor', 'test_cfg'):
        assert cfg.model[key] == reference.model[key], key
    for key in ('optim_wrapper', 'param_scheduler', 'train_cfg',
                'train_dataloader', 'val_dataloader', 'auto_scale_lr'):
        assert cfg[key] == reference[key], key


# sail-sg scripts/{family}/train_{family}_{v}.sh --drop-path
DROP_PATH = {'convformer_s18': .2, 'convformer_s36': .3, 'convformer_m36': .4,
             'convformer_b36': .6, 'caformer_s18': .15, 'caformer_s36': .3,
             'caformer_m36': .4, 'caformer_b36': .6}


@pytest.mark.parametrize('name', UPERNET)
def test_upernet_configs_follow_mmseg_convnext_recipe(name):
    cfg = load(name)
    arch = arch_of(name)
    family = arch.split('_')[0]
    dims = ARCH_SETTINGS[arch]['embed_dims']
    backbone = cfg.model.backbone
    assert (backbone.type, backbone.arch, backbone.drop_path_rate,
            backbone.init_cfg.checkpoint) == (
                'MetaFormer', arch, DROP_PATH[arch],
                f'{SAIL}{family}/{arch}.pth')
    head, aux = cfg.model.decode_head, cfg.model.auxiliary_head
    assert (head.type, head.in_channels, head.channels, head.pool_scales,
            head.num_classes) == ('FastUPerHead', dims, 512, (1, 2, 3, 6),
                                  150)
    assert (aux.type, aux.in_channels, aux.in_index,
            aux.loss_decode.loss_weight) == ('FastFCNHead', dims[2], 2, .4)
    assert cfg.model.test_cfg == dict(mode='slide', crop_size=(512, 512),
                                      stride=(341, 341), compile='auto')
    assert cfg.optim_wrapper == dict(
        type='AmpOnCudaOptimWrapper',
        optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                       weight_decay=0.05),
        paramwise_cfg=dict(flat_decay_mult=0.))
    assert cfg.param_scheduler == [
        dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0,
             end=1500),
        dict(type='PolyLR', power=1.0, eta_min=0.0, begin=1500, end=160000,
             by_epoch=False)]
    assert cfg.train_cfg == dict(type='IterBasedTrainLoop', max_iters=160000,
                                 val_interval=16000)
    assert cfg.default_hooks.checkpoint.interval == 16000
    assert cfg.train_dataloader.batch_size == 2  # x 8 GPUs = 16
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=16)
    assert [t['type'] for t in cfg.test_dataloader.dataset.pipeline] == [
        'LoadImageFromFile', 'Resize', 'LoadAnnotations', 'PackSegInputs']


def test_mmseg_layer_decay_constructor_does_not_know_metaformer():
    """Why the UPerNet configs have no layer-wise lr decay (the schedule's
    comment): mmseg's constructor refuses every backbone but ConvNeXt/BEiT/
    MAE."""
    cfg = load('upernet_caformer_s18_ade20k')
    cfg.model.backbone.arch = dict(layers=[1] * 4, embed_dims=[8, 8, 16, 16],
                                   token_mixers=['sepconv'] * 4)
    cfg.model.decode_head.in_channels = [8, 8, 16, 16]
    cfg.model.auxiliary_head.in_channels = 16
    model = build(cfg)
    with pytest.raises(NotImplementedError):
        build_optim_wrapper(model, dict(
            type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4),
            constructor='LearningRateDecayOptimizerConstructor',
            paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise',
                               num_layers=6)))


# ----------------------------------------------------------------------------
# Build and run


@pytest.fixture(scope='module')
def sample_image(tmp_path_factory):
    """A 333 x 340 image and label map: no side a multiple of 32."""
    root = tmp_path_factory.mktemp('sample')
    rng = np.random.default_rng(0)
    cv2.imwrite(str(root / 'img.jpg'),
                rng.integers(0, 256, (333, 340, 3), dtype=np.uint8))
    cv2.imwrite(str(root / 'img.png'),
                rng.integers(0, 151, (333, 340), dtype=np.uint8))
    return str(root / 'img.jpg'), str(root / 'img.png')


@pytest.mark.slow
@pytest.mark.parametrize('name, slim_heads', RUNS)
def test_builds_and_runs(name, slim_heads, sample_image):
    cfg = load(name)
    model = build(cfg, slim_heads).eval()
    arch = arch_of(name)
    norms = 2 * sum(ARCH_SETTINGS[arch]['embed_dims'])
    assert count(model.backbone) == TIMM_FEATURE_PARAMS[arch] + norms

    with torch.no_grad():
        logits = model(torch.randn(1, 3, 512, 512), mode='tensor')
    assert logits.shape == (1, 150, 128, 128)

    img_path, seg_path = sample_image
    data = Compose(cfg.test_dataloader.dataset.pipeline)(dict(
        img_path=img_path, seg_map_path=seg_path, reduce_zero_label=True,
        seg_fields=[]))
    # short side 333 -> 512, long side 340 * 512 / 333 = 523 (FPN configs:
    # then rounded to 544; UPerNet: sliding windows take any size)
    expected_width = 544 if name.startswith('fpn') else 523
    assert data['inputs'].shape == (3, 512, expected_width)
    with torch.no_grad():
        result, = model.test_step(pseudo_collate([data]))
    assert result.pred_sem_seg.data.shape == (1, 333, 340)


@pytest.mark.slow
@pytest.mark.parametrize('name', SMALLEST)
def test_one_training_iteration(name):
    """One optimiser step of the config's own optim wrapper (fp32 on CPU) on
    a generated batch of two 160 x 128 crops (slim UPerNet heads): finite
    losses, every backbone parameter moves, and no weight decay on 1-D
    parameters (norms, biases, scales)."""
    cfg = load(name)
    # the configs pad every batch to 512 x 512; the test trains smaller crops
    cfg.model.data_preprocessor.size = (160, 128)
    # stochastic depth can drop a branch for both samples of the batch,
    # which leaves its parameters legitimately untouched by this one step
    cfg.model.backbone.drop_path_rate = 0.
    model = build(cfg, slim_heads=True).train()
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    for group in optim_wrapper.optimizer.param_groups:
        if group['params'][0].ndim == 1:
            assert group['weight_decay'] == 0
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(2):
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=torch.randint(
            0, 150, (1, 160, 128), generator=gen))
        sample.set_metainfo(dict(img_shape=(160, 128), ori_shape=(160, 128),
                                 pad_shape=(160, 128)))
        samples.append(sample)
    data = dict(inputs=[torch.randint(0, 256, (3, 160, 128), generator=gen,
                                      dtype=torch.uint8)
                        for _ in range(2)], data_samples=samples)
    before = {n: p.detach().clone()
              for n, p in model.backbone.named_parameters()}
    losses = model.train_step(data, optim_wrapper)
    assert losses and all(torch.isfinite(v).all() for v in losses.values())
    assert 'decode.loss_ce' in losses
    unchanged = [n for n, p in model.backbone.named_parameters()
                 if torch.equal(p, before[n])]
    assert not unchanged


def test_upernet_fast_heads_train_as_mmseg_s_heads(monkeypatch):
    """``model.impl='plain'`` builds mmseg's UPerHead and FCNHead (and an
    NCHW backbone) in place of the fast heads, with the same keys; on the
    same weights both compute the same losses and gradients (float64, with
    Winograd's 3x3 convolutions at every size and on any CPU)."""
    from mmseg.models.decode_heads import FCNHead, UPerHead

    from poolformer_seg.models import FastFCNHead, FastUPerHead, winograd
    monkeypatch.setattr(winograd, 'ON_THIS_CPU', True)
    monkeypatch.setattr(winograd, 'MIN_PIXELS', 1)
    models = {}
    for impl in ('fast', 'plain'):
        cfg = load('upernet_convformer_s18_ade20k')
        cfg.model.impl = impl
        cfg.model.backbone.drop_path_rate = 0.
        cfg.model.decode_head.dropout_ratio = 0.
        cfg.model.auxiliary_head.dropout_ratio = 0.
        models[impl] = build(cfg, slim_heads=True).double().train()
    fast, plain = models['fast'], models['plain']
    assert (type(fast.decode_head), type(fast.auxiliary_head)) == (
        FastUPerHead, FastFCNHead)
    assert (type(plain.decode_head), type(plain.auxiliary_head)) == (
        UPerHead, FCNHead)
    plain.load_state_dict(fast.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, 3, 128, 160, generator=gen, dtype=torch.float64)
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(128, 160),
                                             pad_shape=(128, 160)))
        sample.gt_sem_seg = PixelData(data=torch.randint(
            0, 150, (1, 128, 160), generator=gen))
        samples.append(sample)
    results = {}
    for impl, model in models.items():
        losses = model.loss(inputs, samples)
        sum(v for k, v in losses.items() if 'loss' in k).backward()
        results[impl] = losses, {n: p.grad for n, p in
                                 model.named_parameters()}
    (fast_losses, fast_grads), (losses, grads) = results['fast'], \
        results['plain']
    assert fast_losses.keys() == losses.keys()
    for key, value in losses.items():
        # mmseg's accuracy is float32 for any logits dtype
        torch.testing.assert_close(fast_losses[key], value, rtol=1e-10,
                                   atol=0, check_dtype=False, msg=key)
    for name, grad in grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-7,
                                   atol=1e-12, msg=name)
