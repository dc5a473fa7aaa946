"""Every config in ``configs/``, built as it is (the fast path by default):

* on the ``meta`` device, inference (``mode='tensor'``) and a training step
  (loss and backward) run and give ``meta`` results of the right shapes: no
  code path creates a tensor on another device (a CUDA model whose fast
  path made a CPU tensor would fail there the same way);
* in float64 on CPU, the fast model and ``model.impl='plain'`` (upstream
  mmseg's computation) give the same logits to 1e-10 of their largest
  magnitude, with non-trivial random weights.

The input size, 66 x 98, is not a multiple of 32: every stage has odd
sizes. Big variants (m36, m48, b36) are in the slow tier.
"""
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

import poolformer_seg  # noqa: F401  (before mmseg's models)
from tests.conftest import REPO
from tests.helpers.upstream import randomize_

SIZE = (66, 98)
CONFIGS = sorted(osp.basename(p)[:-3]
                 for p in glob.glob(osp.join(REPO, 'configs', '*.py')))


def configs(slow_variants):
    return [pytest.param(name, marks=pytest.mark.slow)
            if any(f'_{v}_' in name for v in slow_variants) else name
            for name in CONFIGS]


def build(name, impl=None, device='cpu'):
    """The config's segmentor, without downloads (``init_cfg=None``),
    SyncBN as BN, built on ``device``."""
    init_default_scope('mmseg')
    cfg = Config.fromfile(osp.join(REPO, 'configs', f'{name}.py'))
    if impl is not None:
        cfg.merge_from_dict({'model.impl': impl})
    cfg.model.backbone.init_cfg = None
    with torch.device(device):
        return revert_sync_batchnorm(MODELS.build(cfg.model))


def test_every_config_is_covered():
    kinds = {name.split('_')[0] + '_' + name.split('_')[1]
             for name in CONFIGS}
    assert kinds == {'fpn_poolformer', 'fpn_poolformerv2', 'upernet_caformer',
                     'upernet_convformer'}
    assert len(CONFIGS) == 18


@pytest.mark.parametrize('name', configs(('m48', 'b36')))
def test_meta_inference_and_training_step(name, monkeypatch):
    # mmseg's ``accuracy`` (UPerHead, FCNHead) counts the labelled pixels by
    # boolean indexing, whose size meta cannot know unless told to assume
    # every element selected (a private torch flag; a count, not a device)
    from torch.fx.experimental import _config as fx_config
    monkeypatch.setattr(fx_config, 'meta_nonzero_assume_all_nonzero', True,
                        raising=False)
    model = build(name, device='meta')
    x = torch.empty(2, 3, *SIZE, device='meta')
    with torch.no_grad():
        model.eval()
        logits = model(x, mode='tensor')
        stride4 = model.extract_feat(x)[0].shape[2:]
    assert logits.device.type == 'meta'
    assert logits.shape == (2, 150, *stride4)
    assert tuple(stride4) == (16, 24)  # (66 + 4 - 7) // 4 + 1: 7x7/4 stem

    model.train()
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=SIZE, pad_shape=SIZE))
        sample.gt_sem_seg = PixelData(
            data=torch.zeros(1, *SIZE, dtype=torch.long, device='meta'))
        samples.append(sample)
    losses = model.loss(x, samples)
    loss = sum(v for k, v in losses.items() if 'loss' in k)
    assert loss.device.type == 'meta' and loss.dim() == 0
    loss.backward()
    grads = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(p.grad is not None and p.grad.device.type == 'meta'
                         and p.grad.shape == p.shape for _, p in grads), \
        [n for n, p in grads if p.grad is None]


@pytest.mark.parametrize('name', configs(('m36', 'm48', 'b36')))
def test_fast_and_plain_give_the_same_float64_logits(name):
    plain = build(name, 'plain')
    fast = build(name)
    with torch.no_grad():
        randomize_(plain, 0)
    fast.load_state_dict(plain.state_dict(), strict=True)
    plain.double().eval(), fast.double().eval()
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = plain(x, mode='tensor')
        got = fast(x, mode='tensor')
    assert got.dtype == torch.float64 and got.shape == want.shape
    scale = want.abs().max()
    assert scale > 0.1
    assert (got - want).abs().max() <= 1e-10 * scale


@pytest.mark.parametrize('before_compositions', [True, False])
def test_fast_equals_plain_in_float64_where_winograd_runs(
        monkeypatch, winograd_on, before_compositions):
    """At 258 x 290 the stride-4 maps are 65 x 73 and the stride-8 ones
    33 x 37, above Winograd's threshold (lowered to 32 x 32 here): the fast
    S12 segmentor (Winograd in neck and head, fused blocks, eval BN folded;
    in training, Winograd's backward and the blockwise loss) gives the
    plain segmentor's logits, loss and every gradient in float64, with
    Winograd before the finest level's compositions (as with AVX2) or
    after them, running their transposed convolution's phases (AVX-512).
    """
    from poolformer_seg.models import winograd
    from poolformer_seg.models.necks import fast_fpn
    monkeypatch.setattr(winograd, 'MIN_PIXELS', 32 * 32)
    monkeypatch.setattr(winograd, 'BEFORE_COMPOSITIONS', before_compositions)
    calls, phases = [], []
    real = winograd.winograd_conv3x3
    monkeypatch.setattr(winograd, 'winograd_conv3x3',
                        lambda *args: calls.append(1) or real(*args))
    monkeypatch.setattr(fast_fpn, 'winograd_conv3x3',
                        lambda *args: phases.append(1) or real(*args))
    size = (258, 290)
    plain = build('fpn_poolformer_s12_ade20k', 'plain')
    fast = build('fpn_poolformer_s12_ade20k')
    with torch.no_grad():
        randomize_(plain, 0)
    fast.load_state_dict(plain.state_dict(), strict=True)
    plain.double(), fast.double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, *size, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        want = plain.eval()(x, mode='tensor')
        got = fast.eval()(x, mode='tensor')
    assert calls  # Winograd ran
    assert bool(phases) is not before_compositions
    assert (got - want).abs().max() <= 1e-10 * want.abs().max()

    sample = SegDataSample(metainfo=dict(img_shape=size, pad_shape=size))
    sample.gt_sem_seg = PixelData(data=torch.randint(
        0, 150, (1, *size), generator=gen))
    results = []
    for model in (plain, fast):
        model.train()
        torch.manual_seed(1)  # the head's dropout draws the same mask
        loss = model.loss(x, [sample])['decode.loss_ce']
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()
                               if p.requires_grad}))
    (want_loss, want_grads), (got_loss, got_grads) = results
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-10, atol=0)
    assert got_grads.keys() == want_grads.keys()
    # one absolute scale: norm1's bias has an exactly zero gradient (the
    # pooling difference cancels it), which plain autograd rounds to ~1e-17
    scale = max(g.abs().max().item() for g in want_grads.values())
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-8,
                                   atol=1e-10 * scale, msg=name)
