"""Convert a PoolFormer checkpoint of any published layout to poolformer_seg's.

    python tools/convert_checkpoint.py SRC DST [--layout LAYOUT]

SRC is either a backbone/classifier checkpoint (sail-sg, mmpretrain, timm, HF
``.bin``/``.safetensors`` or model directory) or a whole segmentor checkpoint
(mmseg 1.x over mmpretrain's PoolFormer, or sail-sg's mmseg 0.x code).

* Backbone: DST holds ``{'meta', 'state_dict'}`` with our backbone keys
  (classifier heads dropped); use it with
  ``init_cfg=dict(type='Pretrained', checkpoint=DST)``.
* Segmentor: the ``backbone.*`` keys are renamed, ``neck.*``/``decode_head.*``
  and everything else of the state dict are kept; use DST with
  ``tools/test.py`` or ``load_from``. Training state (optimizer, message hub,
  schedulers) is dropped: it refers to the old parameter order.

``meta`` is kept where it is plain data (numbers, strings, lists, dicts);
anything else in it is dropped and named. A ``.safetensors`` DST holds the
tensors only. DST is written atomically (temporary file, then rename).
Loading never executes code from SRC (see poolformer_seg.utils.safe_load).
"""
import argparse
import os
import os.path as osp
import sys
import tempfile

import poolformer_seg  # noqa: F401  (compat before any mmseg import)
import torch
from poolformer_seg.engine import add_debug_argument, run_tool
from poolformer_seg.utils.layouts import (LAYOUTS, CheckpointError,
                                          convert_backbone_state_dict,
                                          convert_prefixed_keys,
                                          unwrap_state_dict)
from poolformer_seg.utils.loading import read_checkpoint

SEGMENTOR = 'mmseg-segmentor'
DESCRIPTIONS = {**{name: layout.description
                   for name, layout in LAYOUTS.items()},
                SEGMENTOR: 'mmseg 1.x / sail-sg mmseg 0.x '
                '(backbone.network.*)'}
_HEAD_PREFIXES = ('decode_head.', 'auxiliary_head.', 'neck.')
_PLAIN = (type(None), bool, int, float, str)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='checkpoint to convert (path or URL)')
    parser.add_argument('dst', help='output file (.pth or .safetensors)')
    parser.add_argument(
        '--layout', default='auto',
        choices=['auto', SEGMENTOR] + list(LAYOUTS),
        help=f'layout of SRC; auto detects it. {SEGMENTOR}: a whole mmseg '
        'segmentor (1.x or sail-sg 0.x) whose backbone.* keys are converted')
    add_debug_argument(parser)
    return parser.parse_args(argv)


def is_plain(value) -> bool:
    """True for data that holds no objects: scalars, str, lists, dicts."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v)
                   for k, v in value.items())
    return False


def split_meta(meta):
    """(kept plain entries, names of dropped entries)."""
    if not isinstance(meta, dict):
        return {}, ([] if meta is None else ['meta'])
    kept = {k: v for k, v in meta.items() if isinstance(k, str)
            and is_plain(v)}
    return kept, sorted(str(k) for k in meta if k not in kept)


def convert_segmentor(state_dict):
    """Rename the upstream backbone keys of a segmentor state dict."""
    state_dict = dict(state_dict)
    layout, count, dropped = convert_prefixed_keys(state_dict, 'backbone.')
    if layout is None:
        if any(k.startswith('backbone.stem.') for k in state_dict):
            return state_dict, 'ours', ['already in poolformer_seg layout']
        raise CheckpointError('no PoolFormer backbone keys under '
                              "'backbone.' in this segmentor checkpoint")
    if layout == 'official_feat':  # mmseg 1.x and sail-sg 0.x alike
        layout = SEGMENTOR
    notes = [f'renamed {count} backbone keys']
    if dropped:
        notes.append(f'dropped {len(dropped)} backbone tensors without a '
                     f'counterpart: {", ".join(dropped)}')
    return state_dict, layout, notes


def atomic_save(obj, dst: str):
    """Write via a temporary file in the same directory, then rename."""
    directory = osp.dirname(osp.abspath(dst))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix='.tmp',
                               prefix=f'.{osp.basename(dst)}.')
    os.close(fd)
    try:
        if dst.endswith('.safetensors'):
            from safetensors.torch import save_file
            tensors = {k: v.contiguous() for k, v in obj['state_dict'].items()}
            save_file(tensors, tmp, metadata={'format': 'pt'})
        else:
            torch.save(obj, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def convert(src: str, dst: str, layout: str = 'auto') -> list:
    """Convert SRC to DST; returns the report lines."""
    if osp.exists(dst) and osp.exists(src) and osp.samefile(src, dst):
        raise ValueError(f'DST is SRC ({src}); write to another file')
    checkpoint = read_checkpoint(src)
    state_dict = unwrap_state_dict(checkpoint)
    if not state_dict:
        raise CheckpointError(f'{src} holds no tensors')
    segmentor = layout == SEGMENTOR or (
        layout == 'auto' and any(k.startswith(_HEAD_PREFIXES)
                                 for k in state_dict))
    try:
        if segmentor:
            converted, found, notes = convert_segmentor(state_dict)
            kind = 'segmentor'
        else:
            converted, found, notes = convert_backbone_state_dict(
                state_dict, None if layout == 'auto' else layout)
            kind = 'backbone'
    except CheckpointError as err:
        raise CheckpointError(f'{src}: {err}') from None

    meta, dropped_meta = split_meta(checkpoint.get('meta') if isinstance(
        checkpoint, dict) and 'state_dict' in checkpoint else None)
    meta['poolformer_seg_converted_from'] = found
    extras = sorted(k for k in checkpoint if k not in ('meta', 'state_dict',
                                                       'model')) \
        if isinstance(checkpoint, dict) and ('state_dict' in checkpoint or
                                             'model' in checkpoint) else []
    atomic_save({'meta': meta, 'state_dict': converted}, dst)

    lines = [f'{src}: {kind} checkpoint in the {DESCRIPTIONS[found]} layout '
             f'({found})', *notes]
    if dropped_meta:
        lines.append(f'dropped meta entries that are not plain data: '
                     f'{", ".join(dropped_meta)}')
    if extras:
        lines.append(f'dropped training state: {", ".join(extras)}')
    if dst.endswith('.safetensors'):
        lines.append('.safetensors holds tensors only: meta not written')
    lines.append(f'wrote {len(converted)} tensors to {dst}')
    return lines


def main(argv=None):
    args = parse_args(argv)
    try:
        lines = convert(args.src, args.dst, args.layout)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        sys.exit(f'error: {err}')
    print('\n'.join(lines))


if __name__ == '__main__':
    run_tool(main)
