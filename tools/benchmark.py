"""Speed, memory and agreement of our model against the upstream route.

    python tools/benchmark.py configs/fpn_poolformer_s12_ade20k.py \\
        --dtype fp32 bf16 --sizes 512x512 --batch-sizes 1 2 \\
        --modes infer train --markdown bench.md --plot bench.png

One run builds the config's segmentor twice with identical weights: *ours*
(the config as it is: the fast path by default, ``--cfg-options
model.impl=plain`` for the plain one) and the *reference*, the same config
with ``model.impl='plain'`` (mmseg's own FPN and FPNHead, or UPerHead and
FCNHead, as mmseg builds them) over MMPretrain 1.2.0's PoolFormer source
(``tools/upstream_reference.py``; for a MetaFormer config our plain
MetaFormer, whose features equal timm's, tested in
tests/models/backbones/test_metaformer.py), NCHW, run eager (row ``reference``)
and through ``torch.compile`` (row ``reference+compile``, the one-line
alternative a user has; its compilation is the "first call" column). With
``--ablations``, rows ``ours-no-<name>`` run ours with one hand-written
optimisation turned off (:data:`ABLATIONS`; ``ours+<name>`` turns on one
that this machine's CPU leaves off), in the modes where that optimisation
acts: each must beat its row by more than the spread of the repeats where
it is on (the hand-written backward, whose purpose is memory: in peak
memory), or go. For every mode, input size and batch size the variants
(model x dtype) are timed in turns, so that background load hits all of
them alike, and medians are reported, with each row's nominal FLOP rate as
a fraction of the measured matrix-product peak (``--no-peak`` skips that):

* ``infer``: ``encode_decode`` (backbone, neck, head and the resize of the
  logits to the input size) under ``no_grad``;
* ``train``: ``loss`` (forward and cross-entropy), backward and an AdamW
  step, batch ``B``.

Peak memory is measured after all the timing, in a fresh subprocess per
variant, mode, size and batch (CPU: peak RSS during the steps minus the RSS
before them, the C heap being trimmed and the kernel's high-water mark
reset first; CUDA:
``torch.cuda.max_memory_allocated`` minus the allocation before). Outputs
are compared at each size, after its timing, over ``--agreement-inputs``
random inputs (8 by default; one input's share of equal arg-max pixels moves
by a few hundredths of a percent from one input to the next): ours and the
reference in fp32 (max abs difference of the logits), and every
low-precision variant against its fp32 run (share of equal argmax pixels
over all the inputs, and that of the worst input). With bf16 requested, one
more row, ``reference/bf16-operands``, gives the floor for bf16 at these
weights: the fp32 reference with nothing rounded to bf16 but the operands of
its matrix products (:func:`bf16_operand_logits`).

Weights are random but non-trivial (layer scales 0.2..1, varied norms and
BN statistics) unless ``--checkpoint`` gives a trained segmentor, so that a
disagreement cannot hide behind the tiny initial layer scales.

bf16 runs under ``torch.autocast`` (CPU or CUDA); fp16 too, with a gradient
scaler when training. See docs/benchmark.md.
"""
import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

import poolformer_seg  # noqa: F401  (must precede mmseg imports)
import torch
from poolformer_seg import compat
from poolformer_seg.engine import add_debug_argument, run_tool

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16,
          'fp16': torch.float16}
MODES = ('infer', 'train')


def parse_size(text):
    try:
        height, width = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'--sizes takes HEIGHTxWIDTH, e.g. 512x1024; got {text!r}')
    if height < 32 or width < 32:
        raise argparse.ArgumentTypeError(f'size {text} is below 32x32')
    return height, width


