"""Inference, visualisation and export helpers (see docs/inference.md).

Import ``poolformer_seg`` (or this package) before ``mmseg.apis``: it
installs the mmcv-lite workarounds of :mod:`poolformer_seg.compat`.
"""
from .inference import (build_segmentor, inference_model, init_model,
                        load_config,
                        predict_mask, inference_transforms)
from .visualization import (as_palette, class_areas, colorize_mask,
                            overlay_mask, read_rgb, render_legend,
                            side_by_side, write_rgb)

__all__ = [
    'build_segmentor', 'init_model', 'inference_model', 'predict_mask', 'load_config',
    'inference_transforms', 'as_palette', 'class_areas', 'colorize_mask',
    'overlay_mask', 'render_legend', 'side_by_side', 'read_rgb', 'write_rgb'
]
