"""The MetaFormer backbone: sizes, fidelity to timm 1.0, options, bad archs.

Reference: timm 1.0's ``timm/models/metaformer.py`` (the real library,
imported by :mod:`tests.helpers.timm_ref` behind a torchvision stand-in),
with random non-trivial weights in every parameter.
"""
import re

import pytest
import torch
# the documented __torch_dispatch__ extension point (sees backward ops too)
from torch.utils._python_dispatch import TorchDispatchMode

from poolformer_seg import MetaFormer
from poolformer_seg.models.backbones.metaformer import (ARCH_SETTINGS,
                                                       StarReLU)
from tests.helpers.timm_ref import (TIMM_FEATURE_PARAMS, float64_inputs,
                                    randomize_metaformer_, timm_model)

TOL = dict(atol=1e-5, rtol=1e-5)
# a multiple of 32, and a size that is not
SIZES = [(224, 224), (200, 250)]
TINY_HYBRID = dict(layers=[1, 1, 2, 1], embed_dims=[16, 32, 64, 96],
                   token_mixers=['pool', 'pool', 'attention', 'attention'])


def split_counts(model):
    """(stem + stages, output norms) parameter counts."""
    norms = sum(p.numel() for n, p in model.named_parameters()
                if re.match(r'norm\d\.', n))
    return sum(p.numel() for p in model.parameters()) - norms, norms


def assert_all_close(ours, refs):
    assert len(ours) == len(refs)
    for i, (a, b) in enumerate(zip(ours, refs)):
        assert a.shape == b.shape, f'stage {i}: {a.shape} vs {b.shape}'
        torch.testing.assert_close(a, b, **TOL,
                                   msg=lambda m: f'stage {i}: ' + m)


class RecordOps(TorchDispatchMode):
    """Records every operation below autograd (forward and backward) as
    ``(name, input numels, output numels)``."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func._schema.name,
                         numels([*args, *kwargs.values()]), numels(out)))
        return out


def numels(tree) -> list:
    """Sizes of the tensors in nested lists and tuples."""
    if isinstance(tree, torch.Tensor):
        return [tree.numel()]
    if isinstance(tree, (list, tuple)):
        return [n for item in tree for n in numels(item)]
    return []


# ----------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize('arch', sorted(TIMM_FEATURE_PARAMS))
def test_parameter_counts_equal_timm_features_only(arch):
    with torch.device('meta'):
        ours = MetaFormer(arch)
        timm = timm_model(arch, features_only=True)
    features, norms = split_counts(ours)
    assert features == TIMM_FEATURE_PARAMS[arch]
    assert sum(p.numel() for p in timm.parameters()) == features
    # one LayerNorm (weight and bias) per returned stage
    assert norms == 2 * sum(ARCH_SETTINGS[arch]['embed_dims'])


@pytest.mark.parametrize('size', ['s12', 's24', 's36', 'm36', 'm48'])
def test_identityformer_is_poolformerv2_without_mixing(size):
    """Pooling has no parameters: IdentityFormer has PoolFormerV2's."""
    with torch.device('meta'):
        identity = MetaFormer(f'identityformer_{size}')
    assert split_counts(identity)[0] == \
        TIMM_FEATURE_PARAMS[f'poolformerv2_{size}']
    assert not any('token_mixer' in n for n, _ in identity.named_parameters())


@pytest.mark.parametrize('size, expected', [
    ((224, 224), [(56, 56), (28, 28), (14, 14), (7, 7)]),
    ((375, 500), [(94, 125), (47, 63), (24, 32), (12, 16)]),
    ((3, 3), [(1, 1)] * 4)])
def test_output_shapes(size, expected):
    model = MetaFormer(arch=TINY_HYBRID).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert [tuple(o.shape[-2:]) for o in outs] == expected
    assert [o.shape[1] for o in outs] == TINY_HYBRID['embed_dims']


def test_out_indices_select_stages_and_norms():
    model = MetaFormer(arch=TINY_HYBRID, out_indices=(-1, 1)).eval()
    assert model.out_indices == (1, 3)
    assert model.out_channels == [32, 96]
    assert sorted(n for n, _ in model.named_children()
                  if re.fullmatch(r'norm\d', n)) == ['norm1', 'norm3']
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 8, 8), (2, 96, 2, 2)]