def parse_args(argv=None):
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(
        description='Benchmark our segmentor against the upstream route',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('config', help='segmentor config file')
    p.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    p.add_argument('--dtype', nargs='+', choices=list(DTYPES),
                   help='compute dtypes; bf16/fp16 run under autocast '
                   '(default: fp32, and bf16 where the device computes it '
                   'natively)')
    p.add_argument('--sizes', nargs='+', type=parse_size,
                   default=[(512, 512)], metavar='HxW')
    p.add_argument('--batch-sizes', nargs='+', type=int, default=[1])
    p.add_argument('--modes', nargs='+', choices=MODES, default=list(MODES))
    p.add_argument('--repeats', type=int, default=5,
                   help='timed runs per variant (median reported)')
    p.add_argument('--warmup', type=int, default=1,
                   help='untimed runs per variant first')
    p.add_argument('--threads', type=int, default=os.cpu_count(),
                   help='torch CPU threads')
    p.add_argument('--reference', action=argparse.BooleanOptionalAction,
                   default=True, help='also run the mmpretrain reference')
    p.add_argument('--compiled-reference',
                   action=argparse.BooleanOptionalAction, default=True,
                   help='also run the reference through torch.compile '
                   '(row "reference+compile"; its compile time is the '
                   '"first call" column)')
    p.add_argument('--ablations', action=argparse.BooleanOptionalAction,
                   default=False,
                   help='also run ours with each hand-written optimisation '
                   'flipped (rows "ours-no-<name>" or "ours+<name>", see '
                   'ABLATIONS)')
    p.add_argument('--peak', action=argparse.BooleanOptionalAction,
                   default=True,
                   help='measure the matrix-product peak and the nominal '
                   'FLOPs, and report each row as a fraction of the peak')
    p.add_argument('--memory', action=argparse.BooleanOptionalAction,
                   default=True, help='measure peak memory (subprocesses)')
    p.add_argument('--checkpoint', help='segmentor weights to load instead '
                   'of random ones')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--agreement-inputs', type=int, default=8, metavar='N',
                   help='inputs per size for the output agreement (seeds '
                   'SEED..SEED+N-1; the first is the timed one): arg-max '
                   'shares move by a few hundredths of a percent from one '
                   'random input to the next')
    p.add_argument('--markdown', metavar='OUT.md')
    p.add_argument('--plot', metavar='OUT.png')
    p.add_argument('--json', metavar='OUT.json', help='raw report')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config settings, key=value (ours: '
                   'model.impl=plain for the plain path)')
    p.add_argument('--probe', help=argparse.SUPPRESS)  # memory worker
    add_debug_argument(p)
    args = p.parse_args(argv)
    for name in ('repeats', 'threads', 'agreement_inputs'):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or min(args.batch_sizes) < 1:
        p.error('--warmup must be >= 0 and --batch-sizes >= 1')
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda but torch.cuda.is_available() is False')
    args.dtype = checked_dtypes(args.dtype, args.device)
    return args


def native(device, dtype):
    """Whether ``device`` computes ``dtype`` products natively."""
    if device == 'cuda':
        return dtype != 'bf16' or torch.cuda.is_bf16_supported()
    return compat.cpu_computes_natively(DTYPES[dtype])


def checked_dtypes(requested, device):
    """``requested``, or by default fp32 plus bf16 where it is native.

    Emulated low precision (bf16 on an AVX2-only CPU) runs oneDNN's
    reference kernels: one 512x512 reference step then takes many minutes
    and says nothing about a machine with native bf16. It is left out by
    default, and runs only when asked for, with a warning.
    """
    dtypes = requested or ['fp32'] + ['bf16'] * native(device, 'bf16')
    emulated = [d for d in dtypes if not native(device, d)]
    if requested is None and 'bf16' not in dtypes:
        print(f'benchmark: bf16 left out: this {device} has no native bf16 '
              'products (an AVX2-only CPU?); --dtype bf16 runs it emulated',
              file=sys.stderr)
    elif emulated:
        print(f'benchmark: warning: --dtype {" ".join(emulated)} is '
              f'emulated on this {device} (no native products): those rows '
              'run far slower than fp32 and say nothing about a machine '
              'with native support', file=sys.stderr)
    return dtypes


# ----------------------------------------------------------------------------
# Models


def model_config(args):
    """The config's model dict with the benchmark's overrides applied."""
    from mmengine.config import Config
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    model = copy.deepcopy(cfg.model)
    if model.get('type') not in ('EncoderDecoder', 'RowwiseEncoderDecoder') \
            or 'backbone' not in model:
        raise ValueError(f'{args.config}: expected an EncoderDecoder model')
    model.backbone.init_cfg = None  # weights come from randomize/checkpoint
    return model


def ours_impl(args):
    """The ``model.impl`` that *ours* runs with (the config's, after
    ``--cfg-options``; segmentors without the switch run as configured)."""
    return model_config(args).get('impl', 'fast')


def build_segmentor(model_cfg):
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(copy.deepcopy(model_cfg))
    return revert_sync_batchnorm(model)  # SyncBN needs a process group


