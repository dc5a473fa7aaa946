"""The fast path on a CUDA device: what the CPU tests cannot show.

Skipped where no CUDA device is visible (CI has none); run on a GPU machine
with ``pytest tests/test_cuda.py``. ``POOLFORMER_SEG_TEST_DEVICE=cpu`` runs
the same checks on the CPU, to check the tests themselves.

On the device, with non-trivial random weights and TF32 off (TF32 rounds the
operands of fp32 products to 10 bits):

* every config's fast model gives the logits, loss and every gradient of
  ``model.impl='plain'`` (mmseg's own computation) at 66 x 98, a size that
  is no multiple of 32: in float64 to rounding, and in fp32 about as close
  to the float64 result as the plain path is;
* under bf16 autocast, inference's labels agree with fp32 at least as well
  as the plain path's do, and a training step gives gradients aligned with
  fp32's;
* compiled inference (what ``init_model`` returns there): the compiled
  logits equal the eager ones, and images of four sizes (one above
  512 x 512) need one compilation;
* a photo larger than the crop (the label map in blocks of rows) gives the
  plain path's labels;
* the configs' ``AmpOnCudaOptimWrapper`` trains in bf16 (fp16 with a
  dynamic loss scale where the device has no bf16).
"""
import copy
import os

import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmseg.registry import MODELS, OPTIM_WRAPPERS
from mmseg.structures import SegDataSample
from torch._dynamo.utils import counters

import poolformer_seg  # noqa: F401  (before mmseg's models)
from poolformer_seg.models.segmentors import rowwise_encoder_decoder as rowwise
from tests.helpers.upstream import randomize_
from tests.models.segmentors.test_compile import fresh_dynamo  # noqa: F401
from tests.test_configs import config_path as fpn_config_path
from tests.test_device_clean import CONFIGS, REPO, SIZE

DEVICE = torch.device(os.environ.get('POOLFORMER_SEG_TEST_DEVICE', 'cuda'))
pytestmark = pytest.mark.skipif(
    DEVICE.type == 'cuda' and not torch.cuda.is_available(),
    reason='no CUDA device (tests/test_cuda.py runs on a GPU machine)')
S12 = 'fpn_poolformer_s12_ade20k'
METAFORMER = 'upernet_caformer_s18_ade20k'
NO_DROPOUT = {'model.decode_head.dropout_ratio': 0.,
              'model.backbone.drop_path_rate': 0.}


