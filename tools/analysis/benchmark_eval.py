"""Whole evaluation wall time: ours against the upstream route.

    python tools/analysis/benchmark_eval.py configs/fpn_poolformer_s12_ade20k.py \\
        --num-images 50 --repeats 1

Writes ``--num-images`` synthetic validation images in the ADE20K layout
whose sides are drawn from 300..600 pixels, so that their aspect ratios
span 0.5..2 and the config's test pipeline (``Resize`` to a 512 short side,
``ResizeToMultiple(32)``) gives them varied sizes, as ADE20K's validation
images are. Then it runs the config's test loop over them, as
``tools/test.py`` does (``Runner.test()``: data loading, inference,
metric), once with the config's model (*ours*) and once with the upstream
route (the same config with ``model.impl='plain'`` and mmpretrain's
PoolFormer, ``tools/benchmark.py``'s reference), on the same random,
non-trivial weights, in turns. The wall time of each run counts everything
a user waits for, any ``torch.compile`` included; the number of graphs
dynamo compiled during the run is reported next to it, with the mIoU of
both models (equal weights: they should agree).

A benchmark, not a test: nothing is asserted (docs/benchmark.md has the
figures).
"""
import argparse
import copy
import importlib.util
import os
import os.path as osp
import statistics
import tempfile
import time

import poolformer_seg  # noqa: F401  (must precede mmseg imports)
import torch
from poolformer_seg.datasets.synthetic import make_ade_dataset
from poolformer_seg.engine import add_debug_argument, run_tool


def _benchmark_module():
    path = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                    'benchmark.py')
    spec = importlib.util.spec_from_file_location('benchmark', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Evaluation wall time, ours vs '
                                'the upstream route')
    p.add_argument('config')
    p.add_argument('--num-images', type=int, default=50)
    p.add_argument('--repeats', type=int, default=1,
                   help='runs per model, in turns (median reported)')
    p.add_argument('--threads', type=int, default=os.cpu_count())
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--work-dir', help='where the images go (default: a '
                   'temporary folder)')
    add_debug_argument(p)
    args = p.parse_args(argv)
    if args.num_images < 1 or args.repeats < 1:
        p.error('--num-images and --repeats must be >= 1')
    return args


def _compiled_graphs():
    from torch._dynamo.utils import counters
    return counters['stats']['unique_graphs']


def _runner(cfg, data_root, work_dir):
    from mmengine.runner import Runner
    cfg = copy.deepcopy(cfg)
    cfg.test_dataloader.dataset.data_root = data_root
    cfg.model.backbone.init_cfg = None
    cfg.work_dir = work_dir
    cfg.load_from = None
    cfg.default_hooks.pop('visualization', None)
    return Runner.from_cfg(cfg)


def evaluate(cfg, data_root, work_dir, variant, bench, seed):
    """One ``Runner.test()`` with ``variant`` ('ours' or 'reference');
    returns ``(wall seconds, graphs compiled, metrics)``."""
    from mmengine.model import revert_sync_batchnorm
    runner = _runner(cfg, data_root, work_dir)
    ours = revert_sync_batchnorm(runner.model)
    bench.randomize_(ours, seed)
    runner.model = ours if variant == 'ours' else bench.reference_of(
        cfg.model, ours)
    graphs = _compiled_graphs()
    start = time.perf_counter()
    metrics = runner.test()
    return time.perf_counter() - start, _compiled_graphs() - graphs, metrics


def main(argv=None):
    from mmengine.config import Config
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = _benchmark_module()
    cfg = Config.fromfile(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.work_dir or tmp
        data_root = osp.join(root, 'data')
        make_ade_dataset(data_root, 1, args.num_images, args.seed, 300, 600)
        results = {'ours': [], 'reference': []}
        for _ in range(args.repeats):
            for variant in results:
                results[variant].append(evaluate(
                    cfg, data_root, osp.join(root, variant), variant, bench,
                    args.seed))
    print(f'\n{args.num_images} images, {args.threads} threads, '
          f'{args.repeats} run(s) per model\n')
    print('| model | wall s (median) | runs | images/s | graphs compiled '
          '| mIoU |')
    print('|---|---|---|---|---|---|')
    medians = {}
    for variant, runs in results.items():
        walls = [wall for wall, _, _ in runs]
        medians[variant] = statistics.median(walls)
        print(f'| {variant} | {medians[variant]:.1f} '
              f'| {", ".join(f"{w:.1f}" for w in walls)} '
              f'| {args.num_images / medians[variant]:.2f} '
              f'| {max(g for _, g, _ in runs)} '
              f'| {runs[-1][2].get("mIoU", float("nan")):.2f} |')
    print(f'\nours: {medians["reference"] / medians["ours"]:.2f}x the '
          'upstream route (eager)')


if __name__ == '__main__':
    run_tool(main)
