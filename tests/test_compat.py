"""poolformer_seg.compat on mmcv-lite (this environment) and on full mmcv.

The full-mmcv path is simulated in a subprocess: a stand-in ``mmcv._ext``
that provides every compiled symbol ``mmcv.ops`` asks for, so mmcv's real
``ops`` package imports and ``full_mmcv_available()`` is True.
"""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import poolformer_seg  # noqa: F401  (applies compat)
from poolformer_seg import compat

lite_only = pytest.mark.skipif(compat.full_mmcv_available(),
                               reason='full mmcv installed: lite path unused')


@lite_only
def test_mmseg_imports_on_mmcv_lite():
    import mmcv
    import mmseg.models  # noqa: F401  (fails without the stand-in)
    from mmseg.registry import MODELS
    assert MODELS.get('PoolFormer') is poolformer_seg.PoolFormer
    assert 'stand-in' in mmcv.ops.__doc__


@lite_only
@pytest.mark.parametrize('name', ['sigmoid_focal_loss', 'nms', 'RoIAlign'])
def test_missing_op_imports_but_raises_naming_it_when_called(name):
    module = __import__('mmcv.ops', fromlist=[name])
    op = getattr(module, name)  # `from mmcv.ops import name` works
    assert isinstance(op, compat.UnavailableOp)
    with pytest.raises(compat.MissingMmcvOpError,
                       match=rf'mmcv\.ops\.{name} needs the compiled mmcv '
                       r'ops, but only mmcv-lite is installed'):
        op(torch.zeros(1, 4), torch.zeros(1, 4))


@lite_only
def test_dunder_lookups_are_plain_attribute_errors():
    import mmcv.ops
    assert not hasattr(mmcv.ops, '__wrapped__')


