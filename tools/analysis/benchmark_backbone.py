"""Backbone speed: our MetaFormer against timm's, eager and compiled.

    python tools/analysis/benchmark_backbone.py convformer_s18 \\
        --modes train infer --batch-size 2 --size 512 512 --repeats 5

Builds timm's ``features_only`` model of ``arch`` (random initialisation,
its scalars drawn as trained weights have them: see
:func:`randomize_scalars_`) and our ``MetaFormer(arch)`` with timm's
weights loaded, in its default
``impl='fast'``; checks that both give the same stage features; then times,
the rows taken in turns:

- ``infer``: the stage features under ``torch.no_grad()``;
- ``train``: the stage features, the sum of their means as the loss,
  backward and an AdamW step.

Rows: ``ours`` (eager), ``timm`` (eager), ``timm+compile``
(``torch.compile`` of timm's model; ``--no-compiled-reference`` leaves it
out) and, with ``--compiled-ours``, ``ours+compile``. Each row gives the
median, min and max of ``--repeats`` timed calls and its first call (any
compilation included), and each reference row its median over ours' (above
1: ours is faster).

timm is imported as installed; it imports torchvision, which must import
too. A benchmark, not a test: only the two models' agreement is checked
(docs/metaformer.md has the figures).
"""
import argparse
import json
import os
import os.path as osp
import runpy
import statistics

import poolformer_seg  # noqa: F401  (must precede mmseg imports)
import torch
from poolformer_seg import MetaFormer
from poolformer_seg.utils.metaformer_layouts import (
    convert_metaformer_state_dict, match_pointwise_shapes)

MODES = ('infer', 'train')
TOOLS = osp.dirname(osp.dirname(osp.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='MetaFormer backbone speed, ours against timm')
    p.add_argument('arch', help="a timm MetaFormer, e.g. 'convformer_s18'")
    p.add_argument('--modes', nargs='+', choices=MODES, default=list(MODES))
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--size', nargs=2, type=int, default=[512, 512],
                   metavar=('H', 'W'))
    p.add_argument('--repeats', type=int, default=5,
                   help='timed calls per row, in turns (median reported)')
    p.add_argument('--threads', type=int, default=os.cpu_count())
    p.add_argument('--compiled-reference',
                   action=argparse.BooleanOptionalAction, default=True,
                   help='add the row of timm under torch.compile')
    p.add_argument('--compiled-ours', action='store_true',
                   help='add the row of ours under torch.compile')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', metavar='OUT.json', help='raw report')
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1 or min(args.size) < 32:
        p.error('--batch-size and --repeats must be >= 1, --size >= 32')
    return args


def timm_features_model(arch: str):
    """timm's ``features_only`` model of ``arch``; the errors say what to
    install or which names exist."""
    try:
        import timm
    except ImportError as error:
        raise SystemExit(
            f'timm could not be imported ({error}); install timm 1.0 and a '
            'torchvision that matches your torch') from error
    known = [name for name in timm.list_models()
             if name.startswith(('poolformerv2_', 'convformer_', 'caformer_'))]
    if arch not in known:
        raise SystemExit(f'arch {arch!r} is not a timm MetaFormer; one of: '
                         f'{", ".join(known)}')
    return timm.create_model(arch, pretrained=False, features_only=True)


