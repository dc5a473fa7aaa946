"""Inference and visualisation helpers (see docs/inference.md).

Also here, imported on their own: :mod:`.complexity` (parameters and FLOPs
per model part) and :mod:`.export` (ONNX export, docs/deployment.md).
"""
from .inference import (build_segmentor, for_repeated_inference,
                        inference_model, inference_transforms, init_model,
                        load_config, predict_mask)
from .visualization import (as_palette, class_areas, colorize_mask,
                            overlay_mask, read_rgb, render_legend,
                            side_by_side, write_rgb)

__all__ = [
    'build_segmentor', 'init_model', 'for_repeated_inference',
    'inference_model', 'predict_mask',
    'load_config', 'inference_transforms', 'as_palette', 'class_areas',
    'colorize_mask', 'overlay_mask', 'render_legend', 'side_by_side',
    'read_rgb', 'write_rgb'
]
