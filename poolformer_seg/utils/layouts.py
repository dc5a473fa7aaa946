"""PoolFormer (v1) checkpoint layouts: detection and key mapping.

Pure functions on state dicts; reading files and loading them into a model
live in :mod:`poolformer_seg.utils.loading`. The full table with examples is
in ``docs/checkpoints.md``.

================= ===========================================================
``ours``          poolformer_seg: ``stem.proj``, ``stages.{s}.downsample.proj``,
                  ``stages.{s}.blocks.{j}.{norm1,norm2,mlp.fc1,mlp.fc2,
                  layer_scale1,layer_scale2}``, output norms ``norm{s}``
``official``      sail-sg classifier: ``patch_embed.proj``, ``network.{k}``,
                  final ``norm``, ``head``
``official_feat`` sail-sg ``fork_feat`` backbone, also an mmpretrain
                  backbone state dict: ``network.{k}`` and ``norm{0,2,4,6}``
``mmpretrain``    the same names under ``backbone.``: mmpretrain classifiers
                  (``backbone.norm6``, ``head.fc``) and mmseg segmentors
``timm``          ``stem.conv``, ``stages.{s}.downsample.conv``,
                  ``stages.{s}.blocks.{j}`` with ``layer_scale1.scale``,
                  ``head.norm``/``head.fc``; ``stages_{s}`` for features_only
``hf``            transformers ``PoolFormerModel`` (``encoder.patch_embeddings``,
                  ``encoder.block``) or ``PoolFormerForImageClassification``
                  (the same under ``poolformer.``, plus ``norm``, ``classifier``)
================= ===========================================================

Upstream numbers the 7 entries of ``network`` (4 stages, 3 downsampling
convs in between) and names output norms after them (``norm0/2/4/6``); we
number the 4 stages, so ``network.{2s}`` is our ``stages.{s}.blocks``,
``network.{2s-1}`` our ``stages.{s}.downsample`` and ``norm{2s}`` our
``norm{s}``. The final norm of a classifier (sail-sg and HF ``norm``,
mmpretrain ``norm6``, timm ``head.norm``) fills ``norm3``, as mmseg's own
PoolFormer configs do; classifier heads are dropped.

Each layout has one key function (the ``key`` column of :data:`LAYOUTS`):
it maps an un-prefixed key to our name, to :data:`DROP` (classifier parts),
or returns it unchanged when it does not know it, so that the key is
reported as unexpected and never silently lost.
"""
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from .safe_load import CheckpointError

__all__ = [
    'DROP', 'LAYOUTS', 'Conversion', 'detect_layout', 'unwrap_state_dict',
    'convert_backbone', 'convert_backbone_state_dict',
    'convert_prefixed_keys'
]

DROP = None  # what a key function returns for tensors deliberately dropped


def _official_key(key: str) -> Optional[str]:
    m = re.match(r'patch_embed\.proj\.(.+)$', key)
    if m:
        return f'stem.proj.{m[1]}'
    m = re.match(r'network\.(\d+)\.proj\.(.+)$', key)
    if m and int(m[1]) % 2 == 1:
        return f'stages.{(int(m[1]) + 1) // 2}.downsample.proj.{m[2]}'
    m = re.match(r'network\.(\d+)\.(\d+)\.(.+)$', key)
    if m and int(m[1]) % 2 == 0:
        rest = re.sub(r'^layer_scale_(\d)$', r'layer_scale\1', m[3])
        return f'stages.{int(m[1]) // 2}.blocks.{m[2]}.{rest}'
    m = re.match(r'norm(\d+)\.(.+)$', key)
    if m:  # odd indices normalise a downsampling output: no counterpart
        return f'norm{int(m[1]) // 2}.{m[2]}' if int(m[1]) % 2 == 0 else DROP
    m = re.match(r'norm\.(.+)$', key)
    if m:
        return f'norm3.{m[1]}'
    return DROP if key.startswith('head.') else key


