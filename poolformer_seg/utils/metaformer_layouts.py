"""Key layouts of published MetaFormer-baselines weights (detection, mapping).

Our :class:`~poolformer_seg.models.backbones.metaformer.MetaFormer` uses
timm 1.0's names plus the output norms ``norm{i}``. Layouts
(:data:`LAYOUTS`), each a marker key that identifies it and an ordered table
of ``(pattern, replacement)`` rules; the first rule whose pattern matches a
key renames it (``re.sub``), a replacement of ``None`` drops the tensor, and a
key that no rule matches keeps its name (and is then reported as unexpected
if the model has no such parameter, never silently lost):

``timm``
    timm 1.0 ``poolformerv2_*``, ``convformer_*``, ``caformer_*`` (hub
    ``.safetensors`` or ``.bin``, or a ``.pth`` of ``model.state_dict()``),
    also ``features_only`` models (``stages_{i}``) and our own backbone
    state dicts. The classifier head ``head.fc.*`` is dropped; the final
    norm ``head.norm`` (a LayerNorm applied after global pooling) fills the
    last output norm ``norm3``.
``sail-sg``
    the original sail-sg/metaformer checkpoints: ``downsample_layers.{i}``
    (``0`` is the stem, with ``post_norm``; the others have ``pre_norm``),
    blocks ``stages.{i}.{j}``, final norm ``norm`` (fills ``norm3``) and
    classifier ``head`` (dropped). The same mapping as timm's
    ``checkpoint_filter_fn``. Its pointwise layers are ``nn.Linear``
    (``[out, in]``) where ours are 1x1 convolutions (``[out, in, 1, 1]``):
    :func:`match_pointwise_shapes` reshapes them.

File reading and loading are in :mod:`poolformer_seg.utils.loading`.
"""
import re
from typing import Dict, List, Optional, Tuple

import torch

from .safe_load import CheckpointError

__all__ = ['LAYOUTS', 'detect_metaformer_layout',
           'convert_metaformer_state_dict', 'match_pointwise_shapes']

_DROP = None

# name -> (description, marker key pattern, rules)
LAYOUTS: Dict[str, Tuple[str, str, List[Tuple[str, Optional[str]]]]] = {
    'timm': (
        'timm metaformer (or poolformer_seg MetaFormer)',
        r'stem\.conv\.weight$',
        [(r'^stages_(\d+)\.', r'stages.\1.'),           # features_only
         (r'^head\.norm\.', 'norm3.'),
         (r'^head\.', _DROP)]),
    'sail-sg': (
        'sail-sg/metaformer',
        r'downsample_layers\.0\.conv\.weight$',
        [(r'^downsample_layers\.0\.conv\.', 'stem.conv.'),
         (r'^downsample_layers\.0\.post_norm\.', 'stem.norm.'),
         (r'^downsample_layers\.(\d+)\.pre_norm\.',
          r'stages.\1.downsample.norm.'),
         (r'^downsample_layers\.(\d+)\.conv\.', r'stages.\1.downsample.conv.'),
         (r'^stages\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
         (r'^norm\.', 'norm3.'),
         (r'^head\.', _DROP)]),
}
# Pointwise layers: nn.Linear in sail-sg (and in our attention stages), 1x1
# convolutions in our other stages.
_POINTWISE = re.compile(r'\.(mlp\.fc[12]|token_mixer\.pwconv[12])\.weight$')
# Keys of PoolFormer v1 checkpoints, which belong to ``type='PoolFormer'``.
_V1_MARKERS = (r'network\.\d+\.', r'patch_embed\.proj\.', r'layer_scale_\d$',
               r'stages[._]\d+\.blocks\.\d+\.mlp\.fc1\.bias')


def detect_metaformer_layout(state_dict: dict) -> str:
    """The layout name of a backbone/classifier state dict (un-prefixed).

    Raises:
        CheckpointError: no layout fits; says so for PoolFormer v1 weights.
    """
    keys = list(state_dict)
    if any(re.search(p, k) for p in _V1_MARKERS for k in keys):
        raise CheckpointError(
            'this is a PoolFormer v1 checkpoint (GELU MLPs with biases, '
            "GroupNorm with bias): load it with type='PoolFormer'; "
            "MetaFormer's poolformerv2_* is a different network")
    for name, (_, marker, _) in LAYOUTS.items():
        if any(re.match(marker, k) for k in keys):
            return name
    sample = ', '.join(keys[:6]) or '(no tensors)'
    raise CheckpointError(
        f'not a MetaFormer checkpoint of any known layout '
        f'({", ".join(LAYOUTS)}); its first keys are: {sample}')


def _rename(key: str, rules) -> Optional[str]:
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return _DROP if replacement is _DROP else \
                re.sub(pattern, replacement, key, count=1)
    return key


def convert_metaformer_state_dict(state_dict: dict,
                                  layout: Optional[str] = None
                                  ) -> Tuple[Dict[str, torch.Tensor], str,
                                             List[str]]:
    """Rename a MetaFormer state dict to our names.

    Args:
        state_dict (dict): un-prefixed backbone or classifier tensors.
        layout (str, optional): force a layout instead of detecting it.

    Returns:
        tuple: ``(converted, layout, notes)``: tensors under our names, the
        layout, and sentences saying what was dropped and where ``norm3``
        came from.
    """
    if layout is None:
        layout = detect_metaformer_layout(state_dict)
    elif layout not in LAYOUTS:
        raise ValueError(f'layout={layout!r} is not one of {list(LAYOUTS)}')
    rules = LAYOUTS[layout][2]
    converted, dropped, renamed_norm3 = {}, [], []
    for key, value in state_dict.items():
        new = _rename(key, rules)
        if new is _DROP:
            dropped.append(key)
            continue
        if new in converted:
            raise CheckpointError(f'two keys map to {new!r}; the '
                                  f'{LAYOUTS[layout][0]} checkpoint is '
                                  'malformed')
        if new.startswith('norm3.') and not key.startswith('norm3.'):
            renamed_norm3.append(key)
        converted[new] = value
    notes = []
    if dropped:
        notes.append(f'dropped the classifier head ({len(dropped)} tensors: '
                     f'{", ".join(dropped[:4])}'
                     f'{" ..." if len(dropped) > 4 else ""})')
    if renamed_norm3:
        notes.append(f'norm3 filled from the classifier\'s final norm '
                     f'({", ".join(renamed_norm3)}; trained after global '
                     'pooling, applied here at every position)')
    return converted, layout, notes


def match_pointwise_shapes(converted: dict, expected: dict) -> dict:
    """Reshape pointwise weights between ``nn.Linear`` ``[out, in]`` and 1x1
    convolution ``[out, in, 1, 1]`` where the model expects the other form.

    Only the pointwise layers (``mlp.fc1/fc2``, ``token_mixer.pwconv1/2``)
    are touched; any other shape difference is left for the caller to
    report.
    """
    out = dict(converted)
    for key, value in converted.items():
        target = expected.get(key)
        if target is None or value.shape == target.shape or \
                not _POINTWISE.search(key):
            continue
        if value.shape[:2] == target.shape[:2] and \
                value.numel() == target.numel():
            out[key] = value.reshape(target.shape)
    return out
