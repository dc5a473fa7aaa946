"""ONNX export of a segmentor with dynamic batch, height and width.

What the exported graph contains (see docs/deployment.md):

* input ``image``: ``N x 3 x H x W`` float32, **RGB**, values 0..255, the
  image *after* the test pipeline's resizing (for the configs here: short
  side 512, long side at most 2048, then each side made a multiple of 32;
  the graph itself accepts any H, W >= 64);
* **included**: the normalisation of ``SegDataPreProcessor`` (mean/std, and
  the channel order the network was trained with), backbone, neck, decode
  head, the bilinear upsampling of the 1/4-resolution logits to H x W, and
  the argmax;
* outputs ``logits`` (``N x C x H x W`` float32) and ``labels``
  (``N x H x W`` int64, class indices);
* **left out**: reading the file, the test-time resize (mmseg does it with
  OpenCV on uint8 pixels; an in-graph resize would give slightly different
  pixels), and resizing the prediction back to the original photo size.
  :func:`preprocess` and :func:`postprocess` do these the way
  ``inference_model`` does.
"""
import copy
import json
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.dataset import Compose
from mmseg.models.utils import Upsample

from .inference import inference_transforms

__all__ = ['SegmentorForExport', 'export_onnx', 'preprocess', 'postprocess',
           'MIN_EXPORT_SIZE']

# The trace requires the stride-32 feature map to be larger than 1 x 1.
MIN_EXPORT_SIZE = 64


class _ShapeUpsample(nn.Module):
    """``mmseg.models.utils.Upsample`` with an integer scale factor, written
    so that tracing keeps the output size symbolic.

    mmseg's version computes ``int(size * scale)``, which a trace freezes to
    the example input's size: the exported graph would then be wrong (not
    failing) at every other size.
    """

    def __init__(self, scale: int, mode: str, align_corners):
        super().__init__()
        self.scale, self.mode, self.align_corners = scale, mode, align_corners

    def forward(self, x):
        size = (x.shape[-2] * self.scale, x.shape[-1] * self.scale)
        return F.interpolate(x, size=size, mode=self.mode,
                             align_corners=self.align_corners)


def _plain_modules(module: nn.Module) -> None:
    """The plain implementation of our fast modules, for tracing.

    PoolFormer backbones get ``set_impl('plain')``: the fused block's
    inference path reuses folded weights keyed by tensor addresses, which
    ``torch.export`` cannot trace; the plain block computes the same
    function (and ONNX runtimes fuse it themselves). ``FastFPN`` and the
    fast heads hold exactly the modules and settings of the mmseg classes
    they derive from (``FPN``, ``FPNHead``, ``UPerHead``, ``FCNHead``) and
    override only how they compute (storage checks that fake tensors cannot
    answer, resizes skipped when the traced example's sizes happen to
    match, Winograd convolutions), so they become those classes.
    """
    from poolformer_seg.models import FastFPN, PoolFormer
    from poolformer_seg.models.decode_heads import FastDecodeHead
    from poolformer_seg.models.decode_heads.fast_head import mmseg_base
    for child in list(module.modules()):
        if isinstance(child, PoolFormer):
            child.set_impl('plain')
        elif isinstance(child, (FastFPN, FastDecodeHead)):
            child.__class__ = mmseg_base(type(child))


def _replace_upsamples(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, Upsample) and not child.size:
            scale = child.scale_factor
            if isinstance(scale, tuple) or scale != int(scale):
                raise ValueError(f'cannot export Upsample {name} with scale '
                                 f'{scale}: only integer factors keep the '
                                 'output size exact')
            setattr(module, name, _ShapeUpsample(int(scale), child.mode,
                                                 child.align_corners))
        else:
            _replace_upsamples(child)