def test_output_norms_are_layernorms_over_channels():
    model = randomize_metaformer_(MetaFormer(arch=TINY_HYBRID), 4).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        raw = model.stage_features(x)
        outs = model(x)
    for i, (r, o) in enumerate(zip(raw, outs)):
        norm = getattr(model, f'norm{i}')
        ref = torch.nn.functional.layer_norm(
            r.permute(0, 2, 3, 1), (r.shape[1], ), norm.weight, norm.bias,
            1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(o, ref, **TOL)


# ----------------------------------------------------------------------------
# Fidelity to timm 1.0 (timm layout; the sail-sg layout is tested through
# the loader in tests/utils/test_metaformer_layouts.py)


@pytest.mark.slow
@pytest.mark.parametrize('arch', [
    'poolformerv2_s12', 'convformer_s18', 'caformer_s18'])
def test_timm_weights_give_timm_stage_features(arch):
    timm = randomize_metaformer_(timm_model(arch, features_only=True),
                                 seed=1).eval()
    ours = MetaFormer(arch).eval()
    state = {k.replace('stages_', 'stages.', 1): v
             for k, v in timm.state_dict().items()}
    result = ours.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(
        f'norm{i}.{p}' for i in range(4) for p in ('weight', 'bias'))
    for x in float64_inputs(ours, timm, SIZES, batch=2):
        with torch.no_grad():
            assert_all_close(ours.stage_features(x), timm(x))


@pytest.mark.parametrize('arch', ['poolformerv2_s12', 'convformer_s18',
                                  'caformer_s18', TINY_HYBRID])
def test_fast_impl_is_the_plain_function_in_channels_last(arch):
    """``impl='fast'`` (the default) holds the same weights and keys in
    channels_last and gives the plain NCHW backbone's features: every
    family, and a hybrid whose attention stages flatten channels_last maps
    to tokens."""
    torch.manual_seed(0)
    fast = MetaFormer(arch).eval()
    plain = MetaFormer(arch, impl='plain').eval()
    plain.load_state_dict(fast.state_dict())
    assert fast.impl == 'fast' and plain.impl == 'plain'
    conv = fast.stem.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not conv.is_contiguous()
    assert plain.stem.conv.weight.is_contiguous()
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        got, want = fast(x), plain(x)
    for g, w in zip(got, want):
        assert g.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert fast.set_impl('plain') is fast
    assert fast.stem.conv.weight.is_contiguous()


# every mixer, both norms, layer scales and res-scales in every stage
EVERY_MIXER = dict(layers=[1, 2, 1, 2], embed_dims=[16, 24, 32, 40],
                   token_mixers=['pool', 'sepconv', 'identity', 'attention'],
                   norms=['gn', 'ln', 'gn', 'ln'], layer_scale_init_values=1.,
                   res_scale_init_values=1.)


def fast_and_plain(arch, **kwargs):
    """The fast backbone with random non-trivial weights, and the plain one
    with the same weights, both in float64."""
    fast = randomize_metaformer_(MetaFormer(arch, **kwargs), seed=3)
    plain = MetaFormer(arch, impl='plain', **kwargs)
    plain.load_state_dict(fast.state_dict())
    return fast.double(), plain.double()


@pytest.mark.parametrize('grad_mode', ['no_grad', 'inference_mode'])
def test_inference_form_is_the_formulas_function_in_float64(grad_mode):
    """Without autograd the fast blocks compute in place and fold StarReLU's
    scalars into the MLP's fc2: the same stage features as the formulas
    (the plain backbone), to float64 rounding, at a size that is not a
    multiple of 32; the input is left as it was."""
    fast, plain = fast_and_plain(EVERY_MIXER)
    x = torch.randn(2, 3, 75, 101, dtype=torch.float64)
    before = x.clone()
    with getattr(torch, grad_mode)():
        got = fast.eval().stage_features(x)
        want = plain.eval().stage_features(x)
    assert torch.equal(x, before)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_inference_form_draws_drop_path_as_the_formulas_do():
    """In training mode without autograd, drop-path draws the same masks
    from the same generator in both forms."""
    fast, plain = fast_and_plain(EVERY_MIXER, drop_path_rate=.5)
    x = torch.randn(4, 3, 40, 40, dtype=torch.float64)
    outputs = []
    for model in (fast, plain):
        torch.manual_seed(7)
        with torch.no_grad():
            outputs.append(model.train().stage_features(x))
    for g, w in zip(*outputs):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('grad', [False, True])
def test_fast_forms_keep_dtypes_under_autocast(grad):
    """bf16 autocast, without autograd (the in-place form) and with it (the
    folded MLP): the formulas' dtypes, values within bf16 rounding, and
    gradients of the input's dtype."""
    fast, plain = fast_and_plain(EVERY_MIXER)
    fast.float().eval(), plain.float().eval()
    x = torch.randn(1, 3, 64, 48)
    outputs = []
    for model in (fast, plain):
        inputs = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad), \
                torch.autocast('cpu', torch.bfloat16):
            features = model.stage_features(inputs)
        if grad:
            sum(f.float().sum() for f in features).backward()
            assert inputs.grad.dtype == torch.float32
            assert model.stages[0].blocks[0].mlp.act.scale.grad.isfinite()
        outputs.append(features)
    for g, w in zip(*outputs):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=.05,
                                   atol=.05 * w.abs().max().item())


