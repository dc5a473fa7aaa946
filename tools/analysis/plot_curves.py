"""Plot training curves (loss, learning rate, mIoU...) of one or more runs.

    python tools/analysis/plot_curves.py work_dirs/s12 work_dirs/s24 \\
        --keys loss lr mIoU --out curves.png

Each RUN is a work dir (all ``<timestamp>/vis_data/scalars.json`` in it are
read in time order, so a resumed run continues its curve), a
``<timestamp>`` dir, or a ``scalars.json`` file: the scalars MMEngine's
``LoggerHook`` writes with ``LocalVisBackend`` (the default here). One
subplot per key, one line per run, iterations on the x axis. Training keys
(``loss``, ``decode.loss_ce``, ``lr``...) come from the training rows,
validation keys (``mIoU``, ``aAcc``, ``mAcc``) from the validation rows
(drawn with markers); where both have a key (``time``), the training rows
win. If one step appears twice (a resumed run re-logging), the later row
counts.
"""
import argparse
import glob
import json
import os.path as osp
import sys
from typing import Dict, List, Tuple

import matplotlib

matplotlib.use('Agg')  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from poolformer_seg.datasets import check_input_file  # noqa: E402
from poolformer_seg.engine import add_debug_argument, run_tool  # noqa: E402

Curve = Tuple[List[int], List[float]]


def find_scalar_files(run: str) -> List[str]:
    """The ``scalars.json`` files of a run, oldest first."""
    if osp.lexists(run) and not osp.isdir(run):
        check_input_file(run, 'scalars file',
                         fix='pass a work dir or a scalars.json file')
        return [run]
    if not osp.isdir(run):
        raise FileNotFoundError(f'run {run!r} is neither a work dir nor a '
                                'scalars.json file')
    files = sorted(glob.glob(osp.join(run, '*', 'vis_data', 'scalars.json')))
    files = files or glob.glob(osp.join(run, 'vis_data', 'scalars.json'))
    if not files:
        raise FileNotFoundError(
            f'no <timestamp>/vis_data/scalars.json under {run!r}; was it '
            'trained with LocalVisBackend (vis_backends in the config)?')
    return files


def _is_train_row(row: dict) -> bool:
    # LoggerHook writes 'iter' (and 'lr') only into training rows.
    return 'iter' in row or 'lr' in row


def load_curves(run: str) -> Dict[str, Dict[str, Curve]]:
    """``{'train': {key: (steps, values)}, 'val': {...}}`` of one run."""
    by_step = {'train': {}, 'val': {}}
    for path in find_scalar_files(run):
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f'{path}:{number}: not JSON ({err})')
                if 'step' not in row:
                    raise ValueError(f'{path}:{number}: row has no "step"')
                split = by_step['train' if _is_train_row(row) else 'val']
                for key, value in row.items():
                    if key not in ('step', 'iter', 'epoch') and \
                            isinstance(value, (int, float)):
                        split.setdefault(key, {})[row['step']] = value
    return {split: {key: (sorted(points), [points[s] for s in
                                           sorted(points)])
                    for key, points in keys.items()}
            for split, keys in by_step.items()}


def select(curves: dict, key: str):
    """``(steps, values, is_val)`` of ``key``, or None if the run lacks it."""
    if key in curves['train']:
        return (*curves['train'][key], False)
    if key in curves['val']:
        return (*curves['val'][key], True)
    return None


def plot(runs: Dict[str, dict], keys: List[str], out: str,
         title: str = None) -> None:
    """Write one PNG: a subplot per key, a line per run."""
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)),
                             sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for i, curves in enumerate(runs.values()):
            found = select(curves, key)
            if found is None:
                continue
            steps, values, is_val = found
            # One colour per run in every subplot, even where a run lacks
            # a key.
            ax.plot(steps, values, color=f'C{i % 10}', linewidth=1.2,
                    marker='o' if is_val else None, markersize=4)
        ax.set_ylabel(key)
        ax.grid(alpha=.3)
        if key == 'lr':
            ax.ticklabel_format(axis='y', style='sci', scilimits=(0, 0))
    handles = [Line2D([], [], color=f'C{i % 10}', label=label)
               for i, label in enumerate(runs)]
    axes[0, 0].legend(handles=handles, fontsize='small')
    axes[-1, 0].set_xlabel('iteration')
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Plot loss / lr / metric curves of training runs')
    parser.add_argument('runs', nargs='+',
                        help='work dirs, <timestamp> dirs or scalars.json')
    parser.add_argument('--keys', nargs='+', default=['loss', 'lr', 'mIoU'],
                        help='scalars to plot (default: loss lr mIoU)')
    parser.add_argument('--labels', nargs='+',
                        help='legend names, one per run (default: the '
                        'folder names)')
    parser.add_argument('--out', default='curves.png',
                        help='output image (default: curves.png)')
    parser.add_argument('--title', help='figure title')
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f'--labels needs one name per run ({len(args.runs)}), '
                     f'got {len(args.labels)}')
    return args


def main(argv=None):
    args = parse_args(argv)
    labels = args.labels or [osp.basename(osp.normpath(run))
                             for run in args.runs]
    try:
        runs = {label: load_curves(run)
                for label, run in zip(labels, args.runs)}
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f'error: {err}')
    for key in args.keys:
        if not any(select(curves, key) for curves in runs.values()):
            available = sorted({k for c in runs.values()
                                for split in c.values() for k in split})
            sys.exit(f'error: no run logged {key!r}; available keys: '
                     f'{", ".join(available)}')
    plot(runs, args.keys, args.out, args.title)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    run_tool(main)
