"""MetaFormer weights of the timm and sail-sg layouts, through init_cfg.

References: timm 1.0's ``metaformer.py`` models (random weights) and its
``checkpoint_filter_fn``; sail-sg checkpoints are written by the independent
inverse in :mod:`tests.helpers.sailsg_metaformer`, itself checked against
that filter.
"""
import pytest
import torch
from safetensors.torch import save_file

from poolformer_seg import MetaFormer, PoolFormer
from poolformer_seg.utils.loading import (CheckpointError,
                                          CheckpointMismatchError)
from poolformer_seg.utils.metaformer_layouts import (
    convert_metaformer_state_dict, detect_metaformer_layout)
from tests.helpers.sailsg_metaformer import sailsg_from_timm
from tests.helpers.timm_ref import (float64_inputs, randomize_metaformer_,
                                    timm_metaformer, timm_model)

TOL = dict(atol=1e-5, rtol=1e-5)
SIZES = [(224, 224), (200, 250)]
TINY = dict(layers=[1, 1, 2, 1], embed_dims=[16, 32, 64, 96],
            token_mixers=['sepconv', 'pool', 'attention', 'attention'])


def save(state_dict, path, fmt):
    if fmt == 'safetensors':
        save_file({k: v.contiguous() for k, v in state_dict.items()},
                  str(path))
    elif fmt == 'pth':  # a training checkpoint: wrapped
        torch.save({'state_dict': state_dict, 'epoch': 3}, path)
    else:
        torch.save(state_dict, path)
    return str(path)


def pretrained(path, arch, **kwargs):
    model = MetaFormer(arch, init_cfg=dict(type='Pretrained',
                                           checkpoint=str(path)), **kwargs)
    model.init_weights()
    return model.eval()


@pytest.fixture(scope='module')
def timm_classifiers():
    """One random timm classifier per family (10 classes), built once."""
    return {arch: randomize_metaformer_(timm_model(arch, num_classes=10),
                                        seed=i).eval()
            for i, arch in enumerate(['poolformerv2_s12', 'convformer_s18',
                                      'caformer_s18'])}


# ----------------------------------------------------------------------------
# The test helper against timm's own converter


@pytest.mark.parametrize('arch', ['poolformerv2_s12', 'convformer_s18',
                                  'caformer_s18'])
def test_sailsg_writer_inverts_timm_checkpoint_filter(timm_classifiers, arch):
    model = timm_classifiers[arch]
    timm_sd = model.state_dict()
    sailsg = sailsg_from_timm(timm_sd)
    assert 'downsample_layers.0.post_norm.weight' in sailsg
    assert sailsg['stages.0.0.mlp.fc1.weight'].dim() == 2
    back = timm_metaformer().checkpoint_filter_fn(sailsg, model)
    assert sorted(back) == sorted(timm_sd)
    for key, value in timm_sd.items():
        assert torch.equal(back[key].reshape(value.shape), value), key


# ----------------------------------------------------------------------------
# Fidelity through the loader


@pytest.mark.slow
@pytest.mark.parametrize('arch, layout, fmt', [
    ('poolformerv2_s12', 'timm', 'safetensors'),
    ('convformer_s18', 'timm', 'bin'),
    ('caformer_s18', 'timm', 'pth'),
    ('caformer_s18', 'timm_features_only', 'safetensors'),
    ('poolformerv2_s12', 'sail-sg', 'pth'),
    ('convformer_s18', 'sail-sg', 'bin'),
    ('caformer_s18', 'sail-sg', 'pth')])
def test_checkpoints_give_timm_stage_features(timm_classifiers, tmp_path,
                                              arch, layout, fmt):
    timm = timm_classifiers[arch]
    state = timm.state_dict()
    if layout == 'sail-sg':
        state = sailsg_from_timm(state)
    elif layout == 'timm_features_only':
        state = {k.replace('stages.', 'stages_', 1): v
                 for k, v in state.items() if not k.startswith('head.')}
    ours = pretrained(save(state, tmp_path / f'w.{fmt}', fmt), arch)
    for x in float64_inputs(ours, timm, SIZES):
        with torch.no_grad():
            refs = timm.forward_intermediates(x, intermediates_only=True)
            feats = ours.stage_features(x)
        assert len(feats) == len(refs) == 4
        for i, (a, b) in enumerate(zip(feats, refs)):
            torch.testing.assert_close(a, b, **TOL,
                                       msg=lambda m: f'stage {i}: ' + m)
    if layout != 'timm_features_only':  # the final norm fills norm3
        torch.testing.assert_close(ours.norm3.weight,
                                   timm.head.norm.weight)
        torch.testing.assert_close(ours.norm3.bias, timm.head.norm.bias)


def test_log_names_layout_dropped_head_and_untrained_norms(
        timm_classifiers, tmp_path):
    state = sailsg_from_timm(timm_classifiers['convformer_s18'].state_dict())
    path = save(state, tmp_path / 'convformer_s18.pth', 'pth')
    model = MetaFormer('convformer_s18')
    from poolformer_seg.utils.loading import load_pretrained_metaformer
    lines = '\n'.join(load_pretrained_metaformer(model, path))
    assert 'sail-sg/metaformer layout' in lines
    assert "arch='convformer_s18'" in lines
    assert 'dropped the classifier head (6 tensors: head.fc1.weight' in lines
    assert 'norm3 filled from' in lines and "norm.weight" in lines
    assert 'output norms norm0, norm1, norm2 are not in the checkpoint' \
        in lines


# ----------------------------------------------------------------------------
# Mapping table


