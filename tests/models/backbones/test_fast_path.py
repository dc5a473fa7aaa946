"""PoolFormer's fast path (``impl='fast'``, the default) computes the plain
path's function (``impl='plain'``).

The fused block (:mod:`poolformer_seg.models.backbones.fast_ops`, with a
custom backward) and the channels_last layout are compared with the plain
NCHW eager backbone on the same weights: outputs and every gradient, in
float64 where the comparison is about the math and in float32 at the
1e-5 level otherwise; bf16 autocast against fp32.
"""
import copy

import pytest
import torch

from poolformer_seg import PoolFormer
from poolformer_seg.models.backbones.fast_ops import _Block
from poolformer_seg.models.backbones.poolformer import PoolFormerBlock
from tests.helpers.upstream import randomize_

TINY = dict(layers=[2, 1, 2, 1], embed_dims=[16, 32, 48, 64])
GN1 = dict(type='GN', num_groups=1)


def make_block(channels=6, drop_path=0., dtype=torch.float64, seed=0):
    block = PoolFormerBlock(channels, 4, 3, GN1, .5, drop_path).to(dtype)
    return randomize_(block, seed)


def make_pair(seed=0, **kwargs):
    """Plain backbone and one with ``kwargs`` (default: the fast one), same
    random weights."""
    plain = randomize_(PoolFormer(TINY, init_cfg=None, impl='plain'), seed)
    fast = PoolFormer(TINY, init_cfg=None, **kwargs)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def image(batch=2, size=(45, 61), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=gen, dtype=dtype)


def outputs_and_grads(model, x, seed=0):
    """Outputs, and gradients of a fixed random projection of them."""
    x = x.clone().requires_grad_()
    outs = model(x)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
               for o in outs)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads['input'] = x.grad
    return [o.detach() for o in outs], grads


def assert_same(a, b, atol, grad_rtol):
    """Outputs within ``atol``; each gradient within ``grad_rtol`` of its
    norm (gradients sum over every pixel, so float32 summation order alone
    moves single small entries by more than an elementwise tolerance)."""
    outs_a, grads_a = a
    outs_b, grads_b = b
    for i, (u, v) in enumerate(zip(outs_a, outs_b)):
        torch.testing.assert_close(u, v, atol=atol, rtol=0,
                                   msg=lambda m: f'out {i}: {m}')
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        if grads_b[name] is None:  # unused: stages after out_indices
            assert grads_a[name] is None, name
            continue
        assert grads_a[name] is not None, f'{name} got no gradient'
        err = (grads_a[name] - grads_b[name]).norm()
        scale = grads_b[name].norm()
        if name.endswith('norm1.bias'):
            # zero in exact arithmetic: 0 vs float rounding noise
            scale = max(grads_b[name].norm(), grads_b['input'].norm())
        assert err <= grad_rtol * scale, f'grad {name}: {err} vs {scale}'


