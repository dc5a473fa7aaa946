"""The PoolFormer backbone: sizes, fidelity to upstream weights, options.

References: HF ``transformers.PoolFormerModel`` (real library), MMPretrain
1.2.0's PoolFormer source (loaded by :mod:`tests.helpers.upstream`), and
sail-sg/timm checkpoints written from the key mapping of upstream.md §7.
"""
import re

import pytest
import torch
import torch.nn as nn

from poolformer_seg import PoolFormer
from poolformer_seg.utils.loading import CheckpointMismatchError
from tests.helpers import upstream

TOL = dict(atol=1e-5, rtol=1e-5)
# a size that is a multiple of 32, and one that is not
SIZES = [(224, 224), (200, 250)]
TINY = dict(layers=[2, 1, 2, 1], embed_dims=[16, 32, 48, 64])


def assert_all_close(ours, refs):
    assert len(ours) == len(refs)
    for i, (a, b) in enumerate(zip(ours, refs)):
        assert a.shape == b.shape, f'stage {i}: {a.shape} vs {b.shape}'
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f'stage {i}: '
                                   + m)


def pretrained(path, **kwargs):
    """Our backbone initialised from ``path`` through init_cfg."""
    model = PoolFormer(init_cfg=dict(type='Pretrained', checkpoint=str(path)),
                       **kwargs)
    model.init_weights()
    return model.eval()


# ----------------------------------------------------------------------------
# Sizes


@pytest.mark.slow
@pytest.mark.parametrize('arch, count', [
    ('s12', 11_403_200), ('s24', 20_876_992), ('s36', 30_350_784),
    ('m36', 55_404_864), ('m48', 72_705_792)])
def test_parameter_counts_match_published_backbones(arch, count):
    model = PoolFormer(arch=arch)
    assert sum(p.numel() for p in model.parameters()) == count
    norms = [name for name, _ in model.named_children()
             if re.fullmatch(r'norm\d', name)]
    assert norms == ['norm0', 'norm1', 'norm2', 'norm3']


@pytest.mark.parametrize('size, expected', [
    ((224, 224), [(56, 56), (28, 28), (14, 14), (7, 7)]),
    ((375, 500), [(94, 125), (47, 63), (24, 32), (12, 16)]),
    ((3, 3), [(1, 1)] * 4)])
def test_output_shapes(size, expected):
    model = PoolFormer(arch=TINY, out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert [tuple(o.shape[-2:]) for o in outs] == expected
    assert [o.shape[1] for o in outs] == TINY['embed_dims']


def test_out_indices_select_stages_in_order():
    model = PoolFormer(arch=TINY, out_indices=(-1, 1)).eval()
    assert model.out_indices == (1, 3)
    assert model.out_channels == [32, 64]
    assert [n for n, _ in model.named_children() if n.startswith('norm')] == \
        ['norm1', 'norm3']
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 8, 8), (2, 64, 2, 2)]


@pytest.mark.parametrize('bad, match', [
    (torch.randn(3, 64, 64), r'B x C x H x W'),
    (torch.randn(1, 1, 64, 64), r'in_channels=3 .* 1 channels'),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), r'float tensor'),
    (torch.randn(1, 3, 2, 64), r'smaller than the minimum 3 px')])