@pytest.mark.parametrize('key, expected', [
    ('downsample_layers.0.conv.weight', 'stem.conv.weight'),
    ('downsample_layers.0.post_norm.weight', 'stem.norm.weight'),
    ('downsample_layers.2.pre_norm.weight', 'stages.2.downsample.norm.weight'),
    ('downsample_layers.3.conv.bias', 'stages.3.downsample.conv.bias'),
    ('stages.1.2.token_mixer.pwconv1.weight',
     'stages.1.blocks.2.token_mixer.pwconv1.weight'),
    ('stages.3.0.res_scale2.scale', 'stages.3.blocks.0.res_scale2.scale'),
    ('norm.bias', 'norm3.bias'),
    ('head.fc2.weight', None)])
def test_sailsg_key_mapping(key, expected):
    state = {'downsample_layers.0.conv.weight': torch.zeros(1), key:
             torch.zeros(1)}
    converted, layout, _ = convert_metaformer_state_dict(state)
    assert layout == 'sail-sg'
    if expected is None:
        assert key not in converted and len(converted) == 1
    else:
        assert expected in converted


@pytest.mark.parametrize('key, expected', [
    ('stages_2.blocks.0.mlp.fc1.weight', 'stages.2.blocks.0.mlp.fc1.weight'),
    ('head.norm.weight', 'norm3.weight'),
    ('head.fc.fc1.bias', None),
    ('norm1.bias', 'norm1.bias')])
def test_timm_key_mapping(key, expected):
    converted, layout, _ = convert_metaformer_state_dict(
        {'stem.conv.weight': torch.zeros(1), key: torch.zeros(1)})
    assert layout == 'timm'
    assert (expected in converted) if expected else len(converted) == 1


# ----------------------------------------------------------------------------
# Strictness and errors


def tiny_checkpoint(tmp_path, arch=TINY, **kwargs):
    model = randomize_metaformer_(MetaFormer(arch, **kwargs), seed=7)
    return save(model.state_dict(), tmp_path / 'tiny.pth', 'bin'), model


def test_whole_segmentor_checkpoint_loads_its_backbone(tmp_path):
    _, source = tiny_checkpoint(tmp_path)
    state = {f'backbone.{k}': v for k, v in source.state_dict().items()}
    state['decode_head.conv_seg.weight'] = torch.zeros(3, 8, 1, 1)
    path = save(state, tmp_path / 'segmentor.pth', 'pth')
    model = pretrained(path, TINY)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_output_norms_of_unused_stages_are_ignored(tmp_path):
    path, source = tiny_checkpoint(tmp_path)
    model = pretrained(path, TINY, out_indices=(3, ))
    assert torch.equal(model.norm3.weight, source.norm3.weight)
    assert not hasattr(model, 'norm0')


@pytest.mark.parametrize('arch, match', [
    (dict(TINY, layers=[1, 1, 3, 1]),
     r'missing: stages\.2\.blocks\.2\.norm1\.weight'),
    (dict(TINY, layers=[1, 1, 1, 1]),
     r'unexpected: stages\.2\.blocks\.1\.norm1\.weight'),
    (dict(TINY, embed_dims=[16, 32, 64, 128]),
     r'shape mismatch: stages\.3\.downsample\.conv\.weight \(checkpoint '
     r'\[96, 64, 3, 3\], model \[128, 64, 3, 3\]\)'),
    (dict(TINY, token_mixers=['sepconv', 'pool', 'attention', 'pool']),
     r'unexpected: stages\.3\.blocks\.0\.token_mixer\.qkv\.weight'),
    (dict(TINY, res_scale_init_values=None),
     r'unexpected: .*res_scale1\.scale')])
def test_checkpoint_of_another_arch_raises_naming_keys_and_arch(
        tmp_path, arch, match):
    path, _ = tiny_checkpoint(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=match) as info:
        pretrained(path, arch)
    assert 'MetaFormer(custom arch layers=' in str(info.value)


def test_published_variant_mismatch_names_the_arch(tmp_path):
    with torch.device('meta'):  # shapes only
        state = MetaFormer('caformer_s18').state_dict()
    path = save({k: torch.zeros(v.shape) for k, v in state.items()},
                tmp_path / 'caformer_s18.pth', 'bin')
    with pytest.raises(CheckpointMismatchError,
                       match=r"does not fit MetaFormer\(arch='convformer_s18'"
                       r"\)(.|\n)*missing: stages\.2\.blocks\.0\.token_mixer"
                       r"\.pwconv1\.weight"):
        pretrained(path, 'convformer_s18')


def test_poolformer_v1_checkpoint_points_to_poolformer(tmp_path):
    v1 = PoolFormer(arch=dict(layers=[1] * 4, embed_dims=[8, 16, 24, 32]))
    path = save(v1.state_dict(), tmp_path / 'v1.pth', 'bin')
    with pytest.raises(CheckpointError, match=r"type='PoolFormer'"):
        pretrained(path, TINY)


def test_unknown_layout_raises_showing_keys(tmp_path):
    path = save({'encoder.layer.0.weight': torch.zeros(2)},
                tmp_path / 'other.pth', 'bin')
    with pytest.raises(CheckpointError, match=r'other\.pth: not a MetaFormer '
                       r'checkpoint .* encoder\.layer\.0\.weight'):
        pretrained(path, TINY)


def test_detect_layout():
    assert detect_metaformer_layout({'stem.conv.weight': 0}) == 'timm'
    assert detect_metaformer_layout(
        {'downsample_layers.0.conv.weight': 0}) == 'sail-sg'
