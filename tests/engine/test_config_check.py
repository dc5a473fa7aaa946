"""poolformer_seg.engine.config_check on real configs: ours and mmseg's."""
import glob
import os.path as osp

import mmseg
import pytest
from mmengine.config import Config

from poolformer_seg.engine import ConfigError, check_config, read_config
from tests.conftest import REPO

MMSEG_CONFIGS = osp.join(osp.dirname(mmseg.__file__), '.mim', 'configs')


@pytest.mark.slow
@pytest.mark.parametrize('path', sorted(glob.glob(osp.join(
    REPO, 'configs', '*.py'))), ids=osp.basename)
def test_every_project_config_passes(path):
    check_config(read_config(path), path)


def test_mmseg_configs_only_their_one_typo_is_flagged():
    """mmseg's own 700+ configs use many top-level variables; the only key
    flagged is a real typo: ``models`` (for ``model``) in a BiSeNetV2
    config, whose OHEM sampler is therefore silently unused."""
    paths = sorted(glob.glob(osp.join(MMSEG_CONFIGS, '**', '*.py'),
                             recursive=True))
    if len(paths) < 500:
        pytest.fail(f'mmseg configs not installed under {MMSEG_CONFIGS}: '
                    'mmsegmentation 1.2.x ships them in its wheel')
    flagged = {}
    for path in paths:
        cfg = Config(dict.fromkeys(_top_level_names(path)))  # no imports
        try:
            check_config(cfg)
        except ConfigError as err:
            flagged[osp.relpath(path, MMSEG_CONFIGS)] = str(err)
    assert list(flagged) == [
        'bisenetv2/bisenetv2_fcn_4xb4-ohem-160k_cityscapes-1024x1024.py']
    assert "key 'models' (did you mean 'model'?)" in next(
        iter(flagged.values()))


def _top_level_names(path):
    import ast
    with open(path) as f:
        tree = ast.parse(f.read())
    return [target.id for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)]


def test_variables_of_ones_own_pass_unless_near_misses():
    check_config(Config(dict(my_crop=(1, 2), palette_file='x', lr=0.1)))
    with pytest.raises(ConfigError, match="'val_evaluatr'.*'val_evaluator'"):
        check_config(Config(dict(val_evaluatr=dict())))



def test_neck_channels_checked_for_metaformer_backbones():
    path = osp.join(REPO, 'configs', 'fpn_poolformerv2_m36_ade20k.py')
    cfg = read_config(path)
    check_config(cfg, path)  # m36 widths: [96, 192, 384, 768]
    cfg.model.neck.in_channels = [64, 128, 320, 512]  # the s12 widths
    with pytest.raises(ConfigError, match=r'model\.neck\.in_channels'):
        check_config(cfg, path)


def test_model_impl_is_accepted_and_checked(tmp_path):
    """--cfg-options model.impl=plain passes on our configs; a bad value,
    or the switch on mmseg's EncoderDecoder (which has none), is refused
    naming model.impl. EncoderDecoder without it stays fine."""
    path = osp.join(REPO, 'configs', 'fpn_poolformer_s12_ade20k.py')
    cfg = read_config(path)
    for impl in ('fast', 'plain'):
        cfg.merge_from_dict({'model.impl': impl})
        check_config(cfg, path)
    cfg.merge_from_dict({'model.impl': 'fused'})
    with pytest.raises(ConfigError, match=r"model\.impl='fused' is not "
                       r"known; choose one of \['fast', 'plain'\]"):
        check_config(cfg, path)
    cfg.merge_from_dict({'model.impl': 'plain',
                         'model.type': 'EncoderDecoder'})
    with pytest.raises(ConfigError, match=r"model\.impl is set but "
                       r"model\.type='EncoderDecoder' has no impl switch"):
        check_config(cfg, path)
    cfg.model.pop('impl')
    check_config(cfg, path)


def test_mmseg_encoder_decoder_with_our_backbone_is_fine():
    """A user's own mmseg EncoderDecoder (no impl switch) over PoolFormer
    passes the checks and builds, with the fast backbone by default."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    cfg = Config(dict(model=dict(
        type='EncoderDecoder',
        backbone=dict(type='PoolFormer', arch=dict(
            layers=[1] * 4, embed_dims=[8, 16, 24, 32])),
        neck=dict(type='FPN', in_channels=[8, 16, 24, 32], out_channels=8,
                  num_outs=4),
        decode_head=dict(type='FPNHead', in_channels=[8] * 4,
                         in_index=[0, 1, 2, 3], feature_strides=[4, 8, 16, 32],
                         channels=8, num_classes=3))))
    check_config(cfg)
    init_default_scope('mmseg')
    model = MODELS.build(cfg.model)
    assert type(model).__name__ == 'EncoderDecoder'
    assert model.backbone.impl == 'fast'
