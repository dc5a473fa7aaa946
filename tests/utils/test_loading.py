"""Loading checkpoints: upstream segmentors, strict loading, pre-hook.

The upstream segmentor is mmseg 1.x's ``fpn_poolformer_s12`` model: MMPretrain
1.2.0's PoolFormer source + mmseg's FPN and FPNHead (150 classes), with
random non-trivial weights, saved as mmengine does. Our segmentor comes from
``configs/_base_/models/fpn_poolformer_s12.py``.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from poolformer_seg import PoolFormer
from poolformer_seg.utils.layouts import unwrap_state_dict
from poolformer_seg.utils.loading import (CheckpointMismatchError,
                                          fit_state_dict,
                                          load_segmentor_checkpoint)
from tests.helpers import upstream
from tests.helpers.logs import captured_mmengine_log

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / 'configs' / '_base_' / 'models' / 'fpn_poolformer_s12.py'
# The criterion for fp32 logits: the fast path's Winograd convolutions
# round ~2e-5 away from a direct convolution (float64 agreement is tested in
# tests/models/test_winograd.py); a wrong key would move logits by O(1)
TOL = dict(atol=1e-4, rtol=1e-5)
SIZES = {'512x512': (512, 512), '250x330': (250, 330)}  # 250, 330: not /32
N_BACKBONE = 136  # S12 tensors: stem 2, downsampling 6, blocks 120, norms 8
CONVERTED = re.compile(rf"converted {N_BACKBONE} backbone keys under "
                       r"'backbone\.' from the mmseg/mmpretrain/sail-sg")


def our_segmentor(num_classes=150):
    model = Config.fromfile(str(CONFIG)).model
    model.backbone.init_cfg = None  # no ImageNet download in tests
    model.decode_head.num_classes = num_classes
    return upstream.build_segmentor(model)


def mmengine_checkpoint(state_dict):
    """What mmengine's Runner.save_checkpoint writes for mmseg 1.x."""
    from mmengine.logging import MessageHub
    hub = MessageHub.get_instance('poolformer_seg-test-checkpoint')
    hub.update_scalar('train/loss', 0.5)
    return {
        'meta': {'epoch': 0, 'iter': 40000, 'seed': 0,
                 'cfg': "model = dict(type='EncoderDecoder')",
                 'experiment_name': 'fpn_poolformer_s12_8xb4-40k_ade20k',
                 'mmengine_version': '0.10.7', 'time': '20240101_000000',
                 'dataset_meta': {'classes': ('wall', 'building'),
                                  'palette': [[120, 120, 120],
                                              [180, 120, 120]]}},
        'state_dict': state_dict,
        'message_hub': hub.state_dict(),
        'optimizer': {'state': {}, 'param_groups': [
            {'lr': 2e-4, 'weight_decay': 1e-4, 'params': [0, 1]}]},
        'param_schedulers': [{'power': 1.0, 'last_step': 40000}],
    }


def sail_sg_checkpoint(state_dict):
    """What sail-sg's mmseg 0.19 / mmcv 1.x save_checkpoint writes."""
    return {
        'meta': {'mmcv_version': '1.4.0', 'mmseg_version': '0.19.0',
                 'time': 'Mon Dec  6 00:00:00 2021', 'iter': 40000,
                 'epoch': 1, 'config': "model = dict(type='EncoderDecoder')",
                 'CLASSES': ('wall', 'building'),
                 'PALETTE': [[120, 120, 120], [180, 120, 120]]},
        'state_dict': state_dict,
        'optimizer': {'state': {}, 'param_groups': [{'lr': 0.0, 'params':
                                                     [0]}]},
    }


@pytest.fixture(scope='module')
def inputs():
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(1, 3, *size, generator=gen)
            for name, size in SIZES.items()}


@pytest.fixture(scope='module')
def upstream_model():
    return upstream.build_upstream_segmentor(seed=0)


