"""Bad input at the level of runs: each error names the key, file or
iteration and says what to do. (Bad *data* files: tests/datasets/
test_validation.py; bad checkpoint files: tests/utils/test_safe_load.py.)"""
import os
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import poolformer_seg  # noqa: F401
from mmseg.registry import MODELS
from poolformer_seg.utils.loading import (CheckpointMismatchError,
                                          load_segmentor_checkpoint)
from poolformer_seg.utils.safe_load import load
from tests.conftest import S12_CONFIG
from tests.tools.test_resume import ENV, TINY_MODEL


@pytest.fixture(scope='module')
def s12_model_cfg():
    init_default_scope('mmseg')
    cfg = Config.fromfile(S12_CONFIG)
    cfg.model.backbone.init_cfg = None
    cfg.model.decode_head.norm_cfg = dict(type='BN', requires_grad=True)
    return cfg.model


def test_typo_in_backbone_argument(load_tool, make_tiny_config, tmp_path,
                                   monkeypatch):
    """model.backbone.out_indice (for out_indices), through tools/train.py."""
    config = make_tiny_config(tmp_path / 'cfg.py')
    train = load_tool('train.py')
    monkeypatch.setenv('LOCAL_RANK', '0')
    with pytest.raises(TypeError, match="unexpected keyword argument "
                       "'out_indice'"):
        train.main([config, '--work-dir', str(tmp_path / 'work'),
                    '--cfg-options', 'model.backbone.out_indice=[0,1,2,3]'])


def test_typo_in_arch_key(s12_model_cfg):
    model = s12_model_cfg.copy()
    model.backbone = dict(model.backbone, arch=dict(
        layers=[2, 2, 6, 2], embed_dim=[64, 128, 320, 512]))
    with pytest.raises(ValueError, match=r"unknown keys \['embed_dim'\] "
                       r"\(did you mean 'embed_dims' for 'embed_dim'\?\)"):
        MODELS.build(model)


def test_checkpoint_from_another_architecture(s12_model_cfg, tmp_path):
    """A tiny-arch segmentor's checkpoint given to the S12 segmentor."""
    small = Config(dict(model=s12_model_cfg.to_dict()))
    small.merge_from_dict(TINY_MODEL)
    path = str(tmp_path / 'tiny.pth')
    torch.save({'state_dict': MODELS.build(small.model).state_dict()}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_segmentor_checkpoint(MODELS.build(s12_model_cfg), path)
    message = str(err.value)
    assert f'checkpoint {path} does not fit the model' in message
    assert 'shape mismatch' in message
    assert 'backbone.stem.proj.weight (checkpoint [8, 3, 7, 7], model ' \
        '[64, 3, 7, 7])' in message


@pytest.mark.slow
def test_non_finite_loss_stops_training(run_tool, make_tiny_config,
                                        tmp_path):
    """lr=1e30 blows the weights up after one step; the run stops at the
    first non-finite loss and no checkpoint holds NaN/Inf."""
    options = dict(TINY_MODEL)
    options.update({'optim_wrapper.optimizer.lr': 1e30,
                    'default_hooks.checkpoint.interval': 1})
    config = make_tiny_config(tmp_path / 'cfg.py', max_iters=6, **options)
    work_dir = tmp_path / 'work'
    proc = run_tool('train.py', config, '--work-dir', work_dir, env=ENV,
                    check=False)
    assert proc.returncode != 0
    assert 'NonFiniteError: training stopped at iteration' in proc.stdout
    assert 'non-finite loss' in proc.stdout and '--resume' in proc.stdout
    saved = sorted(f for f in os.listdir(work_dir) if f.endswith('.pth'))
    stopped_at = int(proc.stdout.split('stopped at iteration ')[1].split(
        ':')[0])
    assert saved == [f'iter_{i}.pth' for i in range(1, stopped_at)]
    for name in saved:
        state = load(osp.join(work_dir, name))['state_dict']
        assert all(torch.isfinite(v).all() for v in state.values()), name