def _timm_key(key: str) -> Optional[str]:
    key = re.sub(r'^stages_(\d+)\.', r'stages.\1.', key)  # features_only
    key = re.sub(r'^stem\.conv\.', 'stem.proj.', key)
    key = re.sub(r'^(stages\.\d+\.downsample)\.conv\.', r'\1.proj.', key)
    key = re.sub(r'\.layer_scale(\d)\.scale$', r'.layer_scale\1', key)
    if key.startswith('head.norm.'):
        return 'norm3.' + key[len('head.norm.'):]
    return DROP if key.startswith('head.') else key


_HF_BLOCK = {'before_norm': 'norm1', 'after_norm': 'norm2',
             'output.conv1': 'mlp.fc1', 'output.conv2': 'mlp.fc2',
             'layer_scale_1': 'layer_scale1', 'layer_scale_2': 'layer_scale2'}


def _hf_key(key: str) -> Optional[str]:
    m = re.match(r'encoder\.patch_embeddings\.(\d+)\.projection\.(.+)$', key)
    if m:
        stage = int(m[1])
        return (f'stem.proj.{m[2]}' if stage == 0 else
                f'stages.{stage}.downsample.proj.{m[2]}')
    m = re.match(r'encoder\.block\.(\d+)\.(\d+)\.(.+?)(\.weight|\.bias|)$',
                 key)
    if m and m[3] in _HF_BLOCK:
        return f'stages.{m[1]}.blocks.{m[2]}.{_HF_BLOCK[m[3]]}{m[4]}'
    m = re.match(r'norm\.(.+)$', key)
    if m:
        return f'norm3.{m[1]}'
    return DROP if key.startswith('classifier.') else key


class Layout(NamedTuple):
    """One row of :data:`LAYOUTS`."""
    description: str  # in logs and errors
    key: Callable[[str], Optional[str]]  # un-prefixed key -> ours or DROP
    prefix: str  # taken off every key before ``key`` (not required)
    final_norm: str  # where ``norm3`` comes from, for the log


LAYOUTS: Dict[str, Layout] = {
    'ours': Layout('poolformer_seg', lambda key: key, 'backbone.',
                   "'norm3'"),
    'official': Layout('sail-sg classification', _official_key, '',
                       "the classifier's final GroupNorm 'norm'"),
    'official_feat': Layout('sail-sg fork_feat / mmpretrain backbone',
                            _official_key, '', "'norm6'"),
    'mmpretrain': Layout('mmpretrain/mmseg (backbone.-prefixed)',
                         _official_key, 'backbone.',
                         "'norm6' (mmpretrain's final norm)"),
    'timm': Layout('timm metaformer', _timm_key, '',
                   "timm's 'head.norm' (for timm's ports of the sail-sg "
                   'weights these are the official final-norm values)'),
    'hf': Layout('HF transformers', _hf_key, 'poolformer.',
                 "the classifier's final GroupNorm 'norm'"),
}
# Keys that only exist in the v2 MetaFormer (timm poolformerv2_*).
_V2_MARKERS = ('res_scale', 'mlp.act.scale', 'stem.norm.',
               'downsample.norm.')
_WRAPPER_KEYS = ('state_dict', 'model')


# ----------------------------------------------------------------------------
# Detection


def unwrap_state_dict(checkpoint) -> Dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint.

    Accepts a plain state dict or one wrapped as ``{'state_dict': ...}`` or
    ``{'model': ...}`` (mmengine, sail-sg training checkpoints), and strips a
    ``module.`` prefix that (Distributed)DataParallel adds to every key.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'expected a dict of tensors, got '
                              f'{type(checkpoint).__name__}')
    for key in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state_dict = {k: v for k, v in checkpoint.items() if torch.is_tensor(v)}
    if state_dict and all(k.startswith('module.') for k in state_dict):
        state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
    return state_dict


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    """The entries under ``prefix``, with the prefix taken off."""
    return {k[len(prefix):]: v for k, v in state_dict.items()
            if k.startswith(prefix)}