@pytest.fixture(scope='module')
def upstream_logits(upstream_model, inputs):
    with torch.no_grad():
        return {name: upstream_model(x, mode='tensor')
                for name, x in inputs.items()}


@pytest.fixture(scope='module')
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('checkpoints')


@pytest.fixture(scope='module')
def mmseg_ckpt(upstream_model, ckpt_dir):
    path = ckpt_dir / 'fpn_poolformer_s12_mmseg.pth'
    torch.save(mmengine_checkpoint(upstream_model.state_dict()), path)
    return path


def assert_logits_equal(model, inputs, expected):
    with torch.no_grad():
        for name, x in inputs.items():
            logits = model(x, mode='tensor')
            assert logits.shape[1] == 150
            torch.testing.assert_close(logits, expected[name], **TOL,
                                       msg=lambda m: f'{name}: {m}')


def conversion_lines(lines):
    return [line for line in lines if 'PoolFormer: converted' in line]


# ----------------------------------------------------------------------------
# Upstream segmentor checkpoints


@pytest.mark.slow
def test_mmseg_checkpoint_gives_upstream_logits(mmseg_ckpt, inputs,
                                                upstream_logits):
    model = our_segmentor()
    with captured_mmengine_log() as lines:
        checkpoint = load_segmentor_checkpoint(model, str(mmseg_ckpt))
    converted = conversion_lines(lines)
    assert len(converted) == 1 and CONVERTED.search(converted[0]), lines
    assert checkpoint['meta']['dataset_meta']['classes'] == ('wall',
                                                             'building')
    assert_logits_equal(model, inputs, upstream_logits)


@pytest.mark.slow
def test_sail_sg_mmseg0x_checkpoint_gives_upstream_logits(ckpt_dir, inputs):
    # weights of our layout written under sail-sg names from the key mapping
    source = upstream.randomize_(our_segmentor(), seed=7)
    state_dict = upstream.official_from_ours(source.state_dict(), 'backbone.')
    assert 'backbone.network.6.1.layer_scale_2' in state_dict
    assert 'backbone.norm6.weight' in state_dict
    path = ckpt_dir / 'fpn_poolformer_s12_ade20k_40k-sail-sg.pth'
    torch.save(sail_sg_checkpoint(state_dict), path)
    # the reference: the upstream segmentor takes those names strictly
    reference = upstream.build_segmentor(upstream.upstream_segmentor_cfg())
    reference.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        expected = {n: reference(x, mode='tensor') for n, x in inputs.items()}

    model = our_segmentor()
    with captured_mmengine_log() as lines:
        checkpoint = load_segmentor_checkpoint(model, str(path))
    assert len(conversion_lines(lines)) == 1
    assert checkpoint['meta']['mmseg_version'] == '0.19.0'
    assert_logits_equal(model, inputs, expected)


def _mapped_equal(ours, upstream_state):
    """Our state dict, written back under upstream names, equals upstream's."""
    mapped = upstream.official_from_ours(ours.state_dict(), 'backbone.')
    assert mapped.keys() == upstream_state.keys()
    for key, value in upstream_state.items():
        assert torch.equal(mapped[key], value), key


def test_mmengine_load_checkpoint_converts_through_the_pre_hook(
        mmseg_ckpt, upstream_model):
    """load_from, --resume and tools go through mmengine's load_checkpoint."""
    from mmengine.runner import load_checkpoint
    model = our_segmentor()
    with captured_mmengine_log() as lines:
        # strict: any missing or unexpected key would raise here
        load_checkpoint(model, str(mmseg_ckpt), strict=True)
    assert len(conversion_lines(lines)) == 1
    _mapped_equal(model, upstream_model.state_dict())