def test_inference_form_allocates_one_hidden_map_per_expansion():
    """Without autograd a fast ConvFormer block allocates one hidden-sized
    (expanded) map in the separable convolution's StarReLU and MLP: the
    first convolution's output, which StarReLU then overwrites; 3 in all
    with the depthwise convolution's output. The formulas (the plain
    block) allocate 7: ``relu`` and its square besides."""
    # mlp_ratio 2: the MLP's hidden map is the separable convolution's size
    arch = dict(layers=[1] * 4, embed_dims=[8] * 4,
                token_mixers=['sepconv'] * 4, mlp_ratios=[2] * 4)
    x = torch.randn(1, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    for impl, want in [('fast', 3), ('plain', 7)]:
        block = MetaFormer(arch, impl=impl).eval().stages[0].blocks[0]
        with torch.no_grad(), RecordOps() as ops:
            block(x)
        count = sum(not name.endswith('_') and 2 * x.numel() in outputs
                    for name, _, outputs in ops.ops)
        assert count == want, (impl, count)


def test_fast_training_gradients_are_the_formulas_in_float64():
    """With autograd the fast blocks fold the MLP's StarReLU scalars into
    ``fc2``: the loss, the input's gradient and every parameter's (the
    scalars' included) equal the formulas', for conv and token MLPs."""
    fast, plain = fast_and_plain(EVERY_MIXER)
    x = torch.randn(2, 3, 75, 101, dtype=torch.float64)
    results = []
    for model in (fast, plain):
        inputs = x.clone().requires_grad_()
        features = model.train().stage_features(inputs)
        weights = torch.Generator().manual_seed(0)
        loss = sum((f * torch.randn(f.shape, generator=weights,
                                    dtype=f.dtype)).sum() for f in features)
        loss.backward()
        results.append([loss, inputs.grad] + [
            p.grad for n, p in model.named_parameters()
            if not n.startswith('norm')])
    assert fast.stages[1].blocks[0].mlp.act.scale.grad.abs() > 0
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_fast_mlp_makes_fewer_passes_over_the_hidden_map_in_training():
    """Forward and backward of a block's MLP: the formulas touch the
    expanded hidden map in 13 operations (StarReLU's scale and bias, and
    their gradients, each a pass); with the scalars folded into ``fc2``, 8:
    fc1, relu, square, fc2, their backward."""
    arch = dict(layers=[1] * 4, embed_dims=[8] * 4,
                token_mixers=['pool'] * 4)  # mlp_ratio 4
    x = torch.randn(1, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    for impl, want in [('fast', 8), ('plain', 13)]:
        block = MetaFormer(arch, impl=impl).train().stages[0].blocks[0]
        with RecordOps() as ops:
            block(x.clone().requires_grad_()).sum().backward()
        count = sum(4 * x.numel() in inputs + outputs
                    for _, inputs, outputs in ops.ops)
        assert count == want, (impl, count)


@pytest.mark.parametrize('mixer, timm_mixer, norm, timm_norm', [
    ('identity', 'Identity', 'gn', 'GroupNorm1NoBias'),
    ('attention', 'Attention', 'ln', 'LayerNorm2dNoBias'),
    ('pool', 'Pooling', 'ln', 'LayerNorm2dNoBias')])
def test_custom_archs_match_timm_metaformer_class(mixer, timm_mixer, norm,
                                                  timm_norm):
    """Mixer/norm pairs of no published model, and layer scales, against
    timm's ``MetaFormer`` class built with the same settings."""
    from tests.helpers.timm_ref import timm_metaformer
    module = timm_metaformer()
    mixers = {'Identity': torch.nn.Identity}
    timm_norms = getattr(module, timm_norm)
    token_norm = module.LayerNormNoBias if norm == 'ln' else timm_norms
    layers, dims = [1, 2, 1, 1], [32, 64, 96, 128]
    timm = module.MetaFormer(
        depths=layers, dims=dims,
        token_mixers=mixers.get(timm_mixer) or getattr(module, timm_mixer),
        norm_layers=token_norm if mixer == 'attention' else timm_norms,
        layer_scale_init_values=1e-5, res_scale_init_values=[None, 1.] * 2,
        num_classes=0)
    randomize_metaformer_(timm, seed=2).eval()
    ours = MetaFormer(dict(
        layers=layers, embed_dims=dims, token_mixers=[mixer] * 4,
        norms=[norm] * 4, layer_scale_init_values=1e-5,
        res_scale_init_values=[None, 1., None, 1.])).eval()
    state = {k: v for k, v in timm.state_dict().items()
             if not k.startswith('head.')}
    result = ours.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith('norm') for k in result.missing_keys)
    for x in float64_inputs(ours, timm, SIZES):
        with torch.no_grad():
            _, refs = timm.forward_intermediates(x)
            assert_all_close(ours.stage_features(x), refs)


def test_groupnorm_on_tokens_equals_groupnorm_on_the_map():
    """'gn' in an attention stage (no published model has it; timm's
    GroupNorm1 would treat the tokens as channels there)."""
    from poolformer_seg.models.backbones.metaformer import BlockNorm
    on_tokens = BlockNorm(24, 'gn', tokens=True)
    on_map = BlockNorm(24, 'gn', tokens=False)
    with torch.no_grad():
        on_tokens.weight.uniform_(.5, 1.5)
        on_map.weight.copy_(on_tokens.weight)
    x = torch.randn(2, 24, 5, 7)
    tokens = on_tokens(x.flatten(2).transpose(1, 2))
    torch.testing.assert_close(tokens.transpose(1, 2).reshape(x.shape),
                               on_map(x), **TOL)
    torch.testing.assert_close(
        on_map(x), torch.nn.functional.group_norm(x, 1, on_map.weight,
                                                  eps=1e-6), **TOL)


# ----------------------------------------------------------------------------
# Attention at any size


def test_attention_stage_runs_at_ade20k_whole_image_aspect():
    """512 x 2048 (ADE20K's whole-image test) at a quarter of the scale:
    the attention stages see 8 x 32 and 4 x 16 tokens, not a fixed count."""
    model = MetaFormer(arch=TINY_HYBRID).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 128, 512))
    assert [tuple(o.shape[-2:]) for o in outs] == [
        (32, 128), (16, 64), (8, 32), (4, 16)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_attention_equals_explicit_softmax_attention():
    from poolformer_seg.models.backbones.metaformer import Attention
    attn = randomize_metaformer_(Attention(64), seed=5)
    x = torch.randn(2, 37, 64)
    qkv = attn.qkv(x).view(2, 37, 3, 2, 32).permute(2, 0, 3, 1, 4)
    weights = (qkv[0] @ qkv[1].transpose(-1, -2) / 32 ** .5).softmax(-1)
    ref = attn.proj((weights @ qkv[2]).transpose(1, 2).reshape(2, 37, 64))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref.detach(), **TOL)