def test_unsupported_inputs_raise_naming_the_problem(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PoolFormer(arch=TINY)(bad)


# ----------------------------------------------------------------------------
# Fidelity: HF transformers


@pytest.fixture(scope='module')
def transformers():
    return pytest.importorskip('transformers')


HF_TINY = dict(depths=[2, 1, 2, 1], hidden_sizes=[16, 32, 48, 64],
               patch_sizes=[5, 3, 3, 3], strides=[2, 2, 2, 2],
               padding=[2, 1, 1, 1], mlp_ratio=3.0, num_labels=7)
OUR_TINY = dict(layers=[2, 1, 2, 1], embed_dims=[16, 32, 48, 64],
                mlp_ratios=[3, 3, 3, 3], stem_patch_size=5, stem_stride=2,
                stem_padding=2)


@pytest.mark.slow
@pytest.mark.parametrize('config, arch, head, fmt', [
    ('tiny', OUR_TINY, False, 'bin'),
    ('tiny', OUR_TINY, False, 'safetensors'),
    ('tiny', OUR_TINY, True, 'bin'),
    ('tiny', OUR_TINY, True, 'safetensors'),
    ('s12', 's12', False, 'safetensors'),
    ('s12', 's12', True, 'bin')])
def test_hf_weights_give_hf_stage_features(transformers, tmp_path, config,
                                           arch, head, fmt):
    cfg = transformers.PoolFormerConfig(**(HF_TINY if config == 'tiny'
                                           else dict(num_labels=5)))
    cls = transformers.PoolFormerForImageClassification if head else \
        transformers.PoolFormerModel
    hf = upstream.randomize_(cls(cfg), seed=1).eval()
    if fmt == 'bin':
        path = tmp_path / 'pytorch_model.bin'
        torch.save(hf.state_dict(), path)
    else:
        hf.save_pretrained(tmp_path)  # writes model.safetensors
        path = tmp_path / 'model.safetensors'
        assert path.is_file()
    ours = pretrained(path, arch=arch)
    for size in SIZES:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            ref = hf(x, output_hidden_states=True)
            feats = ours.stage_features(x)
            assert_all_close(feats, ref.hidden_states)
            if head:  # the classifier's final norm fills our norm3
                torch.testing.assert_close(ours(x)[3],
                                           hf.norm(ref.hidden_states[3]),
                                           **TOL)


@pytest.mark.slow
def test_hf_model_directory_loads(transformers, tmp_path):
    hf = upstream.randomize_(
        transformers.PoolFormerModel(transformers.PoolFormerConfig(**HF_TINY)),
        seed=2).eval()
    hf.save_pretrained(tmp_path)
    x = torch.randn(1, 3, 40, 52)
    with torch.no_grad():
        assert_all_close(pretrained(tmp_path, arch=OUR_TINY).stage_features(x),
                         hf(x, output_hidden_states=True).hidden_states)


# ----------------------------------------------------------------------------
# Fidelity: MMPretrain 1.2.0 source, sail-sg and timm layouts


@pytest.fixture(scope='module')
def mmpretrain_s12():
    """mmpretrain's S12 backbone with all four output norms, random."""
    model = upstream.mmpretrain_poolformer(
        arch='s12', out_indices=(0, 2, 4, 6), frozen_stages=-1)
    upstream.randomize_(model, seed=3).eval()  # its train() returns None
    return model


@pytest.fixture(scope='module')
def references(mmpretrain_s12):
    """Per input size: the input, raw stage outputs and normed outputs."""
    refs = {}
    for size in SIZES:
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(
            size[0]))
        with torch.no_grad():
            raw = upstream.mmpretrain_stage_outputs(mmpretrain_s12, x)
            # what mmpretrain's forward_tokens returns: norm{idx} per output
            normed = [getattr(mmpretrain_s12, f'norm{2 * i}')(r)
                      for i, r in enumerate(raw)]
        refs[size] = (x, raw, normed)
    return refs


def _feat_sd(mmpretrain_s12):
    return mmpretrain_s12.state_dict()


def _official_cls(mmpretrain_s12):
    return upstream.official_cls_from_feat(mmpretrain_s12.state_dict())


def _mmpretrain_cls(mmpretrain_s12):
    """An mmpretrain ImageClassifier checkpoint (backbone out_indices=-1)."""
    cls = _official_cls(mmpretrain_s12)
    sd = {f'backbone.{k}': v for k, v in cls.items()
          if not k.startswith(('norm.', 'head.'))}
    sd['backbone.norm6.weight'] = cls['norm.weight']
    sd['backbone.norm6.bias'] = cls['norm.bias']
    sd['head.fc.weight'] = cls['head.weight']
    sd['head.fc.bias'] = cls['head.bias']
    return {'meta': {'dataset_meta': {'classes': ('a', 'b')}},
            'state_dict': sd}


def _timm(mmpretrain_s12):
    return upstream.timm_from_official(_official_cls(mmpretrain_s12))


def _timm_features(mmpretrain_s12):
    return upstream.timm_features_only(_timm(mmpretrain_s12))