def test_torch_load_state_dict_converts_through_the_pre_hook(upstream_model):
    model = our_segmentor()
    result = model.load_state_dict(upstream_model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _mapped_equal(model, upstream_model.state_dict())


def test_inference_api_init_model_converts(mmseg_ckpt, upstream_model):
    from mmseg.apis import init_model
    cfg = Config(dict(model=Config.fromfile(str(CONFIG)).model,
                      default_scope='mmseg'))
    # init_model sets a global default scope; keep it inside this test
    with DefaultScope.overwrite_default_scope('mmseg'), \
            captured_mmengine_log() as lines:
        model = init_model(cfg, str(mmseg_ckpt), device='cpu')
    assert len(conversion_lines(lines)) == 1
    assert model.dataset_meta['classes'] == ('wall', 'building')
    _mapped_equal(model, upstream_model.state_dict())


def test_pre_hook_reports_classifier_keys_as_unexpected():
    model = PoolFormer(arch=dict(layers=[1, 1, 1, 1],
                                 embed_dims=[8, 16, 24, 32]))
    official = upstream.official_from_ours(model.state_dict())
    official = upstream.official_cls_from_feat(
        {**official, 'norm6.weight': official['norm6.weight']})
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in "
                       r'state_dict: "head\.weight", "head\.bias"'):
        model.load_state_dict(official, strict=True)


# ----------------------------------------------------------------------------
# Mismatches never pass silently


def test_checkpoint_without_backbone_raises_naming_keys(upstream_model,
                                                        ckpt_dir):
    state = {k: v for k, v in upstream_model.state_dict().items()
             if not k.startswith('backbone.')}
    path = ckpt_dir / 'no_backbone.pth'
    torch.save({'state_dict': state}, path)
    with pytest.raises(CheckpointMismatchError,
                       match=rf'(?s)no_backbone\.pth does not fit.*missing '
                       rf'\({N_BACKBONE}\): backbone\.stem\.proj\.weight, '
                       r'backbone\.stem\.proj\.bias'):
        load_segmentor_checkpoint(our_segmentor(), str(path))


@pytest.fixture(scope='module')
def ckpt_19_classes(upstream_model, ckpt_dir):
    state = dict(upstream_model.state_dict())
    state['decode_head.conv_seg.weight'] = torch.randn(19, 128, 1, 1)
    state['decode_head.conv_seg.bias'] = torch.randn(19)
    path = ckpt_dir / 'cityscapes_19.pth'
    torch.save({'state_dict': state}, path)
    return path


def test_checkpoint_with_19_class_head_raises_naming_keys(ckpt_19_classes):
    with pytest.raises(CheckpointMismatchError,
                       match=r'(?s)shape mismatch \(2\): decode_head\.conv_seg'
                       r'\.weight \(checkpoint \[19, 128, 1, 1\], model '
                       r'\[150, 128, 1, 1\]\), decode_head\.conv_seg\.bias '
                       r'\(checkpoint \[19\], model \[150\]\).*'
                       r'allow_partial=True'):
        load_segmentor_checkpoint(our_segmentor(), str(ckpt_19_classes))


def test_allow_partial_loads_the_rest_and_warns(ckpt_19_classes,
                                                upstream_model):
    model = our_segmentor()
    head_before = model.decode_head.conv_seg.weight.clone()
    with captured_mmengine_log() as lines:
        load_segmentor_checkpoint(model, str(ckpt_19_classes),
                                  allow_partial=True)
    assert any('allow_partial' in line and 'decode_head.conv_seg.weight'
               in line for line in lines), lines
    assert torch.equal(model.decode_head.conv_seg.weight, head_before)
    assert torch.equal(model.backbone.norm1.weight,
                       upstream_model.backbone.norm2.weight)


def test_unused_keys_only_warn(upstream_model, ckpt_dir):
    state = dict(upstream_model.state_dict())
    state['auxiliary_head.conv_seg.weight'] = torch.zeros(150, 64, 1, 1)
    path = ckpt_dir / 'with_aux.pth'
    torch.save({'state_dict': state}, path)
    model = our_segmentor()
    with captured_mmengine_log() as lines:
        load_segmentor_checkpoint(model, str(path))
    assert any('does not use' in line and 'auxiliary_head.conv_seg.weight'
               in line for line in lines), lines
    _mapped_equal(model, upstream_model.state_dict())