# ----------------------------------------------------------------------------
# A hybrid in a segmentor


@pytest.mark.slow
def test_hybrid_arch_trains_in_a_segmentor_and_every_stage_learns():
    """Pooling in the high-resolution stages, attention in the last two,
    under mmseg's FPN + FPNHead: a few AdamW steps on one batch lower the
    loss, and every backbone parameter gets a non-zero gradient."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.optim import build_optim_wrapper
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    from tests.helpers.upstream import build_segmentor
    dims = TINY_HYBRID['embed_dims']
    torch.manual_seed(0)  # the initial weights: the same run every time
    model = revert_sync_batchnorm(build_segmentor(dict(
        type='EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', mean=[128.] * 3,
                               std=[64.] * 3, size=(64, 64)),
        backbone=dict(type='MetaFormer', arch=TINY_HYBRID),
        neck=dict(type='FPN', in_channels=dims, out_channels=16,
                  num_outs=4),
        decode_head=dict(type='FPNHead', in_channels=[16] * 4,
                         in_index=[0, 1, 2, 3], feature_strides=[4, 8, 16, 32],
                         channels=8, num_classes=5,
                         norm_cfg=dict(type='SyncBN'),
                         loss_decode=dict(type='CrossEntropyLoss')),
        train_cfg=dict(), test_cfg=dict(mode='whole')))).train()
    optim = build_optim_wrapper(model, dict(
        type='OptimWrapper', optimizer=dict(type='AdamW', lr=2e-3)))
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(2):
        sample = SegDataSample()
        # a label that depends on the image, so that there is something
        # to learn
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, 64, 64),
                                                         generator=gen))
        sample.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64)))
        samples.append(sample)
    inputs = [(s.gt_sem_seg.data.expand(3, -1, -1) * 50).to(torch.uint8)
              for s in samples]
    torch.manual_seed(0)
    losses = []
    for step in range(6):
        data = model.data_preprocessor(dict(inputs=inputs,
                                            data_samples=samples), True)
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        optim.zero_grad()
        loss.backward()
        if step == 0:
            no_grad = [n for n, p in model.backbone.named_parameters()
                       if p.grad is None or not p.grad.abs().sum() > 0]
            assert not no_grad, no_grad
        optim.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------
# Options


def test_frozen_stages_freeze_stem_stages_and_their_norms():
    model = MetaFormer(arch=TINY_HYBRID, frozen_stages=2)
    model.train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith(('stem.', 'stages.0.', 'stages.1.',
                                       'norm0.', 'norm1.'))}
    assert not model.stages[1].training and model.stages[2].training
    assert MetaFormer(arch=TINY_HYBRID, frozen_stages=-1).stem.conv.weight \
        .requires_grad


def test_drop_path_rises_linearly_to_the_last_block():
    model = MetaFormer(arch=TINY_HYBRID, drop_path_rate=.3)
    rates = [float(getattr(block.drop_path, 'drop_prob', 0.))
             for stage in model.stages for block in stage.blocks]
    assert rates == pytest.approx([0, .075, .15, .225, .3])


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = randomize_metaformer_(MetaFormer(arch=TINY_HYBRID), 6).train()
    ckpt = randomize_metaformer_(MetaFormer(arch=TINY_HYBRID, with_cp=True),
                                 6).train()
    x = torch.randn(2, 3, 64, 64)
    for model in (plain, ckpt):
        sum(o.square().mean() for o in model(x)).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(),
                                 ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


# ----------------------------------------------------------------------------
# Training computation: StarReLU's autograd function, gradient formats


def star_relu_formula(x, scale, bias):
    """The published definition, differentiated by autograd."""
    return scale * torch.relu(x) ** 2 + bias


def values_and_gradients(fn, x, scale, bias, grad):
    """``fn(x, scale, bias)`` and the gradients of its three inputs."""
    x, scale, bias = (t.detach().clone().requires_grad_()
                      for t in (x, scale, bias))
    y = fn(x, scale, bias)
    y.backward(grad)
    return y, x.grad, scale.grad, bias.grad


def star_relu_module(x, scale, bias):
    """Our module, its two parameters replaced by the given tensors."""
    act = StarReLU()
    del act.scale, act.bias
    act.scale, act.bias = scale, bias
    return act(x)


@pytest.mark.parametrize('shape', [(2, 8, 5, 7), (2, 35, 16)])
def test_star_relu_equals_its_formula_in_values_and_gradients(shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    x[0, 0] = 0.  # the kink: both give 0 there
    scale = torch.tensor([.7], dtype=torch.float64)
    bias = torch.tensor([-.2], dtype=torch.float64)
    grad = torch.randn(shape, dtype=torch.float64)
    ours = values_and_gradients(star_relu_module, x, scale, bias, grad)
    want = values_and_gradients(star_relu_formula, x, scale, bias, grad)
    for name, a, b in zip(['y', 'x.grad', 'scale.grad', 'bias.grad'], ours,
                          want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_star_relu_keeps_the_formulas_dtype_under_autocast():
    """Under autocast the formula promotes the bf16 input with the fp32
    scalars: fp32 out; a bf16 gradient comes back for the bf16 input."""
    act = StarReLU()
    x = torch.randn(2, 4, 3, 3).bfloat16().requires_grad_()
    want = star_relu_formula(x.detach(), act.scale.detach(),
                             act.bias.detach())
    with torch.autocast('cpu', torch.bfloat16):
        y = act(x)
    assert y.dtype == want.dtype == torch.float32
    torch.testing.assert_close(y, want)
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), 2 * torch.relu(x.float()),
                               rtol=1e-2, atol=1e-2)


def test_star_relu_keeps_one_activation_for_backward():
    """The formula's autograd keeps ``relu(x)`` and ``relu(x) ** 2``; ours
    keeps ``relu(x)`` only."""
    x = torch.randn(2, 8, 6, 6, requires_grad=True)

    def activations_kept(fn):
        kept = []

        def pack(t):
            if t.numel() == x.numel():
                kept.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        return len({t.data_ptr() for t in kept})

    act = StarReLU()
    assert activations_kept(act) == 1
    assert activations_kept(
        lambda x: star_relu_formula(x, act.scale, act.bias)) == 2


def test_losses_on_stage_features_send_channels_last_gradients():
    """A loss on the raw features (here ``mean()``, whose gradient is an
    expanded tensor) reaches every convolution of the fast backbone in
    channels_last, so that none of them converts it; the gradients are the
    plain backbone's."""
    torch.manual_seed(0)
    fast = MetaFormer(arch=TINY_HYBRID).train()
    plain = MetaFormer(arch=TINY_HYBRID, impl='plain').train()
    plain.load_state_dict(fast.state_dict())
    formats = []
    for module in fast.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_full_backward_hook(
                lambda m, gin, gout: formats.append(gout[0].is_contiguous(
                    memory_format=torch.channels_last)))
    x = torch.randn(2, 3, 64, 96, requires_grad=True)
    for model in (fast, plain):
        sum(f.mean() for f in model.stage_features(x)).backward()
    assert formats and all(formats), formats
    for (name, a), (_, b) in zip(fast.named_parameters(),
                                 plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6,
                                   msg=name)


