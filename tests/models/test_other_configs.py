"""The backbone used from configs that are not ours.

* A plain mmseg config (UPerNet: UPerHead + FCN auxiliary head) that only
  names ``custom_imports=dict(imports=['poolformer_seg'])`` -- run in a fresh
  interpreter, so nothing but the config imports poolformer_seg.
* Another OpenMMLab scope (mmdet, mmpretrain, ...) names it
  ``type='mmseg.PoolFormer'``; mmdet is not installed here, so its registry
  is simulated by a child of mmengine's root registry with scope ``mmdet``,
  which is exactly what ``mmdet.registry.MODELS`` is.
"""
import json
import subprocess
import sys
import textwrap

import pytest
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import DefaultScope, Registry

from poolformer_seg import PoolFormer

UPERNET_CONFIG = textwrap.dedent('''
    custom_imports = dict(imports=['poolformer_seg'],
                          allow_failed_imports=False)
    default_scope = 'mmseg'
    norm_cfg = dict(type='BN', requires_grad=True)
    model = dict(
        type='EncoderDecoder',
        data_preprocessor=dict(
            type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
            seg_pad_val=255),
        backbone=dict(type='PoolFormer', arch='s12',
                      out_indices=(0, 1, 2, 3), drop_path_rate=0.1),
        decode_head=dict(
            type='UPerHead', in_channels=[64, 128, 320, 512],
            in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6), channels=64,
            dropout_ratio=0.1, num_classes=19, norm_cfg=norm_cfg,
            align_corners=False,
            loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                             loss_weight=1.0)),
        auxiliary_head=dict(
            type='FCNHead', in_channels=320, in_index=2, channels=32,
            num_convs=1, concat_input=False, dropout_ratio=0.1,
            num_classes=19, norm_cfg=norm_cfg, align_corners=False,
            loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                             loss_weight=0.4)),
        train_cfg=dict(), test_cfg=dict(mode='whole'))
''')

BUILD_AND_RUN = textwrap.dedent('''
    import json, sys
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    assert 'poolformer_seg' not in sys.modules
    cfg = Config.fromfile(sys.argv[1])  # runs custom_imports
    assert 'poolformer_seg' in sys.modules
    init_default_scope(cfg.default_scope)
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    model = MODELS.build(cfg.model)
    model.init_weights()

    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 96)
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(64, 96)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 19, (1, 64, 96)))
        samples.append(sample)
    model.train()
    losses = model.loss(x, samples)
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        logits = model(x, mode='tensor')
    print(json.dumps(dict(
        backbone=type(model.backbone).__module__ + '.' +
        type(model.backbone).__name__,
        heads=[type(model.decode_head).__name__,
               type(model.auxiliary_head).__name__],
        losses={k: float(v) for k, v in losses.items()},
        stem_grad=float(model.backbone.stem.proj.weight.grad.abs().sum()),
        logits=list(logits.shape))))
''')


@pytest.mark.slow
def test_upernet_config_uses_backbone_through_custom_imports(tmp_path):
    config = tmp_path / 'upernet_poolformer_s12.py'
    config.write_text(UPERNET_CONFIG)
    result = subprocess.run(
        [sys.executable, '-c', BUILD_AND_RUN, str(config)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info['backbone'] == \
        'poolformer_seg.models.backbones.poolformer.PoolFormer'
    assert info['heads'] == ['UPerHead', 'FCNHead']
    assert set(info['losses']) == {'decode.loss_ce', 'decode.acc_seg',
                                   'aux.loss_ce', 'aux.acc_seg'}
    assert all(v > 0 for k, v in info['losses'].items() if 'loss' in k)
    assert info['stem_grad'] > 0  # gradients reach the backbone
    assert info['logits'] == [2, 19, 16, 24]  # stride 4 output


@pytest.fixture
def mmdet_models():
    """What ``mmdet.registry.MODELS`` is: a child of the root, scope mmdet."""
    registry = Registry('model', parent=ROOT_MODELS, scope='mmdet')
    yield registry
    ROOT_MODELS._children.pop('mmdet')


def test_other_scope_names_it_with_the_mmseg_prefix(mmdet_models):
    import mmseg.models  # noqa: F401  (mmseg's registry is populated)
    # as in an mmdet config: default_scope = 'mmdet'
    with DefaultScope.overwrite_default_scope('mmdet'):
        backbone = mmdet_models.build(dict(
            type='mmseg.PoolFormer', arch='s12', out_indices=(1, 2, 3),
            frozen_stages=1))
        assert isinstance(backbone, PoolFormer)
        assert backbone.out_channels == [128, 320, 512]  # FPN for detection
        # without the scope prefix, mmdet's own registry does not know it
        with pytest.raises(KeyError, match='PoolFormer is not in the mmdet::'):
            mmdet_models.build(dict(type='PoolFormer'))
