"""tools/convert_checkpoint.py (in-process; the segmentor round trip through a
subprocess is in tests/utils/test_checkpoint.py)."""
import re

import numpy as np
import pytest
import torch

from poolformer_seg import PoolFormer
from poolformer_seg.utils.safe_load import load
from tests.helpers import upstream

TINY = dict(layers=[1, 1, 2, 1], embed_dims=[8, 16, 24, 32])


@pytest.fixture(scope='module')
def tool(load_tool):
    return load_tool('convert_checkpoint.py')


@pytest.fixture(scope='module')
def ours():
    return upstream.randomize_(PoolFormer(arch=TINY), seed=11).state_dict()


@pytest.fixture(scope='module')
def official(ours):
    return upstream.official_cls_from_feat(upstream.official_from_ours(ours),
                                           num_classes=5)


def run(tool, capsys, *argv):
    tool.main([str(a) for a in argv])
    return capsys.readouterr().out


def assert_backbone(state_dict, ours, norms):
    expected = {k: v for k, v in ours.items()
                if not re.match(r'norm\d\.', k) or int(k[4]) in norms}
    assert state_dict.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state_dict[key], value), key


def test_official_classifier_to_ours(tool, capsys, tmp_path, ours, official):
    src, dst = tmp_path / 'poolformer_s12.pth.tar', tmp_path / 'ours.pth'
    torch.save(official, src)
    out = run(tool, capsys, src, dst)
    assert 'backbone checkpoint in the sail-sg classification layout ' \
        '(official)' in out
    assert 'dropped 2 tensors without a backbone counterpart: head.weight, ' \
        'head.bias' in out
    assert 'norm3 filled from' in out
    assert f'wrote {len(ours) - 6} tensors' in out
    converted = load(dst)
    assert converted['meta'] == {'poolformer_seg_converted_from': 'official'}
    assert_backbone(converted['state_dict'], ours, norms=[3])
    # and init_cfg takes the result as it is
    model = PoolFormer(arch=TINY, init_cfg=dict(type='Pretrained',
                                                checkpoint=str(dst)))
    model.init_weights()
    assert torch.equal(model.norm3.weight, ours['norm3.weight'])


def test_timm_to_safetensors(tool, capsys, tmp_path, ours, official):
    src, dst = tmp_path / 'timm.pth', tmp_path / 'ours.safetensors'
    torch.save(upstream.timm_from_official(official), src)
    out = run(tool, capsys, src, dst)
    assert '(timm)' in out and 'meta not written' in out
    assert_backbone(load(dst), ours, norms=[3])


def test_meta_is_kept_only_where_plain(tool, capsys, tmp_path, ours):
    mmpretrain = {f'backbone.{k}': v for k, v in
                  upstream.official_from_ours(ours).items()}
    src, dst = tmp_path / 'mmpretrain.pth', tmp_path / 'out.pth'
    torch.save({'meta': {'dataset_meta': {'classes': ('a', 'b')},
                         'epoch': 3, 'mean': np.zeros(3)},
                'state_dict': mmpretrain, 'optimizer': {'state': {}}}, src)
    out = run(tool, capsys, src, dst)
    assert '(mmpretrain)' in out
    assert 'dropped meta entries that are not plain data: mean' in out
    assert 'dropped training state: optimizer' in out
    converted = load(dst)
    assert converted['meta'] == {'dataset_meta': {'classes': ('a', 'b')},
                                 'epoch': 3,
                                 'poolformer_seg_converted_from':
                                 'mmpretrain'}
    assert_backbone(converted['state_dict'], ours, norms=[0, 1, 2, 3])


def test_our_segmentor_is_left_as_it_is(tool, capsys, tmp_path, ours):
    state = {**{f'backbone.{k}': v for k, v in ours.items()},
             'decode_head.conv_seg.weight': torch.ones(3, 4, 1, 1)}
    src, dst = tmp_path / 'seg.pth', tmp_path / 'seg_out.pth'
    torch.save({'state_dict': state}, src)
    out = run(tool, capsys, src, dst)
    assert 'already in poolformer_seg layout' in out
    converted = load(dst)['state_dict']
    assert converted.keys() == state.keys()


@pytest.mark.parametrize('case, match', [
    ('missing', r'error: checkpoint file not found: .*nothing\.pth'),
    ('unknown', r'error: .*resnet\.pth: not a PoolFormer checkpoint'),
    ('same', r'error: DST is SRC'),
    ('forced', r"error: .*layout 'timm' was requested, but the keys are in "
     r"the 'official' layout"),
    ('segmentor', r"error: .*no PoolFormer backbone keys under 'backbone\.'")])
def test_errors_are_clear_and_leave_nothing_behind(tool, tmp_path, official,
                                                   case, match):
    src, dst, extra = tmp_path / 'official.pth', tmp_path / 'out.pth', []
    torch.save(official, src)
    if case == 'missing':
        src = tmp_path / 'nothing.pth'
    elif case == 'unknown':
        src = tmp_path / 'resnet.pth'
        torch.save({'conv1.weight': torch.zeros(1)}, src)
    elif case == 'same':
        dst = src
    elif case == 'forced':
        extra = ['--layout', 'timm']
    elif case == 'segmentor':
        src = tmp_path / 'other_seg.pth'
        torch.save({'backbone.conv1.weight': torch.zeros(1),
                    'decode_head.conv_seg.weight': torch.zeros(1)}, src)
    before = set(tmp_path.iterdir())
    with pytest.raises(SystemExit, match=match):
        tool.main([str(src), str(dst), *extra])
    assert set(tmp_path.iterdir()) == before  # no DST, no temporary file