# writer, prefix for init_cfg, which of our norms the file fills. (Wrappers
# and auto-detected prefixes are covered on a tiny model in
# tests/utils/test_checkpoint.py.)
LAYOUT_CASES = {
    'official_feat': (_feat_sd, None, [0, 1, 2, 3]),
    'official': (_official_cls, None, [3]),
    'mmpretrain_prefix': (_mmpretrain_cls, 'backbone.', [3]),
    'timm': (_timm, None, [3]),
    'timm_features_only': (_timm_features, None, []),
}


@pytest.mark.slow
@pytest.mark.parametrize('case', list(LAYOUT_CASES))
def test_upstream_layouts_give_mmpretrain_stage_features(
        case, mmpretrain_s12, references, tmp_path):
    writer, prefix, filled = LAYOUT_CASES[case]
    path = tmp_path / f'{case}.pth'
    torch.save(writer(mmpretrain_s12), path)
    ours = PoolFormer(arch='s12', init_cfg=dict(
        type='Pretrained', checkpoint=str(path), prefix=prefix))
    ours.init_weights()
    ours.eval()
    for size in SIZES:
        x, raw, normed = references[size]
        with torch.no_grad():
            feats = ours.stage_features(x)
            assert_all_close(feats, raw)
            outs = [getattr(ours, f'norm{i}')(f) for i, f in enumerate(feats)]
        for i in range(4):
            if i in filled:  # our norm{i} is mmpretrain's norm{2i}
                torch.testing.assert_close(outs[i], normed[i], **TOL)
            else:  # left at init: weight 1, bias 0
                assert torch.equal(getattr(ours, f'norm{i}').weight,
                                   torch.ones(ours.out_channels[i]))


def test_pretrained_log_names_layout_and_unfilled_norms(mmpretrain_s12,
                                                        tmp_path):
    path = tmp_path / 'official.pth'
    torch.save(_official_cls(mmpretrain_s12), path)
    from poolformer_seg.utils.loading import load_pretrained
    lines = load_pretrained(PoolFormer(arch='s12'), str(path))
    text = '\n'.join(lines)
    assert 'sail-sg classification layout' in text
    assert 'norm3 filled from' in text
    assert 'dropped 2 tensors' in text and 'head.weight' in text
    assert 'output norms norm0, norm1, norm2 of this model are not in the ' \
        'checkpoint and stay at their initialisation' in text
    assert 'unexpected keys: none' in text
    assert 'missing keys: norm0.weight' in text


# ----------------------------------------------------------------------------
# Options


def expected_frozen(frozen_stages):
    """Parameter-name prefixes frozen under the ResNet convention."""
    if frozen_stages < 0:
        return ()
    return ('stem.',) + tuple(f'stages.{i}.' for i in range(frozen_stages)) \
        + tuple(f'norm{i}.' for i in range(frozen_stages))


@pytest.mark.parametrize('frozen_stages', [-1, 0, 1, 2, 3, 4])
def test_frozen_stages_freeze_exactly_the_intended_parameters(frozen_stages):
    model = PoolFormer(arch=TINY, frozen_stages=frozen_stages)
    model.train()
    prefixes = expected_frozen(frozen_stages)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith(prefixes)}
    if frozen_stages == 4:  # everything, output norms included
        assert frozen == {n for n, _ in model.named_parameters()}
    for name, module in model.named_modules():
        if name:  # frozen modules stay in eval mode after train()
            assert module.training == (not (name + '.').startswith(prefixes)
                                       ), name


def test_frozen_stages_give_no_gradient():
    model = PoolFormer(arch=TINY, frozen_stages=2).train()
    sum(o.sum() for o in model(torch.randn(1, 3, 32, 32))).backward()
    for name, param in model.named_parameters():
        assert (param.grad is None) == name.startswith(expected_frozen(2))


def test_norm_eval_keeps_norms_in_eval_mode():
    model = PoolFormer(arch=TINY, norm_eval=True, impl='plain',
                       norm_cfg=dict(type='BN')).train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    before = norms[0].running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(norms[0].running_mean, before)
    assert model.stem.training  # the rest trains
    # without norm_eval, BN statistics move
    model = PoolFormer(arch=TINY, impl='plain',
                       norm_cfg=dict(type='BN')).train()
    assert all(m.training for m in model.modules()
               if isinstance(m, nn.BatchNorm2d))


