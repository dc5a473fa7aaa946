"""Checkpoint layouts: detection and conversion of every published layout."""
import re

import pytest
import torch

from poolformer_seg import PoolFormer
from poolformer_seg.utils.layouts import (CheckpointError,
                                          convert_backbone_state_dict,
                                          detect_layout)
from tests.helpers import upstream

TINY = dict(layers=[1, 1, 2, 1], embed_dims=[8, 16, 24, 32])


@pytest.fixture(scope='module')
def tiny_states():
    """One tiny backbone in every upstream layout, via the key writers."""
    ours = upstream.randomize_(PoolFormer(arch=TINY), seed=9).state_dict()
    feat = upstream.official_from_ours(ours)
    cls = upstream.official_cls_from_feat(feat, num_classes=3)
    timm = upstream.timm_from_official(cls)
    mmpretrain = {**{f'backbone.{k}': v for k, v in feat.items()
                     if not re.match(r'norm[024]\.', k)},
                  'head.fc.weight': cls['head.weight'],
                  'head.fc.bias': cls['head.bias']}
    segmentor = {**{f'backbone.{k}': v for k, v in feat.items()},
                 'neck.fpn_convs.0.conv.weight': torch.zeros(1),
                 'decode_head.conv_seg.weight': torch.zeros(1)}
    return dict(ours=ours, official_feat=feat, official=cls, timm=timm,
                timm_features=upstream.timm_features_only(timm),
                mmpretrain=mmpretrain, mmseg=segmentor,
                ours_segmentor={f'backbone.{k}': v for k, v in ours.items()})


@pytest.mark.parametrize('name, layout, filled', [
    ('ours', 'ours', [0, 1, 2, 3]),
    ('official_feat', 'official_feat', [0, 1, 2, 3]),
    ('official', 'official', [3]),
    ('timm', 'timm', [3]),
    ('timm_features', 'timm', []),
    ('mmpretrain', 'mmpretrain', [3]),
    ('mmseg', 'mmpretrain', [0, 1, 2, 3]),
    ('ours_segmentor', 'ours', [0, 1, 2, 3])])
def test_every_layout_converts_to_exactly_our_tensors(tiny_states, name,
                                                      layout, filled):
    ours = tiny_states['ours']
    state = tiny_states[name]
    assert detect_layout(state) == layout
    converted, found, notes = convert_backbone_state_dict(state)
    assert found == layout
    expected = {k: v for k, v in ours.items()
                if not re.match(r'norm\d\.', k) or int(k[4]) in filled}
    assert converted.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key
    unfilled = [f'norm{i}' for i in range(4) if i not in filled]
    if unfilled:
        assert any(f'not in the checkpoint: {", ".join(unfilled)}' in note
                   for note in notes), notes


@pytest.mark.parametrize('wrap', ['state_dict', 'model', 'module'])
def test_wrappers_are_removed(tiny_states, wrap):
    state = tiny_states['official']
    if wrap == 'module':
        wrapped = {f'module.{k}': v for k, v in state.items()}
    else:
        wrapped = {wrap: state, 'epoch': 3}
    assert detect_layout(wrapped) == 'official'


def test_hf_layouts_are_detected():
    transformers = pytest.importorskip('transformers')
    config = transformers.PoolFormerConfig(depths=[1, 1, 1, 1],
                                           hidden_sizes=[8, 16, 24, 32])
    model = transformers.PoolFormerModel(config)
    assert detect_layout(model.state_dict()) == 'hf'
    classifier = transformers.PoolFormerForImageClassification(config)
    converted, layout, notes = convert_backbone_state_dict(
        classifier.state_dict())
    assert layout == 'hf' and 'norm3.weight' in converted
    assert any('classifier.weight' in note for note in notes)


def test_v2_and_unknown_checkpoints_raise():
    with pytest.raises(CheckpointError, match=r'PoolFormer v2'):
        detect_layout({'stem.conv.weight': torch.zeros(1),
                       'stem.norm.weight': torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r'r50\.pth: not a PoolFormer '
                       r'checkpoint .*conv1\.weight, bn1\.weight'):
        detect_layout({'conv1.weight': torch.zeros(1),
                       'bn1.weight': torch.zeros(1)}, 'r50.pth')