def randomize_scalars_(model, seed: int):
    """StarReLU scales and biases and the res/layer scales, drawn from
    U(.5, 1.5) and N(0, .1). timm initialises them to 1 and 0, where our
    fold of StarReLU's scalars into ``fc2`` is exact whether right or
    wrong; trained weights are not at their initial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('.scale'):
                param.copy_(torch.rand(param.shape, generator=gen) + .5)
            elif name.endswith('.bias') and param.numel() == 1:
                param.copy_(.1 * torch.randn(param.shape, generator=gen))
    return model


def ours_with_weights_of(timm_model, arch: str) -> MetaFormer:
    """Our backbone holding timm's weights (our output norms stay as
    initialised: ``stage_features`` does not use them)."""
    ours = MetaFormer(arch)
    converted, _, _ = convert_metaformer_state_dict(timm_model.state_dict())
    result = ours.load_state_dict(
        match_pointwise_shapes(converted, ours.state_dict()), strict=False)
    unloaded = [k for k in result.missing_keys if not k.startswith('norm')]
    if unloaded or result.unexpected_keys:
        raise SystemExit(f'timm\'s {arch} does not map onto ours: missing '
                         f'{unloaded}, unexpected {result.unexpected_keys}')
    return ours


def max_feature_difference(ours, timm_model, x) -> float:
    """Largest difference of the stage features, relative to their
    largest magnitude."""
    with torch.no_grad():
        got, want = ours.stage_features(x), timm_model(x)
    scale = max(float(w.abs().max()) for w in want)
    return max(float((g - w).abs().max()) for g, w in zip(got, want)) / scale


def make_step(forward, model, mode, x):
    if mode == 'infer':
        def step():
            with torch.no_grad():
                forward(x)
        return step
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        sum(f.mean() for f in forward(x)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def rows_of(args, ours, timm_model):
    """name -> (model, forward) of every row."""
    rows = {'ours': (ours, ours.stage_features), 'timm': (timm_model,
                                                         timm_model)}
    if args.compiled_reference:
        rows['timm+compile'] = (timm_model, torch.compile(timm_model))
    if args.compiled_ours:
        rows['ours+compile'] = (ours, torch.compile(ours.stage_features))
    return rows


def run(args):
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    timm_model = randomize_scalars_(timm_features_model(args.arch),
                                    args.seed)
    ours = ours_with_weights_of(timm_model, args.arch)
    x = torch.randn(args.batch_size, 3, *args.size)
    time_interleaved = runpy.run_path(
        osp.join(TOOLS, 'benchmark.py'))['time_interleaved']
    difference = max_feature_difference(ours.eval(), timm_model.eval(), x)
    if difference > 1e-3:
        raise SystemExit('ours and timm disagree: their stage features '
                         f'differ by {difference:.1e} (relative)')
    report = dict(arch=args.arch, input=[args.batch_size, 3, *args.size],
                  threads=args.threads, repeats=args.repeats,
                  torch=torch.__version__,
                  max_feature_difference=difference, modes={})
    for mode in args.modes:
        for model in (ours, timm_model):
            model.train(mode == 'train')
        steps = {name: make_step(forward, model, mode, x)
                 for name, (model, forward) in rows_of(
                     args, ours, timm_model).items()}
        times = time_interleaved(steps, args.repeats, 1, 'cpu')
        report['modes'][mode] = {
            name: dict(median_ms=1e3 * statistics.median(wall),
                       min_ms=1e3 * min(wall), max_ms=1e3 * max(wall),
                       first_call_s=first)
            for name, (wall, _, first) in times.items()}
        ours_median = report['modes'][mode]['ours']['median_ms']
        for row in report['modes'][mode].values():
            row['median_over_ours'] = row['median_ms'] / ours_median
    return report


def print_report(report):
    b, c, h, w = report['input']
    print(f"{report['arch']}: {b} x {c} x {h} x {w}, fp32, "
          f"{report['threads']} threads, {report['repeats']} repeats, torch "
          f"{report['torch']}; stage features of ours and timm differ by "
          f"{report['max_feature_difference']:.1e} (relative)")
    for mode, rows in report['modes'].items():
        print(f'\n| {mode} | median ms | min-max ms | first call s | '
              'median / ours |')
        print('|---|---:|---:|---:|---:|')
        for name, r in rows.items():
            print(f"| {name} | {r['median_ms']:,.0f} | {r['min_ms']:,.0f}-"
                  f"{r['max_ms']:,.0f} | {r['first_call_s']:.1f} | "
                  f"{r['median_over_ours']:.2f} |")


def main(argv=None):
    args = parse_args(argv)
    report = run(args)
    print_report(report)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == '__main__':
    main()
