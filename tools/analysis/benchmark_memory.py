"""Peak memory (RSS) of ``tools/inference.py`` on one photo of a given size.

    python tools/analysis/benchmark_memory.py \\
        configs/fpn_poolformer_s12_ade20k.py --size 6000x4000
    python tools/analysis/benchmark_memory.py CONFIG --size 6000x4000 \\
        --keep-seg-logits      # mmseg's way: full-size fp32 logits kept

Writes a smooth random photo (JPEG) of ``--size`` (WIDTHxHEIGHT, as a
camera states it) and a randomly initialised checkpoint of CONFIG to a
temporary folder, runs ``tools/inference.py`` on them in a subprocess and
prints the subprocess's peak resident memory (``ru_maxrss``), with its wall
time. ``--keep-seg-logits`` passes ``model.keep_seg_logits=True``, which
makes the segmentor compute and keep the ``num_classes x H x W`` fp32
logits at the photo's size as mmseg's ``EncoderDecoder`` does: the memory
of the code before the row-by-row label map.

A benchmark, not a test: nothing is asserted (see docs/inference.md for
measured figures).
"""
import argparse
import os
import os.path as osp
import resource
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

import poolformer_seg  # noqa: F401  (must precede mmseg imports)
import torch
from poolformer_seg.apis import build_segmentor
from poolformer_seg.engine import add_debug_argument, run_tool

INFERENCE = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                     'inference.py')


def parse_size(text: str):
    try:
        width, height = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'--size must be WIDTHxHEIGHT, e.g. 6000x4000, got {text!r}')
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f'--size must be positive, got '
                                         f'{text!r}')
    return width, height


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Peak RSS of tools/inference.py on one photo')
    parser.add_argument('config', help='model config file')
    parser.add_argument('--size', type=parse_size, default=(6000, 4000),
                        help='photo WIDTHxHEIGHT (default: 6000x4000)')
    parser.add_argument('--keep-seg-logits', action='store_true',
                        help='keep full-size logits (mmseg\'s behaviour)')
    parser.add_argument('--threads', type=int, default=1,
                        help='OMP_NUM_THREADS of the inference run')
    add_debug_argument(parser)
    return parser.parse_args(argv)


def write_photo(path: str, width: int, height: int, seed: int = 0) -> None:
    """A smooth random colour picture: blobs as in a real photo, so that
    the model's label map has regions and the JPEG a realistic size."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(height // 64, 2), max(width // 64, 2),
                                   3), np.uint8)
    photo = cv2.resize(coarse, (width, height),
                       interpolation=cv2.INTER_CUBIC)
    if not cv2.imwrite(path, photo, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise OSError(f'cannot write {path}')


def main(argv=None):
    args = parse_args(argv)
    width, height = args.size
    with tempfile.TemporaryDirectory() as tmp:
        photo = osp.join(tmp, 'photo.jpg')
        write_photo(photo, width, height)
        checkpoint = osp.join(tmp, 'random.pth')
        torch.manual_seed(0)  # the layers' own random initialisation
        model = build_segmentor(args.config)
        torch.save({'state_dict': model.state_dict()}, checkpoint)
        del model
        cmd = [sys.executable, INFERENCE, args.config, checkpoint, photo,
               '--out-dir', osp.join(tmp, 'out'), '--device', 'cpu']
        if args.keep_seg_logits:
            cmd += ['--cfg-options', 'model.keep_seg_logits=True']
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        seconds = time.perf_counter() - start
        # Linux reports ru_maxrss in KiB: the largest of the waited-for
        # children, here the one inference run.
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if proc.returncode != 0:
        sys.exit(f'error: tools/inference.py failed:\n{proc.stdout[-3000:]}')
    mode = 'full-size logits kept (mmseg)' if args.keep_seg_logits \
        else 'row-by-row label map'
    print(f'{osp.basename(args.config)}, {width}x{height} photo '
          f'({width * height / 1e6:.1f} MP), {mode}: peak RSS '
          f'{peak / 2**30:.2f} GiB, {seconds:.1f} s '
          f'({args.threads} thread(s))')


if __name__ == '__main__':
    run_tool(main)
