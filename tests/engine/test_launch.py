"""Tool set-up: distributed launches on CPU-only machines, quiet warnings."""
import os.path as osp
import re
import subprocess
import sys

import pytest
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


# The upstream calls that emit each known warning, run in a fresh process with
# every warning shown; the tools' filter must silence all of them.
_KNOWN_WARNING_SOURCES = '''
import warnings
warnings.simplefilter('always')
import poolformer_seg
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS, TRANSFORMS
from poolformer_seg.engine import quiet_known_warnings
init_default_scope('mmseg')
if QUIET:
    quiet_known_warnings()
cfg = Config.fromfile('configs/fpn_poolformer_s12_ade20k.py')
cfg.model.backbone.init_cfg = None
cfg.model.decode_head.norm_cfg = dict(type='BN', requires_grad=True)
MODELS.build(cfg.model)
TRANSFORMS.build(dict(type='LoadAnnotations', reduce_zero_label=True))
from mmseg.registry import HOOKS, VISUALIZERS
VISUALIZERS.build(dict(type='SegLocalVisualizer', name='visualizer'))
HOOKS.build(dict(type='SegVisualizationHook', draw=False))
# torch's own text (DataLoader._check_worker_number_rationality)
warnings.warn('This DataLoader will create 4 worker processes in total. '
              'Our suggested max number of worker in current system is 2')
'''


@pytest.mark.slow
@pytest.mark.parametrize('quiet', [False, True])
def test_known_upstream_warnings_are_silenced_by_the_tools(quiet):
    from poolformer_seg.engine.launch import KNOWN_WARNINGS
    code = _KNOWN_WARNING_SOURCES.replace('QUIET', str(quiet))
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, cwd=osp.dirname(osp.dirname(
                              osp.dirname(osp.abspath(__file__)))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = [pattern for pattern, _, _ in KNOWN_WARNINGS
             if re.search(pattern, proc.stderr)]
    # without the filter every entry of the table is real; with it, none shows
    assert shown == ([] if quiet else [p for p, _, _ in KNOWN_WARNINGS])
    assert ('MultiScaleDeformableAttention' in proc.stderr) is False