def test_train_returns_self():
    model = PoolFormer(arch=TINY)
    assert model.train() is model
    assert model.eval() is model


@pytest.mark.slow
def test_with_cp_gives_identical_gradients():
    torch.manual_seed(0)
    plain = upstream.randomize_(PoolFormer(arch=TINY), seed=4).train()
    cp = PoolFormer(arch=TINY, with_cp=True).train()
    cp.load_state_dict(plain.state_dict())
    calls = []
    block = cp.stages[2].blocks[0]
    # a pre-hook: recomputation may stop early, before forward hooks run
    block.register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 48, 40)
    grads = []
    for model in (plain, cp):
        model.zero_grad()
        sum((o * o).mean() for o in model(x)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(calls) == 2  # forward + recomputation: checkpointing is on
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6,
                                   rtol=1e-5, msg=name)


def test_drop_path_rate_rises_linearly_over_blocks():
    model = PoolFormer(arch=TINY, drop_path_rate=0.3)
    blocks = [b for stage in model.stages for b in stage.blocks]
    expected = torch.linspace(0, 0.3, len(blocks)).tolist()
    assert isinstance(blocks[0].drop_path, nn.Identity)
    rates = [0.] + [b.drop_path.drop_prob for b in blocks[1:]]
    assert rates == pytest.approx(expected)


# ----------------------------------------------------------------------------
# Bad configs


@pytest.mark.parametrize('kwargs, match', [
    (dict(arch='s13'), r"arch='s13' is not a PoolFormer variant"),
    (dict(out_indices=(4, )), r'out_indices entry 4 is out of range'),
    (dict(out_indices=(0, -4)), r'names a stage twice'),
    (dict(arch=dict(embed_dims=[8, 16, 24, 32])), r"missing \['layers'\]"),
    (dict(arch=dict(layers=[1, 1, 1], embed_dims=[8, 16, 24, 32])),
     r"arch\['layers'\] must list 4"),
    (dict(arch=dict(TINY, depths=[1, 1, 1, 1])), r"unknown keys \['depths'\]"),
    (dict(arch=dict(TINY, pool_size=4)), r'pool_size.*odd'),
    (dict(frozen_stages=5), r'frozen_stages must be an int in \[-1, 4\]'),
    (dict(drop_path_rate=1.5), r'drop_path_rate must be in \[0, 1\)')])
def test_bad_configs_raise_naming_the_problem(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PoolFormer(**kwargs)


def test_checkpoint_of_another_width_raises_naming_keys_and_shapes(tmp_path):
    path = tmp_path / 'other.pth'
    torch.save(PoolFormer(arch=dict(TINY, embed_dims=[8, 16, 24, 32]))
               .state_dict(), path)
    with pytest.raises(CheckpointMismatchError,
                       match=r'(?s)another arch.*shape mismatch: '
                       r'stem\.proj\.weight \(checkpoint \[8, 3, 7, 7\], '
                       r'model \[16, 3, 7, 7\]\)'):
        pretrained(path, arch=TINY)


def test_checkpoint_of_another_depth_raises_naming_keys(tmp_path):
    path = tmp_path / 'deeper.pth'
    torch.save(PoolFormer(arch=dict(TINY, layers=[2, 1, 3, 1])).state_dict(),
               path)
    with pytest.raises(CheckpointMismatchError,
                       match=r'unexpected: stages\.2\.blocks\.2\.'):
        pretrained(path, arch=TINY)
    with pytest.raises(CheckpointMismatchError,
                       match=r'missing: stages\.2\.blocks\.3\.'):
        pretrained(path, arch=dict(TINY, layers=[2, 1, 4, 1]))


def test_unknown_checkpoint_raises_naming_file_and_keys(tmp_path):
    path = tmp_path / 'resnet.pth'
    torch.save({'conv1.weight': torch.zeros(1), 'fc.bias': torch.zeros(1)},
               path)
    from poolformer_seg.utils.safe_load import CheckpointError
    with pytest.raises(CheckpointError,
                       match=r'resnet\.pth: not a PoolFormer checkpoint.*'
                       r'conv1\.weight, fc\.bias'):
        pretrained(path, arch=TINY)
