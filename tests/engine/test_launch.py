"""adapt_to_cpu_distributed: distributed launches on CPU-only machines."""
import os.path as osp

import torch

import poolformer_seg  # noqa: F401  (before mmseg)
from mmengine.config import Config
from poolformer_seg.engine import adapt_to_cpu_distributed
from tests.conftest import S12_CONFIG


def test_cpu_distributed(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    cfg = Config.fromfile(S12_CONFIG)
    cfg.launcher = 'pytorch'
    notes = adapt_to_cpu_distributed(cfg)
    assert len(notes) == 3
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model.decode_head.norm_cfg.type == 'BN'
    assert 'SyncBN' not in str(cfg.model)
    assert cfg.model_wrapper_cfg.device_ids is None


def test_no_change_with_cuda_or_without_launcher(monkeypatch):
    for launcher, cuda in (('none', False), ('pytorch', True)):
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: cuda)
        cfg = Config.fromfile(S12_CONFIG)
        cfg.launcher = launcher
        before = cfg.pretty_text
        assert adapt_to_cpu_distributed(cfg) == []
        assert cfg.pretty_text == before