def _bilinear_reference(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear sampling at normalised [0, 1] points, align_corners=False.

    A point ``p`` maps to pixel coordinate ``p * size - 0.5``; samples
    outside the image count as zero (grid_sample's default padding).
    """
    channels, height, width = image.shape
    out = np.zeros((channels, len(points)))
    for k, (px, py) in enumerate(points):
        x, y = px * width - .5, py * height - .5
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                if 0 <= yy < height and 0 <= xx < width:
                    out[:, k] += wy * wx * image[:, yy, xx]
    return out


def test_point_sample_is_real_and_correct():
    from mmcv.ops import point_sample
    assert not isinstance(point_sample, compat.UnavailableOp)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 7, 9, generator=gen, dtype=torch.float64)
    points = torch.rand(2, 11, 2, generator=gen, dtype=torch.float64)
    points[0, 0] = torch.tensor([0., 1.])  # corners: zero padding counts
    sampled = point_sample(image, points, align_corners=False)
    assert sampled.shape == (2, 3, 11)
    for b in range(2):
        np.testing.assert_allclose(
            sampled[b].numpy(),
            _bilinear_reference(image[b].numpy(), points[b].numpy()),
            atol=1e-12)
    grid = F.grid_sample(image, 2 * points.unsqueeze(2) - 1,
                         align_corners=False).squeeze(3)
    torch.testing.assert_close(sampled, grid)


FULL_MMCV = textwrap.dedent('''
    import importlib.machinery, json, sys, types

    # Stand-in for the compiled extension of a full mmcv install: every
    # symbol mmcv.ops looks up exists (and would fail if it were called).
    ext = types.ModuleType('mmcv._ext')
    ext.__spec__ = importlib.machinery.ModuleSpec('mmcv._ext', None)

    def ext_getattr(name):
        if name.startswith('__'):
            raise AttributeError(name)
        def op(*args, **kwargs):
            raise RuntimeError('stand-in compiled op ' + name)
        return op

    ext.__getattr__ = ext_getattr
    sys.modules['mmcv._ext'] = ext

    import poolformer_seg
    from poolformer_seg import compat
    import mmcv.ops, mmseg.models
    from mmengine.runner.checkpoint import CheckpointLoader
    print(json.dumps(dict(
        full=compat.full_mmcv_available(),
        ops_file=mmcv.ops.__file__,
        ops_doc=mmcv.ops.__doc__,
        focal_type=type(mmcv.ops.sigmoid_focal_loss).__name__,
        loader=CheckpointLoader._schemes[''].__module__,
    )))
''')


@pytest.mark.slow
def test_full_mmcv_is_left_alone():
    result = subprocess.run([sys.executable, '-c', FULL_MMCV],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info['full'] is True
    # mmcv's own ops package, not the stand-in module of compat
    assert info['ops_file'].replace('\\', '/').endswith('mmcv/ops/__init__.py')
    assert info['ops_doc'] is None or 'stand-in' not in info['ops_doc']
    assert info['focal_type'] != 'UnavailableOp'
    # checkpoint loading is still routed through the safe loader
    assert info['loader'] == 'poolformer_seg.utils.safe_load'


# ----------------------------------------------------------------------------
# Private and version-dependent APIs: the direct path and the fallback agree.


class _NoPublicHook(torch.nn.Module):
    """A module as torch < 2.5 has it: only the private registration."""
    register_load_state_dict_pre_hook = None


def test_pre_hook_registration_with_and_without_the_public_api():
    for cls in (torch.nn.Linear, type('Old', (_NoPublicHook, torch.nn.Linear),
                                      {})):
        module = cls(2, 2)
        seen = []
        compat.register_load_state_dict_pre_hook(
            module, lambda m, sd, prefix, *rest: seen.append((m, prefix)))
        module.load_state_dict(torch.nn.Linear(2, 2).state_dict())
        assert seen == [(module, '')], cls


def test_safe_globals_fallback_is_a_no_op(monkeypatch):
    with compat.torch_safe_globals([np.dtype]):
        pass
    monkeypatch.delattr(torch.serialization, 'safe_globals')
    with compat.torch_safe_globals([np.dtype]) as context:
        assert context is None


def test_numpy_core_has_the_pickle_reconstructors():
    core = compat.numpy_core()
    assert callable(core.multiarray._reconstruct)
    assert callable(core.multiarray.scalar)


def test_cpu_computes_natively_asks_onednn_and_assumes_yes_without_it(
        monkeypatch):
    mkldnn = torch.ops.mkldnn
    assert compat.cpu_computes_natively(torch.float32)
    assert compat.cpu_computes_natively(torch.bfloat16) == \
        mkldnn._is_mkldnn_bf16_supported()
    assert compat.cpu_computes_natively(torch.float16) == \
        mkldnn._is_mkldnn_fp16_supported()
    monkeypatch.setattr(torch.ops, 'mkldnn', None)  # a torch without it
    assert compat.cpu_computes_natively(torch.bfloat16)


@pytest.mark.parametrize('gelu', [False, True])
def test_onednn_linear_matches_public_ops_or_says_it_is_missing(
        monkeypatch, gelu):
    x = torch.randn(5, 8).bfloat16()
    weight, bias = torch.randn(4, 8).bfloat16(), torch.randn(4)
    expected = F.linear(x.float(), weight.float(), bias)
    expected = F.gelu(expected) if gelu else expected
    out = compat.onednn_linear(x, weight, bias, gelu)
    bf16_cpu = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert (out is not None) == bf16_cpu  # AVX-512 bf16 or AMX: oneDNN's
    if out is not None:
        torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.02)
    out = compat.onednn_linear(x.float(), weight.float(), bias, gelu)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # fp32
    assert compat.onednn_linear(x.double(), weight.double(), bias.double(),
                                gelu) is None  # oneDNN has no float64
    monkeypatch.setattr(torch.backends.mkldnn, 'is_available', lambda: False)
    assert compat.onednn_linear(x, weight, bias, gelu) is None


@pytest.mark.slow
def test_import_without_mmcv_says_what_to_install():
    code = textwrap.dedent('''
        import sys
        sys.modules['mmcv'] = None  # as if no mmcv were installed
        import poolformer_seg
    ''')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert 'mmcv-lite' in proc.stderr and 'full mmcv' in proc.stderr


@pytest.mark.parametrize('new_api', [True, False])
def test_autocast_dtype_on_every_torch(monkeypatch, new_api):
    monkeypatch.setattr(compat, '_has_torch', lambda *version: new_api)
    assert compat.autocast_dtype('cpu') is None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert compat.autocast_dtype('cpu') == torch.bfloat16
        assert compat.autocast_dtype('meta') is None
    assert compat.autocast_dtype('meta') is None
def test_mmengine_load_state_dict_is_strict_only_for_our_models():
    """Workaround 3: models without a poolformer_seg backbone keep
    mmengine's lenient loading (a warning); ours raise, naming the keys."""
    import mmengine.runner.checkpoint as mm_checkpoint

    from poolformer_seg import PoolFormer
    from poolformer_seg.utils.loading import CheckpointMismatchError
    assert mm_checkpoint.load_state_dict.poolformer_seg_checked
    other = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    partial = {'0.weight': torch.ones(3, 2)}
    mm_checkpoint.load_state_dict(other, partial)  # mmengine: a warning
    assert torch.equal(other[0].weight, torch.ones(3, 2))
    ours = torch.nn.Module()
    ours.backbone = PoolFormer(arch=dict(layers=[1, 1, 1, 1],
                                         embed_dims=[4, 4, 4, 4]))
    state = dict(ours.state_dict())
    del state['backbone.stem.proj.bias']
    with pytest.raises(CheckpointMismatchError,
                       match=r'missing \(1\): backbone\.stem\.proj\.bias'):
        mm_checkpoint.load_state_dict(ours, state)


@pytest.mark.parametrize('public', [True, False])
def test_is_compiling_inside_and_outside_compile(monkeypatch, public):
    """True while dynamo traces the caller, False in eager code; the same
    through torch 2.1's ``torch._dynamo.is_compiling`` fallback."""
    if not public:  # a torch without torch.compiler, as seen by compat
        import types
        monkeypatch.setattr(compat, 'torch', types.SimpleNamespace())
    torch._dynamo.reset()

    def probe(x):
        return x + 1 if compat.is_compiling() else x - 1
    assert not compat.is_compiling()
    x = torch.zeros(2)
    assert torch.equal(probe(x), x - 1)
    compiled = torch.compile(probe, backend='eager')
    assert torch.equal(compiled(x), x + 1)
    torch._dynamo.reset()


def _map_on(device, layout):
    """A 4-d tensor on ``device`` in the memory format ``layout``: a fake
    one for CUDA (no CUDA build here)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    x = torch.empty(2, 8, 5, 5, device='cpu' if device == 'cpu' else 'meta'
                    ).contiguous(memory_format=layout)
    if device == 'cuda':
        return FakeTensor(FakeTensorMode(), x, torch.device('cuda'))
    return x


@pytest.mark.parametrize('version, device, layout, nchw', [
    ('2.11.0+cu130', 'cuda', torch.channels_last, True),
    ('2.13.0', 'cuda', torch.channels_last, True),
    ('2.14.0', 'cuda', torch.channels_last, False),
    ('2.11.0', 'cuda', torch.contiguous_format, False),
    ('2.11.0', 'cpu', torch.channels_last, False),
])
def test_pool_backward_takes_nchw_only_on_cuda_before_the_fix(
        monkeypatch, version, device, layout, nchw):
    """pytorch/pytorch#188344: CUDA's channels_last avg-pool backward
    ignores the padding before torch 2.14; only there is NCHW taken."""
    monkeypatch.setattr(torch, '__version__', version)
    assert compat._pool_backward_needs_nchw(_map_on(device, layout)) is nchw


def _pooling_reference(x, grad):
    """Autograd of the padded 3x3 average in float64 NCHW (CPU)."""
    x = x.detach().double().contiguous().requires_grad_()
    F.avg_pool2d(x, 3, 1, 1, count_include_pad=False).backward(
        grad.double().contiguous())
    return x.grad


@pytest.mark.parametrize('nchw_route', [False, True])
def test_pooling_and_its_backward_on_either_route(monkeypatch, nchw_route):
    """Both routes of compat's pooling give the padded 3x3 average and its
    input gradient on a channels_last map; the NCHW route (CUDA before the
    fix, forced here) returns the gradient in NCHW, the other keeps the
    input's layout."""
    monkeypatch.setattr(compat, '_pool_backward_needs_nchw',
                        lambda x: nchw_route)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 7, generator=gen).contiguous(
        memory_format=torch.channels_last)
    grad = torch.randn(2, 5, 6, 7, generator=gen).contiguous(
        memory_format=torch.channels_last)
    want = _pooling_reference(x, grad)

    got = compat.pool_excluding_padding_backward(grad, x, 3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got.is_contiguous() is nchw_route

    leaf = x.clone().requires_grad_()
    pooled = compat.pool_excluding_padding(leaf, 3)
    torch.testing.assert_close(
        pooled, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
    assert pooled.is_contiguous() is nchw_route  # what autograd will see
    pooled.backward(grad)
    torch.testing.assert_close(leaf.grad.double(), want, rtol=1e-5,
                               atol=1e-6)