@torch.no_grad()
def randomize_(model, seed):
    """Random, well-scaled, non-trivial values in every float tensor."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(
            model.named_buffers()):
        if not t.is_floating_point():
            continue
        if 'layer_scale' in name:
            value = torch.rand(t.shape, generator=gen) * .8 + .2
        elif name.endswith('running_var'):
            value = torch.rand(t.shape, generator=gen) * 1.5 + .5
        elif t.dim() > 1:
            value = torch.randn(t.shape, generator=gen) / t[0].numel() ** .5
        elif name.endswith('weight'):
            value = 1 + .3 * torch.randn(t.shape, generator=gen)
        else:
            value = .1 * torch.randn(t.shape, generator=gen)
        t.copy_(value)


def upstream_reference():
    """``tools/upstream_reference.py``, loaded from its file: this script
    also runs as a module of the tests, where ``tools/`` is not on the path."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'upstream_reference.py')
    spec = importlib.util.spec_from_file_location('upstream_reference', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_of(model_cfg, ours):
    """The segmentor of ``model_cfg`` as upstream computes it, with the
    weights of ``ours``: built with ``model.impl='plain'`` (mmseg's FPN and
    FPNHead, constructed by mmseg: nothing of our fast modules carries
    over), then mmpretrain's PoolFormer in place of a PoolFormer backbone
    (another backbone stays our plain one: for MetaFormer, timm's
    computation in NCHW)."""
    ref_cfg = copy.deepcopy(model_cfg)
    # an EncoderDecoder config: the same layers; RowwiseEncoderDecoder takes
    # the impl switch, and with impl='plain' predicts as EncoderDecoder does
    ref_cfg.update(type='RowwiseEncoderDecoder', impl='plain')
    ref_cfg.backbone.pop('impl', None)  # model.impl decides
    ref = build_segmentor(ref_cfg)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref.train(ours.training)
    from poolformer_seg.models import PoolFormer
    if isinstance(ref.backbone, PoolFormer):
        ref.backbone = upstream_reference().build_reference(ref.backbone)
    return ref


def build_pair(args, device, state=None):
    """``{'ours': model, 'reference': model}`` with identical weights."""
    from mmengine.runner import load_checkpoint
    model_cfg = model_config(args)
    ours = build_segmentor(model_cfg)
    if state is not None:
        ours.load_state_dict(state)
    elif args.checkpoint:
        load_checkpoint(ours, args.checkpoint, map_location='cpu',
                        strict=True)
    else:
        randomize_(ours, args.seed)
    # inference as init_model's model runs it ('auto' compiles on CUDA)
    from poolformer_seg.apis import for_repeated_inference
    models = {'ours': for_repeated_inference(ours, device)}
    if args.reference:
        models['reference'] = reference_of(model_cfg, ours)
    return {k: m.to(device) for k, m in models.items()}


# ----------------------------------------------------------------------------
# Steps


def make_inputs(batch, size, num_classes, device, seed):
    """Smooth random images (already normalised) and random label maps."""
    import torch.nn.functional as F
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    coarse = torch.randn(batch, 3, max(1, h // 16), max(1, w // 16),
                         generator=gen)
    images = F.interpolate(coarse, size=(h, w), mode='bilinear',
                           align_corners=False)
    images = images + .1 * torch.randn(images.shape, generator=gen)
    labels = torch.randint(0, num_classes, (batch, 1, h, w), generator=gen)
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                padding_size=[0, 0, 0, 0])
    samples = []
    for i in range(batch):
        sample = SegDataSample(metainfo=meta)
        sample.gt_sem_seg = PixelData(data=labels[i].to(device))
        samples.append(sample)
    return images.to(device), samples


def autocast(device, dtype):
    if dtype == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=DTYPES[dtype])


def make_step(model, mode, dtype, images, samples, device, compiled=False):
    """A callable running one inference or training step; with
    ``compiled``, its model part (``encode_decode``, or ``loss``) runs
    through ``torch.compile`` (compiled on the first call), as a user would
    add it with one line."""
    if mode == 'infer':
        model.eval()
        metas = [s.metainfo for s in samples]

        def encode_decode(x):
            return model.encode_decode(x, metas)
        forward = torch.compile(encode_decode) if compiled else encode_decode

        def step():
            with torch.no_grad(), autocast(device, dtype):
                return forward(images)
        return step
    model.train()

    def loss(x):
        return model.loss(x, samples)
    forward = torch.compile(loss) if compiled else loss
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=2e-4,
        weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device) if dtype == 'fp16' else None

    def step():
        with autocast(device, dtype):
            losses = forward(images)
        loss = sum(v for k, v in losses.items() if 'loss' in k)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def time_interleaved(steps, repeats, warmup, device):
    """Wall and process CPU seconds per call of each step, taken in turns
    (each step once per round), and the wall seconds of the first call (at
    least one warm-up call is made: it includes any compilation).

    Each round takes the steps in a new order (a seeded shuffle): a step is
    slower after one that freed a lot of memory (its allocations fault
    their pages in again), and a fixed or rotated order would always put the
    same step after the same other one.

    CPU time (all threads) is a second view for loaded machines: with one
    thread it is the compute the step needed, whatever else runs.
    """
    def sync():
        if device == 'cuda':
            torch.cuda.synchronize()
    first = {}
    for name, step in steps.items():
        for i in range(max(1, warmup)):
            sync()
            start = time.perf_counter()
            step()
            sync()
            if i == 0:
                first[name] = time.perf_counter() - start
    times = {name: ([], [], first[name]) for name in steps}
    shuffle = random.Random(0).sample
    for _ in range(repeats):
        for name in shuffle(list(steps), len(steps)):
            step = steps[name]
            sync()
            start, cpu = time.perf_counter(), time.process_time()
            step()
            sync()
            times[name][0].append(time.perf_counter() - start)
            times[name][1].append(time.process_time() - cpu)
    return times