class SegmentorForExport(nn.Module):
    """Wrap an ``EncoderDecoder``: RGB 0..255 image -> (logits, labels).

    The wrapped segmentor is a deep copy (the original is not modified).
    Input ``N x 3 x H x W`` float; outputs ``N x C x H x W`` logits at the
    input size and ``N x H x W`` int64 labels.
    """

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        for part in ('backbone', 'decode_head', 'data_preprocessor'):
            if not hasattr(segmentor, part):
                raise ValueError(f'expected an mmseg EncoderDecoder, but '
                                 f'{type(segmentor).__name__} has no {part}')
        if getattr(segmentor, 'test_cfg', {}).get('mode', 'whole') != 'whole':
            raise ValueError('only test_cfg.mode="whole" is exported (the '
                             'sliding window needs a loop over the image)')
        model = copy.deepcopy(segmentor).cpu().eval()
        _replace_upsamples(model)
        _plain_modules(model)
        preprocessor = model.data_preprocessor
        self.segmentor = model
        self.align_corners = model.decode_head.align_corners
        # Images are loaded BGR; the preprocessor converts them to RGB when
        # bgr_to_rgb is set. Our input is RGB, so reverse only if the
        # network was trained on BGR.
        self.to_bgr = not preprocessor.channel_conversion
        mean = preprocessor.mean if preprocessor._enable_normalize else \
            torch.zeros(3, 1, 1)
        std = preprocessor.std if preprocessor._enable_normalize else \
            torch.ones(3, 1, 1)
        self.register_buffer('mean', mean.detach().view(1, -1, 1, 1).clone())
        self.register_buffer('std', std.detach().view(1, -1, 1, 1).clone())

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor,
                                                    torch.Tensor]:
        if self.to_bgr:
            image = image.flip(1)
        x = (image - self.mean) / self.std
        logits = self.segmentor.decode_head(self.segmentor.extract_feat(x))
        logits = F.interpolate(logits, size=image.shape[-2:],
                               mode='bilinear',
                               align_corners=self.align_corners)
        return logits, logits.argmax(dim=1)


def export_onnx(segmentor: nn.Module, path: str,
                example_shape: Sequence[int] = (512, 512),
                opset_version: int = 18) -> SegmentorForExport:
    """Export ``segmentor`` to ``path`` with dynamic N, H and W.

    Uses the ``torch.export``-based exporter (``dynamo=True``, the default
    since torch 2.9; needs ``onnxscript``). ``example_shape`` is only the
    size traced with. Class names and palette (``segmentor.dataset_meta``,
    if set) are stored in the model's metadata as JSON (``classes``,
    ``palette``). Returns the wrapper that was exported.
    """
    import onnx
    if min(example_shape) < MIN_EXPORT_SIZE:
        raise ValueError(f'example_shape must be at least {MIN_EXPORT_SIZE} '
                         f'px per side, got {tuple(example_shape)}')
    wrapper = SegmentorForExport(segmentor).eval()
    # Batch 2: torch.export specialises dimensions of size 1.
    example = torch.rand(2, 3, *example_shape,
                         generator=torch.Generator().manual_seed(0)) * 255
    dims = dict(batch=torch.export.Dim('batch'),
                height=torch.export.Dim('height', min=MIN_EXPORT_SIZE),
                width=torch.export.Dim('width', min=MIN_EXPORT_SIZE))
    with torch.no_grad():
        torch.onnx.export(
            wrapper, (example, ), path, input_names=['image'],
            output_names=['logits', 'labels'],
            dynamic_shapes={'image': {0: dims['batch'], 2: dims['height'],
                                      3: dims['width']}},
            opset_version=opset_version, dynamo=True, external_data=False,
            verbose=False)
    meta = getattr(segmentor, 'dataset_meta', None) or {}
    props = {'input': 'image: N x 3 x H x W float32 RGB 0..255, resized by '
             'the test pipeline; normalisation is inside the graph',
             'outputs': 'logits: N x C x H x W; labels: N x H x W int64'}
    for key in ('classes', 'palette'):
        if key in meta:
            props[key] = json.dumps([list(v) if isinstance(v, tuple) else v
                                     for v in meta[key]])
    model = onnx.load(path)
    onnx.helper.set_model_props(model, props)
    onnx.save(model, path)
    return wrapper


def preprocess(cfg, image_bgr: np.ndarray) -> np.ndarray:
    """Resize a BGR uint8 photo with the config's test transforms and return
    the ONNX input: ``1 x 3 x H' x W'`` float32 RGB."""
    pipeline = Compose([dict(type='LoadImageFromNDArray')] +
                       inference_transforms(cfg))
    resized = pipeline(dict(img=image_bgr))['inputs']  # 3 x H' x W' BGR
    return resized.flip(0).float().unsqueeze(0).numpy()


def postprocess(logits: np.ndarray, original_shape: Sequence[int],
                align_corners: bool = False) -> np.ndarray:
    """Resize ``1 x C x H' x W'`` logits to the photo's ``(H, W)`` and take
    the argmax, as mmseg's ``postprocess_result`` does: ``H x W`` int64."""
    resized = F.interpolate(torch.from_numpy(logits), size=original_shape[:2],
                            mode='bilinear', align_corners=align_corners)
    return resized.argmax(dim=1)[0].numpy()
