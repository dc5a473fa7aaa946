"""Segment images and save a colour mask, an overlay and a legend per image.

    python tools/inference.py CONFIG CHECKPOINT photo.jpg
    python tools/inference.py CONFIG CHECKPOINT photos/ --out-dir vis/
    python tools/inference.py CONFIG CHECKPOINT 'photos/**/*.jpg' --opacity 0.6

INPUT is an image file, a folder (searched recursively for image files) or a
glob pattern (quote it); extensions match in any letter case (``.JPG``). A
named INPUT file that is not a regular, non-empty image is an error. Entries
of a folder or glob that are not (a named pipe, a device, an empty file) are
skipped with a warning each (so are images of a folder that cannot be
decoded), and the tool exits with status 1 after the
other images, listing them. For each image ``<name>`` it writes, under
``--out-dir`` (default ``./inference_out``), keeping sub-folders:

* ``<name>_mask.png``    the predicted classes in the dataset palette
                         (ADE20K's for the configs here), image size;
* ``<name>_overlay.png`` the mask blended over the photo (``--opacity``);
* ``<name>_legend.png``  the classes present, largest first, with their
                         share of the pixels;
* ``<name>_panel.png``   with ``--panel``: photo, overlay and legend side
                         by side in one picture.

The checkpoint is loaded strictly (see docs/inference.md).
"""
import argparse
import glob
import os.path as osp
import sys

import poolformer_seg  # noqa: F401  (must precede mmseg imports)
import mmcv
from mmengine.config import DictAction
from tqdm import tqdm

from poolformer_seg.apis import (colorize_mask, init_model, overlay_mask,
                                 predict_mask, render_legend, side_by_side,
                                 write_rgb)
from poolformer_seg.datasets import (DataError, check_input_file,
                                     file_problem, scan_folder)