# ----------------------------------------------------------------------------
# Memory (fresh subprocess per measurement)


def _rss_bytes():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _peak_rss_bytes():
    """High-water RSS; resettable through /proc/self/clear_refs."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    raise OSError('no VmHWM in /proc/self/status')


def _trim_c_heap():
    """Give the C heap's free memory back to the kernel (glibc's
    ``malloc_trim``); False where there is no glibc.

    Building the pair frees hundreds of MB (the other model, the deep copy,
    the state dict) into the heap, where the measured steps would reuse them
    without growing the RSS: a baseline taken after the trim counts live
    memory only, the same for every variant."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def run_probe(spec, args):
    """Worker: build one variant, run its steps, print its peak memory."""
    device = args.device
    state = torch.load(spec['weights'], weights_only=True)
    models = build_pair(args, device, state)
    models = {base_model(spec['model']): models[base_model(spec['model'])]}
    del state
    num_classes = next(iter(models.values())).decode_head.num_classes
    images, samples = make_inputs(spec['batch'], tuple(spec['size']),
                                  num_classes, device, args.seed)
    step = variant_step(models, spec['model'], spec['mode'], spec['dtype'],
                        images, samples, device)
    runs = max(1, args.warmup) + 1
    if device == 'cuda':
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(runs):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        result = dict(peak_delta_mb=(peak - base) / 2**20,
                      peak_mb=peak / 2**20)
    else:
        import resource
        trimmed = _trim_c_heap()
        base = _rss_bytes()
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # reset the high-water mark to the current RSS
            peak_fn = _peak_rss_bytes
        except OSError:  # not Linux, or not allowed: monotonic fallback
            def peak_fn():
                return resource.getrusage(
                    resource.RUSAGE_SELF).ru_maxrss * 1024
        for _ in range(runs):
            step()
        peak = peak_fn()
        result = dict(peak_delta_mb=(peak - base) / 2**20,
                      peak_mb=peak / 2**20, heap_trimmed=trimmed)
    print('PROBE ' + json.dumps(result))