# ----------------------------------------------------------------------------
# The fused block: exact in float64, custom backward checked numerically


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('drop_path', [0., .4])
@pytest.mark.parametrize('nchw_pool_backward', [False, True])
def test_fused_block_equals_plain_block_float64(monkeypatch, channels_last,
                                                drop_path,
                                                nchw_pool_backward):
    """Also with the pooling's gradient taken in NCHW, as on CUDA before
    torch 2.14 (compat.pool_excluding_padding_backward)."""
    from poolformer_seg import compat
    monkeypatch.setattr(compat, '_pool_backward_needs_nchw',
                        lambda x: nchw_pool_backward)
    block = make_block(drop_path=drop_path).train()
    x = torch.randn(3, 6, 5, 7, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    results = []
    for fused in (False, True):
        block.fused = fused
        torch.manual_seed(1)  # drop-path draws: the same random stream
        xi = x.clone().requires_grad_()
        out = block(xi)
        grads = torch.autograd.grad(
            out, [xi] + list(block.parameters()),
            torch.linspace(-1, 1, out.numel(), dtype=out.dtype)
            .view_as(out))
        results.append((out, grads))
    (out_p, grads_p), (out_f, grads_f) = results
    if drop_path:  # the draw really dropped a branch for some sample
        assert not torch.equal(out_p, block.eval()(x))
    torch.testing.assert_close(out_f, out_p, atol=1e-12, rtol=1e-12)
    names = ['x'] + [n for n, _ in block.named_parameters()]
    for name, gp, gf in zip(names, grads_p, grads_f):
        torch.testing.assert_close(gf, gp, atol=1e-12, rtol=1e-12,
                                   msg=lambda m: f'{name}: {m}')


@pytest.mark.slow
def test_fused_block_backward_passes_gradcheck():
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64,
                           requires_grad=True)
    x = rand(2, 5, 4, 6).detach().contiguous(
        memory_format=torch.channels_last).requires_grad_()
    # x, coef, beta1, g2, beta2, w1, b1, w2, b2, ls2
    inputs = (x, rand(2, 5), rand(5), rand(5), rand(5), rand(20, 5),
              rand(20), rand(5, 20), rand(5), rand(5))
    keep = torch.tensor([0., 2.], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *a: _Block.apply(*a, keep, 3, 1e-5, 1e-5), inputs)


def test_fused_block_keeps_only_its_input_for_backward():
    """The memory-lean backward: about one activation saved, not 14."""
    x = torch.randn(2, 16, 48, 48, requires_grad=True)

    def saved_bytes(fused):
        block = make_block(16, dtype=torch.float32)
        block.fused = fused
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = \
                t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x)
        return sum(storages.values())
    activation = x.numel() * x.element_size()
    plain, fused = saved_bytes(False), saved_bytes(True)
    assert plain >= 13 * activation
    assert fused < 1.2 * activation


def test_fused_block_backward_makes_two_hidden_sized_tensors():
    """The MLP's 4x wide rows are the largest tensors of a training step:
    the backward makes two (the recomputed GELU input, and its gradient),
    writing the GELU and the GELU's gradient in place."""
    from torch.utils._python_dispatch import TorchDispatchMode
    x = torch.randn(2, 16, 12, 10, requires_grad=True)
    hidden = 2 * 4 * 16 * 12 * 10
    block = make_block(16, dtype=torch.float32)
    block.fused = True
    out = block(x)

    class CountHidden(TorchDispatchMode):
        made = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in
                      [*args, *(kwargs or {}).values()]
                      if isinstance(a, torch.Tensor)}
            for r in result if isinstance(result, tuple) else (result, ):
                if isinstance(r, torch.Tensor) and r.numel() == hidden and \
                        r.untyped_storage().data_ptr() not in inputs:
                    CountHidden.made += 1
            return result

    with CountHidden():
        out.sum().backward()
    assert CountHidden.made == 2
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_fused_norm1_bias_gets_an_explicit_zero_gradient():
    """It cannot change the output, but must take part (DDP)."""
    block = make_block().train()
    block.fused = True
    block(torch.randn(2, 6, 5, 5, dtype=torch.float64)).sum().backward()
    assert block.norm1.bias.grad is not None
    assert torch.count_nonzero(block.norm1.bias.grad) == 0


# ----------------------------------------------------------------------------
# Whole backbone, float32