@pytest.mark.parametrize('training', [False, True])
def test_dynamo_traces_every_mixer_in_one_graph(training):
    """``torch.compile`` sees the whole backbone as one graph (a break, as
    one from a StarReLU helper would, splits what inductor can fuse), in
    inference and in training with its gradient hooks; dynamo's own
    ``eager`` backend keeps this test fast."""
    arch = dict(layers=[1, 1, 1, 1], embed_dims=[16, 32, 64, 96],
                token_mixers=['pool', 'sepconv', 'attention', 'identity'])
    model = MetaFormer(arch).train(training)
    traced = torch.compile(model.stage_features, fullgraph=True,
                           backend='eager')
    x = torch.randn(1, 3, 64, 64)
    with torch.set_grad_enabled(training):
        features = traced(x)
    want = model.stage_features(x)
    for got, ref in zip(features, want):
        torch.testing.assert_close(got, ref)
    if training:
        sum(f.mean() for f in features).backward()
        assert model.stages[1].blocks[0].mlp.act.scale.grad is not None


@pytest.mark.parametrize('arch', ['poolformerv2_s12', 'convformer_s18',
                                  'caformer_s18'])
def test_training_gradients_equal_timms(arch):
    """Every parameter's gradient, in float64, at a size that is not a
    multiple of 32: timm's model against ours with its weights."""
    timm = randomize_metaformer_(timm_model(arch, features_only=True),
                                 seed=2).train()
    ours = MetaFormer(arch).train()
    ours.load_state_dict({k.replace('stages_', 'stages.', 1): v
                          for k, v in timm.state_dict().items()},
                         strict=False)
    x = next(float64_inputs(ours, timm, [(72, 100)]))
    sum(f.square().mean() for f in ours.stage_features(x)).backward()
    sum(f.square().mean() for f in timm(x)).backward()
    theirs = {k.replace('stages_', 'stages.', 1): p.grad
              for k, p in timm.named_parameters()}
    for name, p in ours.named_parameters():
        if name in theirs:
            torch.testing.assert_close(p.grad, theirs[name], rtol=1e-9,
                                       atol=1e-12, msg=name)
    assert len(theirs) == sum(1 for n, _ in ours.named_parameters()
                              if not n.startswith('norm'))