@pytest.mark.slow
def test_ddp_prefix_and_model_wrapper(upstream_model, ckpt_dir):
    state = {f'module.{k}': v for k, v in upstream_model.state_dict().items()}
    path = ckpt_dir / 'ddp.pth'
    torch.save({'state_dict': state}, path)
    wrapped = torch.nn.DataParallel(our_segmentor())
    load_segmentor_checkpoint(wrapped, str(path))
    _mapped_equal(wrapped.module, upstream_model.state_dict())


def test_warm_start_with_another_head_says_what_was_skipped(
        mmseg_ckpt, upstream_model):
    """load_from for fine-tuning (CheckpointFitHook): conversion, the head
    keeps its initialisation, one line names the skipped head keys."""
    model = our_segmentor(num_classes=19)
    head_before = model.decode_head.conv_seg.weight.clone()
    state = unwrap_state_dict(torch.load(mmseg_ckpt, weights_only=False))
    with captured_mmengine_log() as lines:
        fitted = fit_state_dict(model, state, 'x.pth', new_head=True)
    assert len(conversion_lines(lines)) == 1
    skipped = [line for line in lines if 'keep their initialisation' in line]
    assert len(skipped) == 1 and 'fine-tuning from x.pth: 2 head tensors' \
        in skipped[0] and 'decode_head.conv_seg.weight, ' \
        'decode_head.conv_seg.bias' in skipped[0], lines
    model.load_state_dict(fitted, strict=True)
    assert torch.equal(model.decode_head.conv_seg.weight, head_before)
    assert torch.equal(model.backbone.stages[3].blocks[1].layer_scale2,
                       upstream_model.backbone.network[6][1].layer_scale_2)


def test_mmengine_load_checkpoint_is_strict_for_our_models(mmseg_ckpt):
    """mmengine's lenient load_checkpoint (mmseg's init_model, Runner)
    refuses a 19-class model's missing head instead of warning."""
    from mmengine.runner import load_checkpoint
    with pytest.raises(CheckpointMismatchError,
                       match=r'(?s)shape mismatch \(2\): decode_head\.conv_seg'
                       r'\.weight \(checkpoint \[150, 128, 1, 1\], model '
                       r'\[19, 128, 1, 1\]\)'):
        load_checkpoint(our_segmentor(num_classes=19), str(mmseg_ckpt),
                        strict=False)


@pytest.mark.slow
def test_converted_on_disk_round_trip_gives_upstream_logits(
        mmseg_ckpt, ckpt_dir, inputs, upstream_logits):
    dst = ckpt_dir / 'converted.pth'
    result = subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'convert_checkpoint.py'),
         str(mmseg_ckpt), str(dst)], capture_output=True, text=True,
        cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'segmentor checkpoint in the mmseg 1.x / sail-sg mmseg 0.x ' \
        '(backbone.network.*) layout' in result.stdout
    assert f'wrote {196} tensors' in result.stdout
    assert 'dropped training state: message_hub, optimizer, ' \
        'param_schedulers' in result.stdout
    converted = torch.load(dst, weights_only=True)
    assert 'backbone.stem.proj.weight' in converted['state_dict']
    assert converted['meta']['dataset_meta']['classes'] == ('wall',
                                                            'building')
    assert converted['meta']['poolformer_seg_converted_from'] == \
        'mmseg-segmentor'
    model = our_segmentor()
    with captured_mmengine_log() as lines:
        load_segmentor_checkpoint(model, str(dst))
    assert not conversion_lines(lines)  # already ours
    odd = {'250x330': inputs['250x330']}  # one size is enough here
    assert_logits_equal(model, odd, upstream_logits)
