"""Write a small synthetic dataset in the ADE20K layout.

Example:
    python tools/make_ade_dataset.py data/ade_synthetic --num-train 40 \\
        --num-val 10 --seed 0

Then train on it with
    --cfg-options train_dataloader.dataset.data_root=data/ade_synthetic \\
        val_dataloader.dataset.data_root=data/ade_synthetic \\
        test_dataloader.dataset.data_root=data/ade_synthetic
See poolformer_seg/datasets/synthetic.py for what the images contain.
"""
import argparse
import sys

from poolformer_seg.datasets.synthetic import CLASSES, make_ade_dataset
from poolformer_seg.engine import add_debug_argument, run_tool


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Write a small synthetic ADE20K-layout dataset')
    parser.add_argument('out_dir', help='dataset root to create (must not '
                        'contain images/ or annotations/ yet)')
    parser.add_argument('--num-train', type=int, default=40)
    parser.add_argument('--num-val', type=int, default=10)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--min-size', type=int, default=160,
                        help='smallest image side in pixels')
    parser.add_argument('--max-size', type=int, default=360,
                        help='largest image side in pixels')
    add_debug_argument(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        written = make_ade_dataset(args.out_dir, args.num_train, args.num_val,
                                   args.seed, args.min_size, args.max_size)
    except (ValueError, FileExistsError) as err:
        sys.exit(f'make_ade_dataset: {err}')
    labels = ', '.join(f'{c.label} {c.name}' for c in CLASSES)
    print(f'wrote {len(written["training"])} training and '
          f'{len(written["validation"])} validation images to '
          f'{args.out_dir} (classes: {labels}; 0 = other)')


if __name__ == '__main__':
    run_tool(main)