@pytest.fixture(autouse=True)
def exact_fp32():
    matmul, cudnn = (torch.backends.cuda.matmul.allow_tf32,
                     torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn


def build_pair(name, **options):
    """The config's fast and plain segmentors on ``DEVICE``, equal random
    weights (built on the CPU and moved, as mmengine's runner does), no
    dropout or drop path (their masks depend on the memory layout), no
    compilation unless ``options`` ask for it."""
    init_default_scope('mmseg')
    cfg = Config.fromfile(os.path.join(REPO, 'configs', f'{name}.py'))
    cfg.model.backbone.init_cfg = None
    cfg.merge_from_dict({**NO_DROPOUT, 'model.test_cfg.compile': False,
                         **options})
    if cfg.model.get('auxiliary_head'):
        cfg.model.auxiliary_head.dropout_ratio = 0.
    models = {}
    for impl in ('plain', 'fast'):
        cfg.model.impl = impl
        models[impl] = revert_sync_batchnorm(MODELS.build(
            copy.deepcopy(cfg.model)))  # no settings shared
    with torch.no_grad():  # not the data preprocessor's mean and std
        for seed, part in enumerate(('backbone', 'neck', 'decode_head',
                                     'auxiliary_head')):
            if getattr(models['plain'], part, None) is not None:
                randomize_(getattr(models['plain'], part), seed)
    models['fast'].load_state_dict(models['plain'].state_dict(), strict=True)
    return models['fast'].to(DEVICE), models['plain'].to(DEVICE)


def images(batch, height, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=gen).to(DEVICE)


def samples_with_labels(batch, height, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(batch):
        sample = SegDataSample(metainfo=dict(img_shape=(height, width),
                                             pad_shape=(height, width)))
        sample.gt_sem_seg = PixelData(data=torch.randint(
            0, 150, (1, height, width), generator=gen).to(DEVICE))
        samples.append(sample)
    return samples


def loss_and_grads(model, x, samples, frozen_bn=False):
    """Loss and gradients of a training step; ``frozen_bn``: BatchNorm
    in eval mode (UPerNet's pyramid pooling normalises over the batch of
    two 1x1 maps in training mode, which makes fp32 results chaotic)."""
    model.train()
    if frozen_bn:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    model.zero_grad(set_to_none=True)
    losses = model.loss(x, samples)
    loss = sum(v for k, v in losses.items() if 'loss' in k)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()
                           if p.requires_grad}


def batch_of(image):
    height, width = image.shape[1:]
    sample = SegDataSample(metainfo=dict(
        ori_shape=(height, width), img_shape=(height, width),
        pad_shape=(height, width), padding_size=[0, 0, 0, 0]))
    return dict(inputs=[image], data_samples=[sample])


def labels(model, image):
    with torch.no_grad():
        result, = model.eval().test_step(batch_of(image))
    return result.pred_sem_seg.data


# ----------------------------------------------------------------------------
# fp32: fast = plain


def results(model, x, samples, frozen_bn=False):
    """Logits (eval), then loss and every gradient (train)."""
    with torch.no_grad():
        logits = model.eval()(x, mode='tensor')
    loss, grads = loss_and_grads(model, x, samples, frozen_bn)
    return {'logits': logits, 'loss': loss, **grads}


def relative_errors(got, want):
    """``|got - want| / |want|`` (Frobenius norms) per tensor; a tensor whose
    reference is exactly zero (PoolFormer's norm1 bias gradient: the pooling
    difference cancels it) is measured against a floor from the largest
    norm of its kind."""
    floor = 1e-6 * max(w.norm() for k, w in want.items() if k != 'logits')
    return {k: ((got[k].double() - w.double()).norm() /
                (w.double().norm() + floor)).item()
            for k, w in want.items()}


def fp32_results(name):
    """fp32 results of the config's fast and plain models (BatchNorm
    frozen), the float64 reference of the plain model, and the models."""
    fast, plain = build_pair(name)
    x = images(2, *SIZE)
    samples = samples_with_labels(2, *SIZE)
    fp32 = {label: results(copy.deepcopy(model), x, samples, frozen_bn=True)
            for label, model in (('fast', fast), ('plain', plain))}
    for label, got in fp32.items():
        assert got.keys() == fp32['plain'].keys(), label
        assert all(v is not None and v.device.type == DEVICE.type
                   for v in got.values()), label
    fast, plain = fast.double(), plain.double()
    reference = results(plain, x.double(), samples, frozen_bn=True)
    return fp32, reference, (fast, plain, x.double(), samples)


def assert_fp32_as_close_as_plain(fp32, reference):
    """The fast path is about as close to the float64 result as the plain
    path is, tensor by tensor.

    fp32 gradients differ from float64 by more than rounding where a ReLU
    input lies within rounding of zero and flips (one flip: 2e-3 of the
    gradients below it): an allowance of 1e-2. MetaFormer's scalar StarReLU
    gradients are sums with much cancellation, and the fast path takes the
    bias's through the folded ``fc2`` (a dot product of two
    channel vectors): 2e-3 on the CPU, 2.5e-2 for two configs on an H200
    (plain: 4e-3 and 6e-5), so one-element tensors are allowed 5e-2. A
    wrong gradient is off by order 1 (on CUDA's channels_last pooling bug,
    0.3-0.6 for every block input and 1.1-1.8 for the layer scales).
    """
    fast_error = relative_errors(fp32['fast'], reference)
    plain_error = relative_errors(fp32['plain'], reference)
    worse = {k: (fast_error[k], plain_error[k]) for k in fast_error
             if fast_error[k] > 3 * plain_error[k] +
             (5e-2 if reference[k].numel() == 1 else 1e-2)}
    assert not worse, worse
    assert fast_error['logits'] < 1e-4 and fast_error['loss'] < 1e-5


@pytest.mark.parametrize('name', CONFIGS)
def test_fast_equals_plain_logits_loss_and_gradients(name):
    """In float64 the two paths agree to rounding, BatchNorm in training
    mode; in fp32, with BatchNorm frozen, the fast path is about as close to
    the float64 result as the plain path is."""
    fp32, reference, (fast, plain, x, samples) = fp32_results(name)
    exact = relative_errors(results(fast, x, samples),
                            results(plain, x, samples))
    # (BatchNorm over a batch of two 1x1 pyramid-pooling maps reaches 2e-9)
    assert max(exact.values()) < 1e-7, max(exact.items(), key=lambda i: i[1])
    assert_fp32_as_close_as_plain(fp32, reference)


def test_padded_pooling_gradient_in_channels_last():
    """compat's pooling and its backward give the NCHW input gradient for
    channels_last maps here (pytorch/pytorch#188344: CUDA's channels_last
    kernel ignored the padding before torch 2.14)."""
    from poolformer_seg import compat
    gen = torch.Generator().manual_seed(0)
    x, grad = (torch.randn(2, 16, 9, 13, generator=gen, dtype=torch.float64)
               .to(DEVICE).contiguous(memory_format=torch.channels_last)
               for _ in range(2))
    nchw = x.contiguous().requires_grad_()
    torch.nn.functional.avg_pool2d(nchw, 3, 1, 1, count_include_pad=False
                                   ).backward(grad.contiguous())
    torch.testing.assert_close(
        compat.pool_excluding_padding_backward(grad, x, 3), nchw.grad)
    leaf = x.clone().requires_grad_()
    compat.pool_excluding_padding(leaf, 3).backward(grad)
    torch.testing.assert_close(leaf.grad, nchw.grad)


def test_hand_written_backward_here(monkeypatch):
    """S12 with the fused block's hand-written backward on ``DEVICE``
    (:data:`fast_ops.BACKWARD_DEVICES` has only the CPU): the evidence for
    adding CUDA to it. On torch 2.11 (H200) it failed before the pooling's
    gradient went through :func:`compat.pool_excluding_padding_backward`:
    every block's input gradient was 30-64% off."""
    from poolformer_seg.models.backbones import fast_ops
    monkeypatch.setattr(fast_ops, 'BACKWARD_DEVICES',
                        fast_ops.BACKWARD_DEVICES + (DEVICE.type, ))
    fp32, reference, _ = fp32_results(S12)
    assert_fp32_as_close_as_plain(fp32, reference)


# ----------------------------------------------------------------------------
# bf16 autocast


def agreement(a, b):
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


@pytest.mark.parametrize('name', [S12, METAFORMER])
def test_bf16_inference_agrees_with_fp32_as_well_as_plain(name):
    fast, plain = build_pair(name)
    x = images(1, 256, 320)
    found = {}
    with torch.no_grad():
        for label, model in (('fast', fast.eval()), ('plain', plain.eval())):
            fp32 = model(x, mode='tensor')
            with torch.autocast(DEVICE.type, torch.bfloat16):
                bf16 = model(x, mode='tensor')
            found[label] = agreement(bf16.float(), fp32)
            if label == 'fast':  # its classifier runs in fp32
                assert bf16.dtype == torch.float32
    assert found['fast'] >= found['plain'] - 0.002, found
    assert found['fast'] > 0.9, found


@pytest.mark.parametrize('name', [S12, METAFORMER])
def test_bf16_training_step_follows_fp32_as_well_as_plain(name):
    """The gradients of a bf16 autocast step point where fp32's do (cosine
    over all gradients), as well as the plain path's (BatchNorm frozen: see
    :func:`loss_and_grads`)."""
    x = images(2, 128, 160)
    samples = samples_with_labels(2, 128, 160)
    cosines = {}
    for label, model in zip(('fast', 'plain'), build_pair(name)):
        loss32, grads32 = loss_and_grads(model, x, samples, frozen_bn=True)
        with torch.autocast(DEVICE.type, torch.bfloat16):
            loss16, grads16 = loss_and_grads(model, x, samples,
                                             frozen_bn=True)
        assert torch.isfinite(loss16)
        torch.testing.assert_close(loss16.float(), loss32, rtol=2e-2, atol=0)
        flat32 = torch.cat([g.flatten().float() for g in grads32.values()])
        flat16 = torch.cat([g.flatten().float() for g in grads16.values()])
        assert torch.isfinite(flat16).all()
        cosines[label] = torch.nn.functional.cosine_similarity(
            flat16, flat32, dim=0).item()
    assert cosines['fast'] >= cosines['plain'] - 0.01, cosines
    assert cosines['fast'] > 0.9, cosines


# ----------------------------------------------------------------------------
# compiled inference (init_model turns 'auto' into True on CUDA)

# none a multiple of 32; the last is larger than the 512 x 512 crop
COMPILE_SIZES = [(512, 683), (384, 512), (500, 341), (600, 900)]


def test_compiled_inference_compiles_here_once_for_every_size(fresh_dynamo):
    torch._logging.set_logs(recompiles=True)
    fast, plain = build_pair(S12, **{'model.test_cfg.compile': True})
    plain.test_cfg['compile'] = False  # the reference labels, eager
    with torch.no_grad():
        assert fast.eval().compiles()
        for height, width in COMPILE_SIZES:
            x = images(1, height, width)
            got = fast(x, mode='tensor')
            want = rowwise._logits(fast, x)
            scale = want.abs().max()
            assert (got - want).abs().max() <= 1e-4 * scale
            image = (x[0] * 40 + 128).clamp(0, 255).to(torch.uint8)
            same = (labels(fast, image) == labels(plain, image)).float()
            assert same.mean() > 0.999
    print('compilations:', dict(counters['frames']),
          dict(counters['stats']))
    assert counters['frames']['ok'] == 1  # dynamic shapes: one graph
    assert not counters['graph_break']


# ----------------------------------------------------------------------------
# a large photo, and the optimiser wrapper of the configs


def test_large_photo_labels_equal_plain():
    """1,100 x 1,700 (the test pipeline keeps the size; the label map is
    built in blocks of rows, the logits resized on ``DEVICE``)."""
    fast, plain = build_pair(S12)
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 1100, 1700), generator=gen,
                          dtype=torch.uint8).to(DEVICE)
    got, want = labels(fast, image), labels(plain, image)
    assert got.shape == (1, 1100, 1700) and got.device.type == DEVICE.type
    assert (got == want).float().mean() > 0.999