def _plain_layout(keys) -> Optional[str]:
    """Layout of un-prefixed backbone keys, or None if none fits."""
    keys = list(keys)

    def has(pattern):
        return any(re.match(pattern, key) for key in keys)

    if has(r'stem\.proj\.') or has(r'stages\.\d+\.downsample\.proj\.') or \
            has(r'stages\.\d+\.blocks\.\d+\.layer_scale\d$'):
        return 'ours'
    if has(r'(stem\.|stages[._]\d+\.)'):
        if any(marker in key for key in keys for marker in _V2_MARKERS):
            raise CheckpointError(
                'this is a PoolFormer v2 (timm poolformerv2_*) checkpoint: '
                'v2 is a different network (StarReLU, no biases, '
                "res-scales); load it with dict(type='MetaFormer', "
                "arch='poolformerv2_...'), not PoolFormer")
        if has(r'stem\.conv\.') or has(r'stages[._]\d+\.downsample\.conv\.') \
                or has(r'stages[._]\d+\.blocks\.\d+\.layer_scale\d\.scale$'):
            return 'timm'
    if has(r'encoder\.(patch_embeddings|block)\.'):
        return 'hf'
    if has(r'patch_embed\.proj\.') or has(r'network\.\d+\.'):
        classifier = any(re.match(r'(norm|head)\.', key) for key in keys)
        return 'official' if classifier else 'official_feat'
    return None


def detect_layout(state_dict: dict, filename: Optional[str] = None) -> str:
    """Name of the layout of a backbone/classifier/segmentor state dict.

    Wrappers (``state_dict``, ``model``, ``module.``) are removed first.
    Returns a key of :data:`LAYOUTS`; a state dict that holds our backbone
    under ``backbone.`` (a poolformer_seg segmentor) is ``'ours'``.

    Raises:
        CheckpointError: no layout fits; the message names the file and shows
            a few of its keys.
    """
    state_dict = unwrap_state_dict(state_dict)
    layout = _plain_layout(state_dict)
    if layout is None and any(k.startswith('backbone.') for k in state_dict):
        inner = _plain_layout(strip_prefix(state_dict, 'backbone.'))
        layout = 'mmpretrain' if inner in ('official', 'official_feat') \
            else inner
    if layout is None and any(k.startswith('poolformer.encoder.')
                              for k in state_dict):
        layout = 'hf'
    if layout is None:
        sample = ', '.join(list(state_dict)[:6]) or '(no tensors)'
        where = f'{filename}: ' if filename else ''
        raise CheckpointError(
            f'{where}not a PoolFormer checkpoint of any known layout '
            f'({", ".join(LAYOUTS)}); its first keys are: {sample}')
    return layout


# ----------------------------------------------------------------------------
# Conversion


def format_keys(keys, limit: int = 12) -> str:
    """``a, b, c ... and N more``."""
    keys = list(keys)
    shown = ', '.join(keys[:limit])
    return shown + (f' ... and {len(keys) - limit} more'
                    if len(keys) > limit else '')


def _map_keys(state_dict: dict, layout: str):
    """Apply the layout's key function: (converted, dropped keys)."""
    key_fn = LAYOUTS[layout].key
    converted, dropped = {}, []
    for key, value in state_dict.items():
        new = key_fn(key)
        if new is DROP:
            dropped.append(key)
        elif new in converted:
            raise CheckpointError(
                f'keys map to the same name {new!r}; the '
                f'{LAYOUTS[layout].description} checkpoint is malformed')
        else:
            converted[new] = value
    return converted, dropped


@dataclass
class Conversion:
    """A backbone state dict in our names, and what the conversion did."""
    state_dict: Dict[str, torch.Tensor]
    layout: str
    dropped: List[str] = field(default_factory=list)  # classifier tensors
    ignored: List[str] = field(default_factory=list)  # prefixes outside it

    @property
    def norms_filled(self) -> Tuple[int, ...]:
        """Output norms (0..3) that the checkpoint has weights for."""
        return tuple(i for i in range(4)
                     if f'norm{i}.weight' in self.state_dict)

    def notes(self, empty_norms: bool = True) -> List[str]:
        """Sentences for a log: what was dropped, how the norms are filled.

        ``empty_norms=False`` leaves out the sentence on the output norms
        without weights, for callers that report them against a model.
        """
        notes = []
        if self.ignored:
            notes.append(f"ignored keys outside 'backbone.': "
                         f'{", ".join(self.ignored)}')
        if self.dropped:
            notes.append(f'dropped {len(self.dropped)} tensors without a '
                         f'backbone counterpart: '
                         f'{format_keys(self.dropped, 6)}')
        if 3 in self.norms_filled and self.layout != 'ours':
            notes.append(f'norm3 filled from {LAYOUTS[self.layout].final_norm}')
        empty = [f'norm{i}' for i in range(4) if i not in self.norms_filled]
        if empty and empty_norms:
            notes.append(f'output norms not in the checkpoint: '
                         f'{", ".join(empty)} (they keep their '
                         'initialisation, weight 1, bias 0)')
        return notes