from poolformer_seg.engine import add_debug_argument, run_tool
from poolformer_seg.engine.config_check import read_config

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff',
                    '.webp')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Segment images; save colour mask, overlay and legend')
    parser.add_argument('config', help='model config file')
    parser.add_argument('checkpoint', help='segmentor checkpoint')
    parser.add_argument('input', help='image file, folder, or glob pattern')
    parser.add_argument('--out-dir', default='inference_out',
                        help='output folder (default: ./inference_out)')
    parser.add_argument('--opacity', type=float, default=0.5,
                        help='mask opacity in the overlay, 0..1 '
                        '(default: 0.5)')
    parser.add_argument('--panel', action='store_true',
                        help='also write <name>_panel.png: photo | overlay '
                        '| legend')
    parser.add_argument('--device', default=None,
                        help='e.g. cpu, cuda:0 (default: cuda if available)')
    parser.add_argument('--allow-partial-load', action='store_true',
                        help='load a checkpoint that lacks some weights, '
                        'with a warning (default: error)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if not 0. <= args.opacity <= 1.:
        parser.error(f'--opacity must be in [0, 1], got {args.opacity}')
    return args


def collect_images(pattern: str):
    """``([(path, name), ...], skipped)``: ``name`` is the output name
    without suffix, relative to the folder (or the common folder of the glob
    matches); ``skipped`` lists ``(path, problem)`` for the matches of a
    folder or glob that are not regular, non-empty files (extensions match
    in any letter case).

    Raises:
        DataError: ``pattern`` names one file and it is unusable.
        FileNotFoundError: nothing matches.
    """
    skipped = []
    if osp.isdir(pattern):
        found, skipped = scan_folder(pattern, IMAGE_EXTENSIONS)
        paths, root = [osp.join(pattern, p) for p in found], pattern
    elif osp.lexists(pattern):  # one file: refuse it if it is unusable
        check_input_file(pattern, 'input image')
        paths, root = [pattern], osp.dirname(pattern)
    else:
        paths = []
        for path in sorted(glob.glob(pattern, recursive=True)):
            if osp.isdir(path) or \
                    not path.lower().endswith(IMAGE_EXTENSIONS):
                continue
            problem = file_problem(path)
            if problem is None:
                paths.append(path)
            else:
                skipped.append((path, problem))
        root = osp.commonpath([osp.dirname(osp.abspath(p)) for p in paths]) \
            if paths else ''
    if not paths:
        also = f'; skipped: {_listing(skipped)}' if skipped else ''
        raise FileNotFoundError(f'no usable image files match {pattern!r} '
                                f'(extensions, any case: '
                                f'{", ".join(IMAGE_EXTENSIONS)}){also}')
    paths = sorted(paths)
    names = [osp.splitext(osp.relpath(osp.abspath(p), osp.abspath(root)))[0]
             for p in paths]
    return list(zip(paths, names)), skipped


def _listing(skipped) -> str:
    return '; '.join(f'{path} {problem}' for path, problem in skipped)


def visualize(model, path: str, name: str, out_dir: str, opacity: float,
              panel: bool):
    """Segment ``path``; write the output files; return their paths."""
    # mmcv reads the file exactly as the test pipeline would (BGR); the same
    # array goes to the model and, as RGB, under the overlay.
    check_input_file(path, 'input image')
    image_bgr = mmcv.imread(path)
    if image_bgr is None:
        raise DataError(f'input image {path} cannot be decoded: it is '
                        'damaged or not an image')
    image = mmcv.bgr2rgb(image_bgr)
    mask = predict_mask(model, image_bgr)
    classes = model.dataset_meta['classes']
    palette = model.dataset_meta['palette']
    outputs = {
        'mask': colorize_mask(mask, palette),
        'overlay': overlay_mask(image, mask, palette, opacity),
        'legend': render_legend(mask, classes, palette),
    }
    if panel:
        outputs['panel'] = side_by_side(
            image, outputs['overlay'],
            render_legend(mask, classes, palette, height=image.shape[0]))
    files = []
    for kind, picture in outputs.items():
        files.append(osp.join(out_dir, f'{name}_{kind}.png'))
        write_rgb(files[-1], picture)
    return files


def one_pass_compile(args):
    """``init_model``'s ``compile`` for this tool, which runs each image
    once: False where the config (after ``--cfg-options``) says ``'auto'``
    (a compilation costs minutes, more than such a pass gains:
    ``compile_decision``), else None (the config's True or False)."""
    cfg = read_config(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    test_cfg = cfg.model.get('test_cfg') or {}
    return False if test_cfg.get('compile', 'auto') == 'auto' else None


def main(argv=None):
    args = parse_args(argv)
    images, skipped = collect_images(args.input)
    for path, problem in skipped:
        _warn_skipped(path, f'it {problem}')
    # one named file: its problems are errors; in a folder or glob, an
    # image that cannot be decoded is skipped like the entries above
    scanned = not osp.lexists(args.input) or osp.isdir(args.input)
    total = len(images) + len(skipped)
    model = init_model(args.config, args.checkpoint, device=args.device,
                       cfg_options=args.cfg_options,
                       allow_partial=args.allow_partial_load,
                       compile=one_pass_compile(args))
    written, done = [], 0
    for path, name in tqdm(images, desc='segmenting', unit='image',
                           disable=len(images) == 1):
        try:
            written += visualize(model, path, name, args.out_dir,
                                 args.opacity, args.panel)
            done += 1
        except DataError as err:
            if not scanned:
                raise
            skipped.append((path, str(err)))
            _warn_skipped(path, str(err))
    print(f'wrote {len(written)} files for {done} image(s) to '
          f'{args.out_dir}')
    if skipped:
        raise DataError(f'{len(skipped)} of {total} inputs were skipped '
                        f'(listed above): {_listing(skipped)}')


def _warn_skipped(path: str, why: str) -> None:
    tqdm.write(f'warning: skipped {path}: {why}', file=sys.stderr)


if __name__ == '__main__':
    run_tool(main)