# ----------------------------------------------------------------------------
# Bad archs and inputs


@pytest.mark.parametrize('arch, match', [
    ('caformer_s19', r"arch='caformer_s19' is not a MetaFormer variant "
                     r"\(did you mean 'caformer_s18'\?\)"),
    (dict(TINY_HYBRID, token_mixers=['pool', 'pool', 'atention', 'pool']),
     r"arch\['token_mixers'\] has unknown entry 'atention' \(did you mean "
     r"'attention'\?\)"),
    (dict(TINY_HYBRID, token_mixers=['pool'] * 3),
     r"arch\['token_mixers'\] must list 4 entries"),
    (dict(TINY_HYBRID, norms=['ln', 'ln', 'bn', 'ln']),
     r"arch\['norms'\] has unknown entry 'bn'"),
    (dict(TINY_HYBRID, layers=[1, 0, 1, 1]),
     r"arch\['layers'\] entries must be positive integers"),
    (dict(TINY_HYBRID, embed_dims=[16, 32.5, 64, 96]),
     r"arch\['embed_dims'\] entries must be positive integers"),
    (dict(TINY_HYBRID, res_scale_init_values=['one'] * 4),
     r"arch\['res_scale_init_values'\] entries must be numbers or None"),
    (dict(TINY_HYBRID, mixers=['pool'] * 4),
     r"unknown keys \['mixers'\] \(did you mean 'token_mixers' for "
     r"'mixers'\?\)"),
    (dict(layers=[1] * 4, embed_dims=[8] * 4),
     r"missing \['token_mixers'\]"),
    (['pool'] * 4, r'arch must be a str or dict')])
def test_bad_archs_raise_naming_the_key(arch, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MetaFormer(arch=arch)


@pytest.mark.parametrize('kwargs, match', [
    (dict(out_indices=(0, 4)), r'out_indices entry 4 is out of range'),
    (dict(out_indices=(1, -3)), r'names a stage twice'),
    (dict(frozen_stages=5), r'frozen_stages must be an int in \[-1, 4\]'),
    (dict(drop_path_rate=1.), r'drop_path_rate must be in \[0, 1\)'),
    (dict(impl='fused'), r"impl='fused' is not an implementation of "
                         r"MetaFormer; choose one of \['fast', 'plain'\]")])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetaFormer(arch=TINY_HYBRID, **kwargs)


@pytest.mark.parametrize('bad, match', [
    (torch.randn(3, 64, 64), r'B x C x H x W'),
    (torch.randn(1, 1, 64, 64), r'in_channels=3 .* 1 channels'),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), r'float tensor'),
    (torch.randn(1, 3, 2, 64), r'smaller than the minimum 3 px')])
def test_unsupported_inputs_raise_naming_the_problem(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MetaFormer(arch=TINY_HYBRID)(bad)