def measure_memory(spec, args, argv):
    cmd = [sys.executable, os.path.abspath(__file__), *argv, '--probe',
           json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith('PROBE '):
            return json.loads(line[6:])
    raise RuntimeError(f'memory probe {spec} failed:\n{proc.stderr[-3000:]}')


# ----------------------------------------------------------------------------
# Main loop


def _winograd_switch():
    from poolformer_seg.models import winograd
    return winograd, 'ON_THIS_CPU'


def _compose_switch():
    from poolformer_seg.models.necks import fast_fpn
    return fast_fpn, 'COMPOSE_FINEST'


def _compose_head_switch():
    from poolformer_seg.models.necks import fast_fpn
    return fast_fpn, 'COMPOSE_HEAD'


def _keep_weights_switch():
    from poolformer_seg.models import utils
    return utils, 'KEEP_DERIVED'


def _onednn_linear_switch():
    from poolformer_seg.models.backbones import fast_ops
    return fast_ops, 'ONEDNN_LINEAR'


def _hand_backward_switch():
    from poolformer_seg.models.backbones import fast_ops
    return fast_ops, 'HAND_WRITTEN_BACKWARD'


def _blockwise_loss_switch():
    from poolformer_seg.models.decode_heads import fast_head
    return fast_head, 'BLOCKWISE_LOSS'


def _separable_resize_switch():
    from poolformer_seg.models import resize
    return resize, 'SEPARABLE_ON_CPU'


@contextlib.contextmanager
def _patched(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


BOTH = ('infer', 'train')
ABLATIONS = {
    # Winograd F(4x4, 3x3) for the large 3x3 convolutions of neck and head,
    # on where this CPU's instruction set is one of winograd.FASTER_ON
    'winograd': (_winograd_switch, BOTH),
    # FastFPN's finest output from the composed lateral and output
    # convolutions plus a transposed convolution of the coarser lateral
    'compose': (_compose_switch, BOTH),
    # FPNHead's first convolution composed with FPN's finest output, which
    # is never built (a 5x5 convolution and a transposed one, edges fixed)
    'compose-head': (_compose_head_switch, BOTH),
    # the fused PoolFormer block's products through oneDNN's fused linear
    # (bias and GELU inside the product) instead of F.linear + GELU
    'onednn-linear': (_onednn_linear_switch, BOTH),
    # inference's folded and composed weights kept between calls while the
    # parameters are unchanged (models/utils.derived_weights)
    'keep-weights': (_keep_weights_switch, ('infer', )),
    # the fused block's hand-written backward (its input kept, the rest
    # recomputed) instead of autograd through the plain formulas
    'hand-backward': (_hand_backward_switch, ('train', )),
    # the loss block by block, its gradient formed in the forward, instead
    # of mmseg's loss_by_feat on the whole resized logits
    'blockwise-loss': (_blockwise_loss_switch, ('train', )),
    # the scores resized to the input size by two one-dimensional passes
    # (models/resize.py) instead of PyTorch's bilinear kernel
    'separable-resize': (_separable_resize_switch, ('infer', )),
}


def ablation_rows(mode=None):
    """``{row name: (owner, attribute)}``: each row runs ours with one
    boolean decision of :data:`ABLATIONS` flipped, ``ours-no-<name>``
    where it is on on this machine, ``ours+<name>`` where it is off; only
    the decisions that act in ``mode`` (all where None)."""
    rows = {}
    for name, (switch, modes) in ABLATIONS.items():
        if mode is not None and mode not in modes:
            continue
        owner, attribute = switch()
        sign = '-no-' if getattr(owner, attribute) else '+'
        rows[f'ours{sign}{name}'] = (owner, attribute)
    return rows


def variants(args, mode):
    names = ['ours']
    if args.ablations:
        names += list(ablation_rows(mode))
    if args.reference:
        names.append('reference')
        if args.compiled_reference:
            names.append('reference+compile')
    return [(name, dtype) for name in names for dtype in args.dtype]


def base_model(name):
    """The model of a variant: 'ours' or 'reference'."""
    return name.split('-')[0].split('+')[0]


def variant_step(models, name, mode, dtype, images, samples, device):
    """:func:`make_step` for a variant name: ablations run ours inside
    their patch, ``+compile`` through ``torch.compile``."""
    step = make_step(models[base_model(name)], mode, dtype, images, samples,
                     device, compiled=name.endswith('+compile'))
    switch = ablation_rows().get(name)
    if switch is None:
        return step
    owner, attribute = switch
    flipped = not getattr(owner, attribute)

    def ablated():
        with _patched(owner, attribute, flipped):
            return step()
    return ablated


CLASSIFIER = 'decode_head.conv_seg'


def matmul_peak_gflops(device, dtype, n=1024, repeats=3):
    """The best matrix-product throughput (GFLOP/s, 2 per multiply-add)
    of an ``n x n`` product in ``dtype`` (under autocast, as the models run
    it), from the median of ``repeats`` runs."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    if dtype != 'fp32':
        a, b = a.to(DTYPES[dtype]), b.to(DTYPES[dtype])
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        if device == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def peak_fraction(rec, peak_gflops, flops, models):
    """Nominal FLOPs of the step over its median time, as a fraction of
    the matrix-product peak. Nominal: the direct algorithms' count (MMEngine's
    FlopAnalyzer on the plain reference, 2 FLOPs per multiply-add); a
    training step counts 3x the forward (forward, and the two products of
    the backward). Winograd does fewer multiplications than nominal, so a
    fraction above 1 is possible."""
    from poolformer_seg.apis.complexity import count_flops
    size = tuple(rec['size'])
    model = models.get('reference')
    if model is None:  # nothing plain to count on (--no-reference)
        return None
    if size not in flops:
        training = model.training
        flops[size] = count_flops(model.eval(), size)[0]['total']
        model.train(training)
    work = 2 * flops[size] * rec['batch'] * (3 if rec['mode'] == 'train'
                                             else 1)
    return work / (rec['median_ms'] / 1e3) / 1e9 / peak_gflops


@torch.no_grad()
def bf16_operand_logits(model, images, metas):
    """``model.encode_decode`` in fp32 with the weight and the input of
    every convolution and linear layer rounded to bf16, except the
    classifier's (``CLASSIFIER``: cheap, and FastFPNHead keeps it fp32).

    Every bf16 matrix product rounds exactly these operands (and accumulates
    in fp32); here every other tensor stays fp32, so no bf16 inference that
    rounds to nearest comes closer to the fp32 result. The weights are
    restored afterwards, bit for bit.
    """
    def to_bf16(t):
        return t.to(torch.bfloat16).to(t.dtype)

    layers = [m for name, m in model.named_modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and
              name != CLASSIFIER]
    saved = [layer.weight.clone() for layer in layers]
    hooks = [layer.register_forward_pre_hook(
        lambda _, args: (to_bf16(args[0]), *args[1:])) for layer in layers]
    try:
        for layer in layers:
            layer.weight.copy_(to_bf16(layer.weight))
        return model.encode_decode(images, metas).float()
    finally:
        for hook in hooks:
            hook.remove()
        for layer, weight in zip(layers, saved):
            layer.weight.copy_(weight)


def _argmax_equal(a, b):
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


def _against_fp32(low, fp32):
    return dict(argmax_equal_to_fp32=_argmax_equal(low, fp32),
                max_abs_diff_to_fp32=(low - fp32).abs().max().item())


def agreement(models, inputs, dtypes, device):
    """Logit and argmax agreement over ``inputs``, a list of ``(images,
    samples)`` (see module docstring): each arg-max share over the pixels of
    all inputs, with the lowest of a single input next to it
    (``<key>_worst_input``); the largest of each maximum, the mean of each
    mean."""
    found = [agreement_at(models, images, samples, dtypes, device)
             for images, samples in inputs]
    return {variant: _combined([f[variant] for f in found])
            for variant in found[0]}


def _combined(values):
    """One variant's checks at several inputs of one size, combined."""
    out = {}
    for key in values[0]:
        column = [v[key] for v in values]
        if key.startswith('argmax_equal'):
            out[key] = statistics.mean(column)
            out[f'{key}_worst_input'] = min(column)
        else:
            out[key] = (max if key.startswith('max_') else
                        statistics.mean)(column)
    return out


@torch.no_grad()
def agreement_at(models, images, samples, dtypes, device):
    """Logit and argmax agreement at one input (see module docstring)."""
    metas = [s.metainfo for s in samples]
    out = {}
    fp32 = {}
    for name, model in models.items():
        model.eval()
        logits = model.encode_decode(images, metas).float()
        fp32[name] = logits
        for dtype in dtypes:
            if dtype == 'fp32':
                continue
            with autocast(device, dtype):
                low = model.encode_decode(images, metas).float()
            out[f'{name}/{dtype}'] = _against_fp32(low, logits)
    if 'reference' in fp32 and 'bf16' in dtypes:
        out['reference/bf16-operands'] = _against_fp32(
            bf16_operand_logits(models['reference'], images, metas),
            fp32['reference'])
    if 'reference' in fp32:
        diff = (fp32['ours'] - fp32['reference']).abs()
        out['ours/fp32'] = dict(
            max_abs_diff_to_reference=diff.max().item(),
            mean_abs_diff_to_reference=diff.mean().item(),
            max_abs_logit=fp32['reference'].abs().max().item(),
            argmax_equal_to_reference=_argmax_equal(fp32['ours'],
                                                    fp32['reference']))
    return out


def run(args, argv):
    device = args.device
    models = build_pair(args, device)
    num_classes = models['ours'].decode_head.num_classes
    records, checks = [], []
    peak = {dtype: matmul_peak_gflops(device, dtype)
            for dtype in args.dtype} if args.peak else {}
    flops = {}  # (H, W) -> nominal multiply-adds of one image
    tmp = tempfile.TemporaryDirectory()
    weights = os.path.join(tmp.name, 'weights.pth')
    torch.save(models['ours'].state_dict(), weights)
    # training steps change the weights; agreement needs the initial ones
    initial = {k: copy.deepcopy(m.state_dict()) for k, m in models.items()}
    for size in args.sizes:
        for batch in args.batch_sizes:
            images, samples = make_inputs(batch, size, num_classes, device,
                                          args.seed)
            for mode in args.modes:
                steps = {f'{name}/{dtype}': variant_step(
                    models, name, mode, dtype, images, samples, device)
                    for name, dtype in variants(args, mode)}
                times = time_interleaved(steps, args.repeats, args.warmup,
                                         device)
                for name, dtype in variants(args, mode):
                    t, cpu, first = times[f'{name}/{dtype}']
                    rec = dict(mode=mode, size=list(size), batch=batch,
                               model=name, dtype=dtype,
                               median_ms=statistics.median(t) * 1e3,
                               min_ms=min(t) * 1e3, max_ms=max(t) * 1e3,
                               first_call_s=first,
                               times_ms=[v * 1e3 for v in t],
                               cpu_median_ms=statistics.median(cpu) * 1e3)
                    if peak:
                        rec['peak_fraction'] = peak_fraction(
                            rec, peak[dtype], flops, models)
                    rec['images_per_s'] = batch / (rec['median_ms'] / 1e3)
                    records.append(rec)
                    print(format_record(rec), flush=True)
            if 'infer' in args.modes:  # after the timing: it allocates a lot
                for name, model in models.items():
                    model.load_state_dict(initial[name])
                inputs = [(images, samples)] + [
                    make_inputs(batch, size, num_classes, device,
                                args.seed + i)
                    for i in range(1, args.agreement_inputs)]
                checks.append(dict(
                    size=list(size), batch=batch, inputs=len(inputs),
                    results=agreement(models, inputs, args.dtype, device)))
                del inputs
            del images, samples
    # Last, so that the kernel's clean-up after each probe process (GBs of
    # freed pages) cannot slow down a timed step.
    if args.memory:
        for rec in records:
            rec.update(measure_memory(
                {k: rec[k] for k in ('model', 'dtype', 'mode', 'size',
                                     'batch')} | dict(weights=weights),
                args, argv))
            print(format_record(rec), flush=True)
    add_ratios(records)
    env = environment(args)
    if peak:
        env['matmul_peak_gflops'] = peak
    return dict(environment=env, records=records,
                agreement=checks, scaling=scaling(records))


def format_record(rec):
    mem = (f", peak +{rec['peak_delta_mb']:.0f} MB"
           if 'peak_delta_mb' in rec else '')
    return (f"{rec['mode']:5s} {rec['size'][0]}x{rec['size'][1]} "
            f"b{rec['batch']} {rec['model']:17s} {rec['dtype']}: "
            f"{rec['median_ms']:.1f} ms (min {rec['min_ms']:.1f}){mem}")


def add_ratios(records):
    """Speed-up and memory ratios against the reference (fp32 and same)."""
    index = {(r['mode'], tuple(r['size']), r['batch'], r['model'],
              r['dtype']): r for r in records}
    for r in records:
        key = (r['mode'], tuple(r['size']), r['batch'], 'reference')
        for tag, dtype in (('fp32', 'fp32'), ('same', r['dtype'])):
            ref = index.get(key + (dtype, ))
            if ref is None or r['model'] == 'reference' and tag == 'same':
                continue
            r[f'speedup_vs_ref_{tag}'] = ref['median_ms'] / r['median_ms']
            r[f'cpu_speedup_vs_ref_{tag}'] = ref['cpu_median_ms'] / max(
                r['cpu_median_ms'], 1e-9)
            if 'peak_delta_mb' in r and tag == 'same':
                r['memory_vs_ref'] = r['peak_delta_mb'] / max(
                    ref['peak_delta_mb'], 1e-9)
        compiled = index.get((r['mode'], tuple(r['size']), r['batch'],
                              'reference+compile', r['dtype']))
        if compiled is not None and r is not compiled:
            r['speedup_vs_compiled'] = compiled['median_ms'] / r['median_ms']


def scaling(records):
    """Log-log slope of time against pixels per (model, dtype, mode, B).

    A slope of 1 is linear cost in the number of pixels.
    """
    groups = {}
    for r in records:
        key = (r['model'], r['dtype'], r['mode'], r['batch'])
        groups.setdefault(key, []).append(
            (r['size'][0] * r['size'][1], r['median_ms']))
    out = []
    for (model, dtype, mode, batch), points in groups.items():
        points.sort()
        if len(points) < 2 or points[0][0] == points[-1][0]:
            continue
        xs = [math.log(p) for p, _ in points]
        ys = [math.log(t) for _, t in points]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum(
            (x - mx)**2 for x in xs)
        out.append(dict(model=model, dtype=dtype, mode=mode, batch=batch,
                        slope=slope, ms_per_megapixel=[
                            t / (p / 1e6) for p, t in points],
                        pixels=[p for p, _ in points]))
    return out


def environment(args):
    cpu = platform.processor()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f
                       if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    env = dict(date=datetime.datetime.now().isoformat(timespec='seconds'),
               command='python tools/benchmark.py ' + ' '.join(
                   sys.argv[1:]),
               torch=torch.__version__, device=args.device, cpu=cpu,
               cpu_capability=torch.backends.cpu.get_cpu_capability(),
               huge_pages=os.environ.get('THP_MEM_ALLOC_ENABLE'),
               threads=args.threads, cpu_count=os.cpu_count(),
               config=args.config, impl=ours_impl(args),
               weights=args.checkpoint or
               f'random (seed {args.seed})', repeats=args.repeats,
               warmup=args.warmup)
    if args.device == 'cuda':
        env['gpu'] = torch.cuda.get_device_name()
    return env


# ----------------------------------------------------------------------------
# Output


def to_markdown(report):
    env = report['environment']
    lines = [
        '# Benchmark: ours vs upstream (mmseg heads over mmpretrain '
        'PoolFormer or timm-equivalent MetaFormer)', '',
        f"`{env['command']}`", '',
        f"{env['date']}; torch {env['torch']}; {env['device']} "
        f"({env.get('gpu', env['cpu'])}); {env['threads']} threads; "
        f"weights: {env['weights']}; ours: "
        f"impl={env.get('impl')}; huge pages (THP_MEM_ALLOC_ENABLE, "
        f"both routes): {env.get('huge_pages') or 'unset'}; "
        f"median of {env['repeats']} runs after {env['warmup']} warm-up.",
        '', 'Matrix-product peak (GFLOP/s): ' + (', '.join(
            f'{k} {v:.0f}' for k, v in env['matmul_peak_gflops'].items())
            if 'matmul_peak_gflops' in env else 'not measured') +
        '; "of peak": nominal FLOPs per second over that peak.',
        '',
        '| mode | size | batch | model | dtype | median ms | min-max ms '
        '| first call s | img/s | x ref fp32 | x ref same dtype '
        '| x ref+compile | CPU ms | CPU x ref fp32 | of peak '
        '| peak mem +MB | mem / ref |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|'
        '---|']

    def fmt(value, spec):
        return '-' if value is None else format(value, spec)
    for r in report['records']:
        lines.append(
            f"| {r['mode']} | {r['size'][0]}x{r['size'][1]} | {r['batch']} "
            f"| {r['model']} | {r['dtype']} | {r['median_ms']:.1f} "
            f"| {fmt(r.get('min_ms'), '.0f')}-{fmt(r.get('max_ms'), '.0f')} "
            f"| {fmt(r.get('first_call_s'), '.1f')} "
            f"| {r['images_per_s']:.2f} "
            f"| {fmt(r.get('speedup_vs_ref_fp32'), '.2f')} "
            f"| {fmt(r.get('speedup_vs_ref_same'), '.2f')} "
            f"| {fmt(r.get('speedup_vs_compiled'), '.2f')} "
            f"| {r['cpu_median_ms']:.0f} "
            f"| {fmt(r.get('cpu_speedup_vs_ref_fp32'), '.2f')} "
            f"| {fmt(r.get('peak_fraction'), '.2f')} "
            f"| {fmt(r.get('peak_delta_mb'), '.0f')} "
            f"| {fmt(r.get('memory_vs_ref'), '.2f')} |")
    if report['agreement']:
        lines += ['', '## Output agreement (inference)', '',
                  '| size | batch | inputs | variant | check | value |',
                  '|---|---|---|---|---|---|']
        for check in report['agreement']:
            for variant, values in check['results'].items():
                for key, value in values.items():
                    lines.append(
                        f"| {check['size'][0]}x{check['size'][1]} "
                        f"| {check['batch']} | {check['inputs']} "
                        f"| {variant} | {key} | {value:.6g} |")
    if report['scaling']:
        lines += ['', '## Cost against pixels', '',
                  'Slope of log(time) against log(pixels); 1 = linear.', '',
                  '| model | dtype | mode | batch | slope | ms per '
                  'megapixel (by size) |', '|---|---|---|---|---|---|']
        for s in report['scaling']:
            per = ', '.join(f'{v:.0f}' for v in s['ms_per_megapixel'])
            lines.append(f"| {s['model']} | {s['dtype']} | {s['mode']} "
                         f"| {s['batch']} | {s['slope']:.2f} | {per} |")
    return '\n'.join(lines) + '\n'


def plot(report, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    modes = sorted({r['mode'] for r in report['records']})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5),
                             squeeze=False)
    for ax, mode in zip(axes[0], modes):
        lines = {}
        for r in report['records']:
            if r['mode'] == mode:
                key = f"{r['model']} {r['dtype']} b{r['batch']}"
                lines.setdefault(key, []).append(
                    (r['size'][0] * r['size'][1] / 1e6, r['median_ms']))
        for key, points in sorted(lines.items()):
            points.sort()
            ax.plot(*zip(*points), marker='o',
                    linestyle='--' if key.startswith('reference') else '-',
                    label=key)
        ax.set_xlabel('megapixels per image')
        ax.set_ylabel('median ms per step')
        ax.set_title(f'{mode} ({report["environment"]["device"]})')
        ax.grid(True, alpha=.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.probe:
            return run_probe(json.loads(args.probe), args)
        report = run(args, argv)
    finally:
        torch.set_num_threads(threads)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1)
    markdown = to_markdown(report)
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(markdown)
    if args.plot:
        plot(report, args.plot)
    print(markdown)


if __name__ == '__main__':
    run_tool(main)