@pytest.mark.filterwarnings('ignore::FutureWarning')  # mmengine's GradScaler
def test_configs_optim_wrapper_trains_the_fast_model():
    if DEVICE.type != 'cuda':
        pytest.skip('AmpOnCudaOptimWrapper is plain fp32 off CUDA')
    from mmengine.optim import AmpOptimWrapper
    fast, _ = build_pair(S12)
    cfg = Config.fromfile(fpn_config_path('s12'))
    optimizer = torch.optim.AdamW(fast.parameters(), lr=2e-4,
                                  weight_decay=1e-4)
    wrapper = OPTIM_WRAPPERS.build(
        dict(type=cfg.optim_wrapper.type),
        default_args=dict(optimizer=optimizer))
    assert isinstance(wrapper, AmpOptimWrapper)
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else \
        torch.float16
    assert wrapper.cast_dtype == want
    x = images(2, 256, 256)
    samples = samples_with_labels(2, 256, 256)
    before = [p.detach().clone() for p in fast.parameters()]
    fast.train()
    for _ in range(2):
        with wrapper.optim_context(fast):
            losses = fast.loss(x, samples)
        loss = sum(v for k, v in losses.items() if 'loss' in k)
        assert torch.isfinite(loss)
        wrapper.update_params(loss)
    moved = [not torch.equal(p, b) for p, b in zip(fast.parameters(), before)]
    # a few gradients are exactly zero (PoolFormer's norm1 bias), and their
    # weight decay can be below one ulp
    assert sum(moved) >= 0.9 * len(moved)
    assert all(torch.isfinite(p).all() for p in fast.parameters())