@pytest.mark.slow
def test_fast_backbone_equals_plain_fp32():
    plain, fast = make_pair()
    x = image()
    plain.train(), fast.train()
    assert_same(outputs_and_grads(fast, x), outputs_and_grads(plain, x),
                atol=1e-5, grad_rtol=1e-5)
    plain.eval(), fast.eval()
    with torch.no_grad():
        for a, b in zip(fast(x), plain(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_fused_with_drop_path_and_frozen_stages_equals_plain():
    options = dict(drop_path_rate=.3, frozen_stages=2)
    plain = randomize_(PoolFormer(TINY, init_cfg=None, impl='plain',
                                  **options), 0)
    fast = PoolFormer(TINY, init_cfg=None, **options)
    fast.load_state_dict(plain.state_dict())
    x = image()
    results = []
    for model in (plain, fast):
        torch.manual_seed(3)  # the same drop-path draws
        results.append(outputs_and_grads(model.train(), x))
    for _, grads in results:
        frozen = sorted(n for n, g in grads.items() if g is None)
        assert frozen == sorted(
            n for n, _ in plain.named_parameters()
            if n.startswith(('stem.', 'stages.0.', 'stages.1.', 'norm0.',
                             'norm1.')))
        for name in frozen:
            grads.pop(name)
    assert_same(results[1], results[0], atol=1e-5, grad_rtol=1e-5)


def test_channels_last_layouts():
    """channels_last inside and out, in eval, training and autocast."""
    _, fast = make_pair()
    assert fast.stem.proj.weight.is_contiguous(
        memory_format=torch.channels_last)
    seen = []
    fast.stages[1].register_forward_hook(lambda m, i, o: seen.append(o))

    def channels_last(tensors):
        return all(t.is_contiguous(memory_format=torch.channels_last)
                   and not t.is_contiguous() for t in tensors)

    with torch.no_grad():
        assert channels_last(fast.eval()(image()))  # NCHW input converted
        assert channels_last(fast.train()(image()))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert channels_last(fast(image()))
    assert channels_last(seen)


def test_fast_needs_groupnorm1_and_names_impl_and_norm_cfg():
    for norm_cfg in (dict(type='BN'), dict(type='GN', num_groups=2),
                     dict(type='GN', num_groups=1, affine=False)):
        with pytest.raises(ValueError, match='GroupNorm') as err:
            PoolFormer(TINY, impl='fast', norm_cfg=norm_cfg)
        assert "impl='fast'" in str(err.value)
        assert 'norm_cfg=' in str(err.value) and repr(norm_cfg) in \
            str(err.value)
        assert "set impl='plain'" in str(err.value)
        # the plain implementation takes any norm
        plain = PoolFormer(TINY, impl='plain', norm_cfg=norm_cfg)
        assert not plain.stages[0].blocks[0].fused


@pytest.mark.parametrize('impl', ['fused', 'Fast', None, True])
def test_unknown_impl_is_refused_naming_impl_and_the_choices(impl):
    with pytest.raises(ValueError, match=r"impl=.* choose one of "
                                         r"\['fast', 'plain'\]"):
        PoolFormer(TINY, impl=impl)


def test_bare_backbone_is_fast_and_set_impl_switches_it():
    """A backbone built as other MM configs build it (UPerNet, MMDet,
    MMPretrain style: no extra keys) runs the fast path; set_impl('plain')
    gives the plain one, the same function."""
    from mmseg.registry import MODELS
    bare = MODELS.build(dict(type='PoolFormer', arch='s12'))
    assert bare.impl == 'fast'
    blocks = [b for stage in bare.stages for b in stage.blocks]
    assert len(blocks) == 12 and all(b.fused for b in blocks)
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in bare.parameters() if p.dim() == 4)
    plain, fast = make_pair()
    x = image(batch=1)
    with torch.no_grad():
        want = plain.eval()(x)
        assert fast.set_impl('plain') is fast
        assert not any(b.fused for stage in fast.stages
                       for b in stage.blocks)
        assert all(p.is_contiguous() for p in fast.parameters())
        got = fast.eval()(x)
        assert all(g.is_contiguous() for g in got)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=0, rtol=0)
        fast.set_impl('fast')
        assert fast.stages[0].blocks[0].fused
        for g, w in zip(fast(x), want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_hand_written_backward_runs_on_the_cpu_only(monkeypatch):
    """A fused block that needs gradients runs the hand-written backward on
    the CPU (and ``meta``) only: on a CUDA device its fp32 token-mixer
    gradients disagreed with autograd's (tests/test_cuda.py), so there it
    runs the formulas; without autograd it stays fused everywhere."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from poolformer_seg.models.backbones import fast_ops
    from poolformer_seg.models.backbones.poolformer import PoolFormerBlock
    cuda = FakeTensor(FakeTensorMode(), torch.empty(2, 8, 5, 5,
                                                    device='meta'),
                      torch.device('cuda'))
    cpu, meta = torch.empty(2, 8, 5, 5), torch.empty(2, 8, 5, 5,
                                                     device='meta')
    with torch.enable_grad():
        assert fast_ops.runs_fused(cpu) and fast_ops.runs_fused(meta)
        assert not fast_ops.runs_fused(cuda)
    with torch.no_grad():
        assert fast_ops.runs_fused(cuda)

    # the block follows the decision: the formulas, same values
    block = PoolFormerBlock(8, 4, 3, dict(type='GN', num_groups=1), 0.5,
                            0., fused=True)
    x = torch.randn(2, 8, 9, 11, requires_grad=True)
    fused = block(x)
    assert fused.grad_fn.name() == '_BlockBackward'
    monkeypatch.setattr(fast_ops, 'BACKWARD_DEVICES', ('meta', ))
    plain = block(x)
    assert plain.grad_fn.name() != '_BlockBackward'
    torch.testing.assert_close(plain, fused, atol=1e-5, rtol=0)


def test_the_benchmark_switch_turns_the_hand_written_backward_off(
        monkeypatch):
    """``HAND_WRITTEN_BACKWARD=False`` (the benchmark's training row
    ``ours-no-hand-backward``) runs the plain formulas under autograd on
    the CPU too, with the same values and gradients; inference stays
    fused."""
    from poolformer_seg.models.backbones import fast_ops
    from poolformer_seg.models.backbones.poolformer import PoolFormerBlock
    block = PoolFormerBlock(8, 4, 3, dict(type='GN', num_groups=1), 0.5,
                            0., fused=True).double()
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64, requires_grad=True)
    grads = []
    for on in (True, False):
        monkeypatch.setattr(fast_ops, 'HAND_WRITTEN_BACKWARD', on)
        y = block(x)
        assert (y.grad_fn.name() == '_BlockBackward') is on
        grads.append(torch.autograd.grad(y.square().sum(),
                                         [x, *block.parameters()]))
        with torch.no_grad():
            assert fast_ops.runs_fused(x)
    for hand, plain in zip(*grads):
        torch.testing.assert_close(hand, plain, atol=1e-10, rtol=1e-10)


def test_fused_inference_stays_on_the_input_device():
    """FakeTensorMode refuses a CPU tensor meeting a CUDA one: a fused
    block's inference on (fake) CUDA tensors creates nothing on the CPU,
    so the fast path is device-clean without a GPU. (Fake CUDA tensors
    without a CUDA build support neither convolutions nor autograd: the
    whole model is checked on ``meta`` in tests/test_configs.py.)"""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from poolformer_seg.models.backbones.poolformer import PoolFormerBlock
    mode = FakeTensorMode(allow_non_fake_inputs=False)

    def fake_cuda(t):
        return FakeTensor(mode, t.to('meta'), torch.device('cuda'))
    block = PoolFormerBlock(8, 4, 3, dict(type='GN', num_groups=1), 1e-5,
                            0., fused=True).eval()
    for module in block.modules():
        for name, p in list(module._parameters.items()):
            module._parameters[name] = torch.nn.Parameter(
                fake_cuda(p.detach()), requires_grad=False)
    x = fake_cuda(torch.empty(2, 8, 17, 23).contiguous(
        memory_format=torch.channels_last))
    with mode, torch.no_grad():
        y = block(x)
    assert y.device.type == 'cuda' and y.shape == x.shape


def test_fast_segmentor_runs_on_the_meta_device():
    """The fused backbone, FastFPN and FastFPNHead on ``meta`` tensors:
    shapes (and FLOPs) without data or memory."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    from tests.conftest import S12_CONFIG
    init_default_scope('mmseg')
    cfg = Config.fromfile(S12_CONFIG)  # the fast path by default
    cfg.model.backbone.init_cfg = None
    cfg.model.decode_head.norm_cfg = dict(type='BN', requires_grad=True)
    with torch.device('meta'):
        model = MODELS.build(cfg.model).eval()
        x = torch.empty(1, 3, 100, 132)
    with torch.no_grad():
        logits = model(x, mode='tensor')
    assert logits.device.type == 'meta'
    assert logits.shape == (1, 150, 25, 33)


def test_inference_follows_an_ema_style_weight_swap():
    """mmengine's EMA hook swaps weights in through ``.data`` (no version
    bump), then switches mode: the next bf16 forward uses the new weights,
    exactly as a model that never saw the old ones."""
    _, fast = make_pair()
    x = image()

    def bf16_forward(model):
        # a context per call: autocast caches its own casts within one
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            return model.eval()(x)[0]
    before = bf16_forward(fast)
    with torch.no_grad():
        for p in fast.parameters():
            p.data.copy_(p.data * 1.1)
    after = bf16_forward(fast)
    fresh = copy.deepcopy(fast)
    torch.testing.assert_close(after, bf16_forward(fresh), atol=0, rtol=0)
    assert not torch.equal(after, before)


@pytest.mark.parametrize('gelu', [True, False])
def test_bf16_linear_is_fused_and_accurate(gelu):
    """The oneDNN op behind the bf16 MLP (private PyTorch API) still
    exists and computes x W^T + b (and the GELU) with one rounding, the
    fp32 bias unrounded."""
    from poolformer_seg.models.backbones.fast_ops import _linear
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=gen) for s in
               ((300, 48), (192, 48), (192, )))
    act = torch.nn.functional.gelu if gelu else (lambda t: t)
    want = act(x.bfloat16().float() @ w.bfloat16().float().t() + b)
    got = _linear(x.bfloat16(), w.bfloat16(), b, gelu)
    assert got.dtype == torch.bfloat16
    # within the final rounding to bf16 (relative 2^-8), nothing more
    torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(_linear(x, w, b, gelu), act(x @ w.t() + b))


