"""Export a trained segmentor to ONNX (dynamic batch, height and width).

    python tools/export_onnx.py configs/fpn_poolformer_s12_ade20k.py \\
        work_dirs/fpn_poolformer_s12_ade20k/iter_40000.pth --out s12.onnx

The graph takes ``image``: N x 3 x H x W float32 RGB in 0..255, already
resized by the test pipeline (any H, W >= 64), and returns ``logits``
(N x C x H x W) and ``labels`` (N x H x W int64). Normalisation, the
upsampling of the logits to H x W and the argmax are inside; the test-time
resize and the final resize to the photo's size are not (docs/deployment.md
shows both, and ``poolformer_seg.apis.export.preprocess/postprocess`` do
them). After writing the file, onnxruntime runs it at the traced size and at
a second size (3/4 of it plus 1 px, not a multiple of 32) and the outputs
are compared with PyTorch's; the tool fails if they differ by more than
``--atol`` + ``--rtol`` x max|logit|.
"""
import argparse
import os
import os.path as osp
import sys

import poolformer_seg  # noqa: F401  (must precede mmseg imports)
import numpy as np
import torch
from mmengine.config import DictAction

from poolformer_seg.apis import init_model
from poolformer_seg.apis.export import MIN_EXPORT_SIZE, export_onnx
from poolformer_seg.engine import add_debug_argument, run_tool


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export a segmentor to ONNX and check it with '
        'onnxruntime')
    parser.add_argument('config', help='model config file')
    parser.add_argument('checkpoint', help='segmentor checkpoint')
    parser.add_argument('--out', required=True, help='output .onnx file')
    parser.add_argument('--shape', type=int, nargs=2, default=[512, 512],
                        metavar=('H', 'W'),
                        help='size to trace with (default: 512 512); the '
                        'exported graph accepts any size')
    parser.add_argument('--opset', type=int, default=18,
                        help='ONNX opset (default: 18)')
    parser.add_argument('--atol', type=float, default=1e-4,
                        help='absolute tolerance of the check (default: '
                        '1e-4)')
    parser.add_argument('--rtol', type=float, default=1e-5,
                        help='tolerance relative to max|logit| (default: '
                        '1e-5)')
    parser.add_argument('--allow-partial-load', action='store_true',
                        help='load a checkpoint that lacks some weights, '
                        'with a warning (default: error)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if min(args.shape) < MIN_EXPORT_SIZE * 4 // 3:
        parser.error(f'--shape must be at least {MIN_EXPORT_SIZE * 4 // 3} '
                     'px per side (the check also runs at 3/4 of it)')
    return args


def check_sizes(shape):
    """The traced size and one more that is not a multiple of 32."""
    return [tuple(shape), tuple(s * 3 // 4 + 1 for s in shape)]


def compare(session, wrapper, shape, seed=0):
    """Run ONNX and PyTorch on one random 1 x 3 x H x W image.

    Returns ``(max |logit diff|, max |logit|, fraction of equal labels)``.
    """
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, *shape, generator=generator) * 255
    with torch.no_grad():
        logits, labels = wrapper(image)
    onnx_logits, onnx_labels = session.run(None, {'image': image.numpy()})
    diff = float(np.abs(onnx_logits - logits.numpy()).max())
    return (diff, float(logits.abs().max()),
            float((onnx_labels == labels.numpy()).mean()))


def main(argv=None):
    args = parse_args(argv)
    try:
        import onnxruntime as ort
    except ImportError:
        sys.exit('error: the check needs onnxruntime: pip install -e '
                 '".[deploy]" (onnx, onnxruntime, onnxscript)')
    model = init_model(args.config, args.checkpoint, device='cpu',
                       cfg_options=args.cfg_options,
                       allow_partial=args.allow_partial_load)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    wrapper = export_onnx(model, args.out, args.shape, args.opset)
    size_mb = osp.getsize(args.out) / 2**20
    print(f'wrote {args.out} ({size_mb:.1f} MiB, opset {args.opset})')
    session = ort.InferenceSession(args.out,
                                   providers=['CPUExecutionProvider'])
    failed = False
    for shape in check_sizes(args.shape):
        diff, scale, agree = compare(session, wrapper, shape)
        ok = diff <= args.atol + args.rtol * scale
        failed |= not ok
        print(f'check {shape[0]}x{shape[1]}: max |logit diff| {diff:.2e} '
              f'(max |logit| {scale:.2f}), labels equal {100 * agree:.3f}%'
              f' -> {"ok" if ok else "MISMATCH"}')
    if failed:
        sys.exit('error: ONNX outputs differ from PyTorch beyond the '
                 'tolerance')


if __name__ == '__main__':
    run_tool(main)