def _checked_layout(state_dict: dict, layout: Optional[str]) -> str:
    if layout is None:
        return detect_layout(state_dict)
    if layout not in LAYOUTS:
        raise ValueError(f'layout={layout!r} is not one of {list(LAYOUTS)}')
    try:  # a forced layout must not contradict the keys
        found = detect_layout(state_dict)
    except CheckpointError:
        found = layout
    if found != layout:
        raise CheckpointError(f'layout {layout!r} was requested, but the '
                              f'keys are in the {found!r} layout')
    return layout


def convert_backbone(state_dict: dict,
                     layout: Optional[str] = None) -> Conversion:
    """Convert a backbone/classifier/segmentor state dict to our key names.

    Args:
        state_dict (dict): the checkpoint (wrappers are removed).
        layout (str, optional): force a layout instead of detecting it.

    Returns:
        Conversion: the backbone tensors under our names, the layout found,
        the tensors dropped (classifier heads) and the ignored key prefixes
        outside the backbone of a classifier or segmentor.
    """
    state_dict = unwrap_state_dict(state_dict)
    layout = _checked_layout(state_dict, layout)
    prefix = LAYOUTS[layout].prefix
    ignored = []
    if prefix == 'backbone.' and (layout == 'mmpretrain' or
                                  _plain_layout(state_dict) is None):
        # a classifier or segmentor: only its backbone is ours to take
        ignored = sorted({k.split('.', 1)[0] + '.' for k in state_dict
                          if not k.startswith(prefix)})
        state_dict = strip_prefix(state_dict, prefix)
    elif prefix and prefix != 'backbone.':  # optional wrapper (HF classifier)
        state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v
                      for k, v in state_dict.items()}
    converted, dropped = _map_keys(state_dict, layout)
    return Conversion(converted, layout, dropped, ignored)


def convert_backbone_state_dict(state_dict: dict,
                                layout: Optional[str] = None
                                ) -> Tuple[Dict[str, torch.Tensor], str,
                                           List[str]]:
    """:func:`convert_backbone` as ``(state_dict, layout, notes)``."""
    conversion = convert_backbone(state_dict, layout)
    return conversion.state_dict, conversion.layout, conversion.notes()


def convert_prefixed_keys(state_dict: dict, prefix: str = ''
                          ) -> Tuple[Optional[str], int, List[str]]:
    """Convert, in place, upstream PoolFormer keys found under ``prefix``.

    Used for whole-model state dicts (e.g. ``prefix='backbone.'`` of an mmseg
    segmentor); keys outside ``prefix`` are left alone.

    Returns:
        tuple: ``(layout, count, dropped)``: the upstream layout converted
        (None when the keys already are ours or no layout fits), how many
        tensors were renamed, and the original names of tensors removed
        because they have no counterpart (classifier parts).
    """
    own = [k for k in state_dict if k.startswith(prefix)]
    layout = _plain_layout(k[len(prefix):] for k in own)
    if layout is None or layout == 'ours':
        return None, 0, []
    converted, dropped = _map_keys(
        {k[len(prefix):]: state_dict[k] for k in own}, layout)
    for key in own:
        del state_dict[key]
    state_dict.update({prefix + k: v for k, v in converted.items()})
    return layout, len(converted), [prefix + k for k in dropped]


def conversion_message(layout: str, count: int, prefix: str) -> str:
    """The log line for an in-place conversion under ``prefix``."""
    where = f" under '{prefix}'" if prefix else ''
    source = 'mmseg/mmpretrain/sail-sg' if layout == 'official_feat' \
        else LAYOUTS[layout].description
    return (f'PoolFormer: converted {count} backbone keys{where} from the '
            f'{source} layout to poolformer_seg names')