# ----------------------------------------------------------------------------
# bf16 autocast


def test_fused_bf16_autocast_keeps_fp32_residual_and_tracks_fp32():
    plain, fast = make_pair()
    x = image(batch=1, size=(64, 64))
    with torch.no_grad():
        want = plain.eval()(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            got = fast.eval()(x)
            ref = plain(x)
    for g, w, r in zip(got, want, ref):
        assert g.dtype == torch.float32  # GroupNorm outputs, fp32 stream
        err = (g - w).norm() / w.norm()
        assert err < 2e-2
        # no worse than autocast on the plain block (bf16 matmuls in both)
        assert err < 1.5 * (r.float() - w).norm() / w.norm() + 1e-3


def test_fused_bf16_inference_runs_the_training_forward_in_bf16():
    """Without gradients the fused blocks compute exactly what they compute
    with them: the matrix products in the autocast dtype, not in fp32."""
    _, fast = make_pair()
    x = image(batch=1, size=(64, 64))
    fast.eval()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with torch.no_grad():
            inference = fast(x)
        with_grad = fast(x)
        assert with_grad[0].grad_fn is not None
    for a, b in zip(inference, with_grad):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_fused_bf16_training_step_gives_finite_close_gradients():
    plain, fast = make_pair()
    x = image(batch=2, size=(48, 48))
    want = outputs_and_grads(plain.train(), x)[1]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = outputs_and_grads(fast.train(), x)[1]
    for name, g in got.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        err = (g - want[name]).norm() / (want[name].norm() + 1e-12)
        if 'norm1.bias' not in name:  # exactly 0 vs rounding noise
            assert err < 5e-2, f'{name}: relative error {err:.3g}'
