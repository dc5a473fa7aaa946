"""Parameters and FLOPs of a segmentor per part (backbone, neck, head).

    python tools/analysis/get_flops.py configs/fpn_poolformer_s12_ade20k.py
    python tools/analysis/get_flops.py CONFIG --shape 512 1024
    python tools/analysis/get_flops.py CONFIG --params-only --json out.json

FLOPs are counted by MMEngine's FlopAnalyzer for one 3 x H x W image
(default 512 x 512) from the image to the 1/4-resolution logits, with one
multiply-add counted as one FLOP (the convention of mmpretrain/mmseg model
zoos), on the plain computation of the model (``model.impl='plain'``: the
same function and parameters). Element-wise ops without a formula (PoolFormer's pooling mixer, GELU,
residual additions) are not counted and are listed. See
poolformer_seg/apis/complexity.py and docs/model_zoo.md.
"""
import argparse
import json

import poolformer_seg  # noqa: F401  (must precede mmseg imports)
from mmengine.config import Config, DictAction

from poolformer_seg.apis.complexity import count_flops, count_parameters
from poolformer_seg.apis.inference import build_segmentor
from poolformer_seg.engine import add_debug_argument, run_tool


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Parameters and FLOPs per model part')
    parser.add_argument('config', help='model config file')
    parser.add_argument('--shape', type=int, nargs='+', default=[512, 512],
                        metavar='N',
                        help='input size: H W, or one number for a square '
                        '(default: 512 512)')
    parser.add_argument('--params-only', action='store_true',
                        help='count parameters only (no forward pass)')
    parser.add_argument('--json', metavar='FILE',
                        help='also write the numbers to a JSON file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if len(args.shape) == 1:
        args.shape = args.shape * 2
    if len(args.shape) != 2 or min(args.shape) < 32:
        parser.error(f'--shape takes H W (each >= 32), got {args.shape}')
    return args


def format_table(params: dict, flops: dict = None) -> str:
    rows = [('part', 'params', 'GFLOPs' if flops else '')]
    parts = list(params)
    if flops and 'other' in flops:
        parts.insert(-1, 'other')
    for part in parts:
        count = f'{params[part]:,}' if part in params else '-'
        rows.append((part, count,
                     f'{flops[part] / 1e9:.2f}' if flops else ''))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f'{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}'.rstrip()
             for a, b, c in rows]
    lines.insert(1, '-' * len(lines[0]))
    lines.insert(len(lines) - 1, '-' * len(lines[0]))
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    options = dict(args.cfg_options or {})
    if not args.params_only and \
            'impl' in Config.fromfile(args.config).get('model', {}):
        # FLOPs of the function, counted on its plain computation (the
        # same parameters; see poolformer_seg/apis/complexity.py)
        options['model.impl'] = 'plain'
    model = build_segmentor(args.config, options)
    params = count_parameters(model)
    result = dict(config=args.config, params=params)
    flops = uncounted = None
    if not args.params_only:
        flops, uncounted = count_flops(model, args.shape)
        result.update(input_shape=[3, *args.shape], flops=flops,
                      uncounted_ops=dict(uncounted))
    print(f'config: {args.config}')
    if flops:
        print(f'input: 3 x {args.shape[0]} x {args.shape[1]}  '
              '(1 multiply-add = 1 FLOP; image -> 1/4-res logits)')
    print(format_table(params, flops))
    if uncounted:
        calls = ', '.join(f'{op.replace("aten::", "")} x{n}'
                          for op, n in sorted(uncounted.items()))
        print(f'not counted (no FLOP formula): {calls}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
        print(f'wrote {args.json}')


if __name__ == '__main__':
    run_tool(main)
