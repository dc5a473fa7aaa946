"""Parameters and FLOPs of a segmentor, per part (backbone, neck, heads).

FLOPs follow MMEngine's :class:`~mmengine.analysis.FlopAnalyzer` (the fvcore
convention that mmpretrain's and mmseg's published numbers use): **one
multiply-add counts as one FLOP** (so these are MACs), convolutions and
matrix products count fully, norms and bilinear/nearest upsampling count a
few FLOPs per element, and the other element-wise ops are not counted. For
PoolFormer that leaves out the pooling token mixer (``avg_pool2d``), the
subtraction and residual additions, GELU and the layer scales; they are
reported as ``uncounted``.

The forward pass measured is ``EncoderDecoder(mode='tensor')``: image ->
logits at 1/4 resolution. The final upsampling of the logits to the image
size (in post-processing) is not included.

FLOPs are those of the function, counted on its plain computation
(``model.impl='plain'``): the fast path's fused blocks are custom autograd
functions the tracer cannot look into, and its Winograd convolutions do
fewer multiplications than the convolution they compute.
"""
from collections import Counter
from typing import Dict, Sequence

import torch
from mmengine.analysis import FlopAnalyzer

__all__ = ['MODEL_PARTS', 'count_parameters', 'count_flops']

MODEL_PARTS = ('backbone', 'neck', 'decode_head', 'auxiliary_head')


def _parts(model) -> list:
    parts = [name for name in MODEL_PARTS
             if getattr(model, name, None) is not None]
    if 'backbone' not in parts:
        raise ValueError(f'{type(model).__name__} has no backbone; expected '
                         'an mmseg segmentor such as EncoderDecoder')
    return parts


def count_parameters(model: torch.nn.Module) -> Dict[str, int]:
    """``{part: parameters, ..., 'total': all}`` (trainable or not)."""
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters())
              for name in _parts(model)}
    counts['total'] = sum(p.numel() for p in model.parameters())
    return counts


def count_flops(model: torch.nn.Module, input_shape: Sequence[int]):
    """FLOPs (multiply-adds) of one ``3 x H x W`` image, per part.

    Args:
        model: an mmseg segmentor in eval mode (auxiliary heads are not run
            at inference and count 0).
        input_shape: ``(H, W)``.

    Returns:
        ``(flops, uncounted)``: ``flops`` is ``{part: FLOPs, ...,
        'total': ...}``, plus ``'other'`` for ops that the tracer attributes
        to the segmentor itself rather than to a part; ``uncounted`` a
        :class:`Counter` of the operators that were run but have no FLOP
        formula (name -> calls).
    """
    if len(input_shape) != 2 or min(input_shape) < 1:
        raise ValueError(f'input_shape must be (H, W), got {input_shape}')
    if getattr(model, 'impl', 'plain') != 'plain':
        raise ValueError(
            f'count_flops counts the plain computation: build the model with '
            f"model.impl='plain' (got impl={model.impl!r}; the same weights "
            f'and function, computed module by module)')
    param = next(model.parameters())
    image = torch.zeros(1, 3, *input_shape, dtype=param.dtype,
                        device=param.device)
    analyzer = FlopAnalyzer(model, inputs=(image, ))
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    by_module = analyzer.by_module()
    flops = {name: int(by_module.get(name, 0)) for name in _parts(model)}
    total = int(analyzer.total())
    # The tracer files a few ops under the top module, e.g. the resizes
    # with which mmseg's FPNHead adds up its scale heads.
    if total != sum(flops.values()):
        flops['other'] = total - sum(flops.values())
    flops['total'] = total
    return flops, Counter(analyzer.unsupported_ops())
