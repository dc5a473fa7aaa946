"""Property-based tests (hypothesis): backbone output shapes for random input
sizes and architectures, checkpoint conversion round trips through every
published key layout, and checkpoints with random corruption.

Examples are derandomized (the same in every CI run) and few, to keep the
file at a few seconds.
"""
import copy
import functools
import io
import math
import os.path as osp
import re

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from poolformer_seg.models import PoolFormer
from poolformer_seg.utils.layouts import convert_backbone_state_dict
from tests.helpers.upstream import (official_cls_from_feat,
                                    official_from_ours, timm_features_only,
                                    timm_from_official)

MODEL_CONFIG = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                        'configs', '_base_', 'models', 'fpn_poolformer_s12.py')
FAST = settings(max_examples=25, deadline=None, derandomize=True,
                database=None)
FEW = settings(max_examples=8, deadline=None, derandomize=True,
               database=None)


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution: floor((n + 2p - k) / s) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


@st.composite
def stems(draw):
    kernel = draw(st.sampled_from([3, 5, 7]))
    return dict(stem_patch_size=kernel,
                stem_stride=draw(st.sampled_from([1, 2, 4])),
                stem_padding=draw(st.integers(0, kernel // 2)))


@pytest.mark.slow
@FAST
@given(stem=stems(), data=st.data(), batch=st.integers(1, 2),
       out_indices=st.sets(st.integers(0, 3), min_size=1))
def test_output_shapes_follow_conv_arithmetic(stem, data, batch,
                                              out_indices):
    arch = dict(layers=[1, 1, 1, 1], embed_dims=[4, 6, 8, 10], **stem)
    model = PoolFormer(arch=arch, out_indices=tuple(out_indices)).eval()
    lowest = model.min_input_size
    assert lowest == max(1, stem['stem_patch_size'] -
                         2 * stem['stem_padding'])
    height = data.draw(st.integers(lowest, 100), label='height')
    width = data.draw(st.integers(lowest, 100), label='width')
    with torch.no_grad():
        outs = model(torch.randn(batch, 3, height, width))
    h = conv_out(height, stem['stem_patch_size'], stem['stem_stride'],
                 stem['stem_padding'])
    w = conv_out(width, stem['stem_patch_size'], stem['stem_stride'],
                 stem['stem_padding'])
    expected = []
    for stage in range(4):
        if stage > 0:  # k3 s2 p1: ceil(n / 2)
            h, w = -(-h // 2), -(-w // 2)
        if stage in out_indices:
            expected.append((batch, arch['embed_dims'][stage], h, w))
    assert [tuple(o.shape) for o in outs] == expected
    assert all(torch.isfinite(o).all() for o in outs)


@FEW
@given(stem=stems(), size=st.integers(1, 6))
def test_inputs_below_the_minimum_are_refused(stem, size):
    model = PoolFormer(arch=dict(layers=[1, 1, 1, 1],
                                 embed_dims=[4, 4, 4, 4], **stem))
    if size >= model.min_input_size:
        model(torch.randn(1, 3, size, size))
        return
    try:
        model(torch.randn(1, 3, size, size))
    except ValueError as err:
        assert f'minimum {model.min_input_size} px' in str(err)
    else:
        raise AssertionError('no error for an input below the minimum')


# ----------------------------------------------------------------------------
# Conversion round trips: ours -> other layout (written independently from
# shared/reference/upstream.md section 7) -> convert_backbone_state_dict ->
# identical tensors under our names.


def hf_from_official(state_dict: dict, classifier: bool) -> dict:
    """sail-sg classifier names -> HF ``PoolFormerForImageClassification``
    (``classifier=True``) or ``PoolFormerModel`` names."""
    def rename(key):
        key = re.sub(r'^patch_embed\.proj\.',
                     'encoder.patch_embeddings.0.projection.', key)
        key = re.sub(r'^network\.(\d)\.proj\.',
                     lambda m: f'encoder.patch_embeddings.'
                     f'{(int(m[1]) + 1) // 2}.projection.', key)
        key = re.sub(r'^network\.(\d)\.(\d+)\.',
                     lambda m: f'encoder.block.{int(m[1]) // 2}.{m[2]}.', key)
        for old, new in (('norm1.', 'before_norm.'),
                         ('norm2.', 'after_norm.'),
                         ('mlp.fc1.', 'output.conv1.'),
                         ('mlp.fc2.', 'output.conv2.')):
            key = key.replace(old, new)
        return re.sub(r'^head\.', 'classifier.', key)

    out = {}
    for key, value in state_dict.items():
        key = rename(key)
        if key.startswith('encoder.'):
            out[('poolformer.' if classifier else '') + key] = value
        elif classifier:  # final norm and classifier
            out[key] = value
    return out


@st.composite
def archs(draw):
    return dict(
        layers=draw(st.lists(st.integers(1, 2), min_size=4, max_size=4)),
        embed_dims=draw(st.lists(st.sampled_from([4, 8, 12]), min_size=4,
                                 max_size=4)))


def _ours(arch, seed):
    """Our backbone state dict with distinct random values everywhere."""
    model = PoolFormer(arch=arch)
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen)
            for k, v in model.state_dict().items()}


def _layouts(ours):
    """case -> (state dict, the layout it is in, keys of ours it holds)."""
    feat = official_from_ours(ours)
    cls = official_cls_from_feat(feat)
    timm = timm_from_official(cls)
    all_keys = set(ours)
    no_norm = {k for k in ours if not k.startswith('norm')}
    with_norm3 = no_norm | {k for k in ours if k.startswith('norm3.')}
    segmentor = {'backbone.' + k: v for k, v in feat.items()}
    segmentor['decode_head.conv_seg.weight'] = torch.ones(3, 4, 1, 1)
    return {
        'official_feat': (feat, 'official_feat', all_keys),
        'mmpretrain_segmentor': (segmentor, 'mmpretrain', all_keys),
        'official_classifier': (cls, 'official', with_norm3),
        'timm': (timm, 'timm', with_norm3),
        'timm_features_only': (timm_features_only(timm), 'timm', no_norm),
        'hf_classifier': (hf_from_official(cls, True), 'hf', with_norm3),
        'hf_model': (hf_from_official(cls, False), 'hf', no_norm),
    }


@pytest.mark.slow
@FEW
@given(arch=archs(), seed=st.integers(0, 2**16))
def test_conversion_round_trips(arch, seed):
    ours = _ours(arch, seed)
    for name, (state_dict, layout, expected_keys) in _layouts(ours).items():
        converted, found, _ = convert_backbone_state_dict(state_dict)
        assert found == layout, name
        assert set(converted) == expected_keys, name
        for key in expected_keys:
            assert torch.equal(converted[key], ours[key]), (name, key)
        # and the result loads into the architecture it came from
        model = PoolFormer(arch=arch)
        missing, unexpected = model.load_state_dict(converted, strict=False)
        assert not unexpected and set(missing) == set(ours) - expected_keys


# ----------------------------------------------------------------------------
# Checkpoints with random corruption: none loads silently. Each either raises
# a CheckpointError (of poolformer_seg.utils.safe_load) or, for a harmless
# change, loads exactly the values the file holds.

CORRUPTIONS = ('truncate', 'flip_byte', 'dtype', 'missing_key', 'extra_key',
               'non_finite')
# must raise whatever the draw (flip_byte may hit bytes nobody reads, dtype
# may be a float width, keys may be num_batches_tracked or outside the
# backbone)
ALWAYS_REFUSED = ('truncate', 'non_finite')


@functools.lru_cache(maxsize=None)
def _tiny_segmentor_and_file():
    """A tiny segmentor (random weights) and the bytes of its checkpoint."""
    from mmengine.config import Config

    from tests.apis.tiny import TINY_MODEL
    from tests.helpers.upstream import build_segmentor
    cfg = Config(dict(model=Config.fromfile(MODEL_CONFIG).model))
    cfg.merge_from_dict(TINY_MODEL)
    cfg.model.backbone.init_cfg = None
    cfg.model.decode_head.norm_cfg = dict(type='BN', requires_grad=True)
    cfg.model.decode_head.num_classes = 5
    torch.manual_seed(0)
    model = build_segmentor(cfg.model)
    model.init_weights()
    buffer = io.BytesIO()
    torch.save({'meta': {}, 'state_dict': model.state_dict()}, buffer)
    return model, buffer.getvalue()


@st.composite
def corruptions(draw):
    kind = draw(st.sampled_from(CORRUPTIONS))
    model, data = _tiny_segmentor_and_file()
    keys = list(model.state_dict())
    if kind == 'truncate':
        return kind, draw(st.integers(0, len(data) - 1))
    if kind == 'flip_byte':
        return kind, (draw(st.integers(0, len(data) - 1)),
                      draw(st.integers(1, 255)))
    if kind == 'dtype':
        return kind, (draw(st.sampled_from(keys)), draw(st.sampled_from(
            [torch.float16, torch.bfloat16, torch.float64, torch.int64,
             torch.bool])))
    if kind == 'missing_key':
        return kind, draw(st.sampled_from(keys))
    if kind == 'extra_key':
        return kind, draw(st.sampled_from(
            ['auxiliary_head.conv_seg.weight', 'backbone.stages.0.blocks.9.'
             'norm1.weight', 'extra']))
    floats = [k for k in keys if model.state_dict()[k].is_floating_point()]
    return kind, (draw(st.sampled_from(floats)),
                  draw(st.sampled_from([math.nan, math.inf, -math.inf])))


def _corrupted_file(kind, arg, path) -> dict:
    """Write the corrupted checkpoint; return the state dict it holds (for
    the byte-level corruptions: the original one)."""
    model, data = _tiny_segmentor_and_file()
    state = dict(model.state_dict())
    if kind in ('truncate', 'flip_byte'):
        if kind == 'truncate':
            data = data[:arg]
        else:
            data = bytearray(data)
            data[arg[0]] ^= arg[1]
        with open(path, 'wb') as f:
            f.write(bytes(data))
        return state
    if kind == 'dtype':
        state[arg[0]] = state[arg[0]].to(arg[1])
    elif kind == 'missing_key':
        del state[arg]
    elif kind == 'extra_key':
        state[arg] = torch.ones(3)
    else:
        key, value = arg
        # flattened in memory order: fast-path weights are channels_last
        state[key] = state[key].clone(memory_format=torch.contiguous_format)
        state[key].view(-1)[0] = value
    torch.save({'meta': {}, 'state_dict': state}, path)
    return state


@FAST
@given(corruption=corruptions())
def test_corrupted_checkpoints_never_load_silently(corruption,
                                                   tmp_path_factory):
    from poolformer_seg.utils.loading import load_segmentor_checkpoint
    from poolformer_seg.utils.safe_load import CheckpointError
    kind, arg = corruption
    event(kind)
    path = str(tmp_path_factory.mktemp('corrupt') / 'ckpt.pth')
    held = _corrupted_file(kind, arg, path)
    template, _ = _tiny_segmentor_and_file()
    model = copy.deepcopy(template)
    for param in model.parameters():  # so that a skipped tensor shows
        param.data.fill_(0.5)
    try:
        load_segmentor_checkpoint(model, path)
    except CheckpointError:
        return
    assert kind not in ALWAYS_REFUSED, f'{kind} {arg} loaded'
    loaded = model.state_dict()
    for key, value in loaded.items():
        if key in held:
            assert torch.equal(value, held[key].to(value.dtype)), (kind, key)
        else:  # only a BN step counter may be absent from a checkpoint
            assert key.endswith('num_batches_tracked'), (kind, key)
