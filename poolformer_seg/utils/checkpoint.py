"""PoolFormer weights of every published layout; strict segmentor loading.

Layouts (names returned by :func:`detect_layout`; the full table is in
``docs/checkpoints.md``):

============== ==============================================================
``ours``       poolformer_seg: ``stem.proj``, ``stages.{s}.downsample.proj``,
               ``stages.{s}.blocks.{j}.{norm1,norm2,mlp.fc1,mlp.fc2,
               layer_scale1,layer_scale2}``, output norms ``norm{s}``
``official``   sail-sg classifier: ``patch_embed.proj``, ``network.{k}``,
               final ``norm``, ``head``
``official_feat`` sail-sg ``fork_feat`` backbone, also an mmpretrain
               backbone state dict: ``network.{k}`` and ``norm{0,2,4,6}``
``mmpretrain`` the same names under ``backbone.``: mmpretrain classifiers
               (``backbone.norm6``, ``head.fc``) and mmseg segmentors
``timm``       ``stem.conv``, ``stages.{s}.downsample.conv``,
               ``stages.{s}.blocks.{j}`` with ``layer_scale1.scale``,
               ``head.norm``/``head.fc``; ``stages_{s}`` for features_only
``hf``         transformers ``PoolFormerModel`` (``encoder.patch_embeddings``,
               ``encoder.block``) or ``PoolFormerForImageClassification``
               (the same under ``poolformer.``, plus ``norm``, ``classifier``)
============== ==============================================================

Upstream numbers the 7 entries of ``network`` (4 stages, 3 downsampling
convs in between) and names output norms after them (``norm0/2/4/6``); we
number the 4 stages, so ``network.{2s}`` is our ``stages.{s}.blocks``,
``network.{2s-1}`` our ``stages.{s}.downsample`` and ``norm{2s}`` our
``norm{s}``. The final norm of a classifier (sail-sg and HF ``norm``,
mmpretrain ``norm6``, timm ``head.norm``) fills ``norm3``, as mmseg's own
PoolFormer configs do; classifier heads are dropped.

Three entry points:

* :func:`load_pretrained` -- ``init_cfg=dict(type='Pretrained', ...)`` of the
  backbone: any layout, non-strict for the output norms only.
* :func:`upstream_keys_pre_hook` -- registered on every ``PoolFormer`` as a
  ``load_state_dict`` pre-hook, so a whole upstream segmentor checkpoint
  (mmseg 1.x over mmpretrain, or sail-sg's mmseg 0.x code) loads through
  ``tools/test.py``, ``load_from``, ``--resume`` and the inference API.
* :func:`load_segmentor_checkpoint` -- strict loading for evaluation and
  inference: raises :class:`CheckpointMismatchError` naming every key that
  would leave a parameter uninitialised or has the wrong shape.
"""
import os
import os.path as osp
import re
from typing import Dict, List, Optional, Tuple

import torch
from mmengine.logging import MMLogger, print_log

from .safe_load import CheckpointError, load

__all__ = [
    'CheckpointError', 'CheckpointMismatchError', 'LAYOUTS', 'detect_layout',
    'unwrap_state_dict', 'convert_backbone_state_dict',
    'convert_prefixed_keys', 'load_pretrained', 'upstream_keys_pre_hook',
    'load_segmentor_checkpoint', 'read_checkpoint'
]

# Layout name -> how it is described in logs and errors.
LAYOUTS = {
    'ours': 'poolformer_seg',
    'official': 'sail-sg classification',
    'official_feat': 'sail-sg fork_feat / mmpretrain backbone',
    'mmpretrain': 'mmpretrain/mmseg (backbone.-prefixed)',
    'timm': 'timm metaformer',
    'hf': 'HF transformers',
}
# Keys that only exist in the v2 MetaFormer (timm poolformerv2_*).
_V2_MARKERS = ('res_scale', 'mlp.act.scale', 'stem.norm.',
               'downsample.norm.')
_WRAPPER_KEYS = ('state_dict', 'model')
_DROP = None  # a key mapper returns this for tensors we deliberately drop


class CheckpointMismatchError(CheckpointError):
    """A checkpoint leaves model parameters uninitialised or has bad shapes."""


# ----------------------------------------------------------------------------
# Layout detection


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


def _strip(state_dict: dict, prefix: str) -> dict:
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
                'res-scales) and cannot be loaded into PoolFormer v1')
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
    Returns one of :data:`LAYOUTS`; a state dict that holds our backbone
    under ``backbone.`` (a poolformer_seg segmentor) is ``'ours'``.

    Raises:
        CheckpointError: no layout fits; the message names the file and shows
            a few of its keys.
    """
    state_dict = unwrap_state_dict(state_dict)
    layout = _plain_layout(state_dict)
    if layout is None and any(k.startswith('backbone.') for k in state_dict):
        inner = _plain_layout(_strip(state_dict, 'backbone.'))
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
# Key mapping: one function per family; each maps an un-prefixed key to our
# name, to _DROP (classifier parts), or returns it unchanged if it does not
# know it (so that it is reported as unexpected, never silently lost).


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
        return f'norm{int(m[1]) // 2}.{m[2]}' if int(m[1]) % 2 == 0 else _DROP
    m = re.match(r'norm\.(.+)$', key)
    if m:
        return f'norm3.{m[1]}'
    if re.match(r'head\.', key):
        return _DROP
    return key


def _timm_key(key: str) -> Optional[str]:
    key = re.sub(r'^stages_(\d+)\.', r'stages.\1.', key)  # features_only
    key = re.sub(r'^stem\.conv\.', 'stem.proj.', key)
    key = re.sub(r'^(stages\.\d+\.downsample)\.conv\.', r'\1.proj.', key)
    key = re.sub(r'\.layer_scale(\d)\.scale$', r'.layer_scale\1', key)
    if key.startswith('head.norm.'):
        return 'norm3.' + key[len('head.norm.'):]
    return _DROP if key.startswith('head.') else key


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
    return _DROP if key.startswith('classifier.') else key


_MAPPERS = {'official': _official_key, 'official_feat': _official_key,
            'mmpretrain': _official_key, 'timm': _timm_key, 'hf': _hf_key,
            'ours': lambda key: key}

# Where each layout's final norm (if any) comes from, for the notes.
_FINAL_NORM_SOURCE = {
    'official': "the classifier's final GroupNorm 'norm'",
    'mmpretrain': "'norm6' (mmpretrain's final norm)",
    'official_feat': "'norm6'",
    'timm': "timm's 'head.norm' (for timm's ports of the sail-sg weights "
            "these are the official final-norm values)",
    'hf': "the classifier's final GroupNorm 'norm'",
    'ours': "'norm3'",
}


def _map_keys(state_dict: dict, layout: str):
    """Apply the layout's key mapper: (converted, dropped keys)."""
    mapper = _MAPPERS[layout]
    converted, dropped = {}, []
    for key, value in state_dict.items():
        new = mapper(key)
        if new is _DROP:
            dropped.append(key)
        elif new in converted:
            raise CheckpointError(f'keys map to the same name {new!r}; the '
                                  f'{LAYOUTS[layout]} checkpoint is malformed')
        else:
            converted[new] = value
    return converted, dropped


def _norm_notes(converted: dict, layout: str) -> List[str]:
    filled = [i for i in range(4) if f'norm{i}.weight' in converted]
    empty = [f'norm{i}' for i in range(4) if i not in filled]
    notes = []
    if 3 in filled and layout != 'ours':
        notes.append(f'norm3 filled from {_FINAL_NORM_SOURCE[layout]}')
    if empty:
        notes.append(f'output norms not in the checkpoint: {", ".join(empty)}'
                     ' (they keep their initialisation, weight 1, bias 0)')
    return notes


def convert_backbone_state_dict(state_dict: dict,
                                layout: Optional[str] = None
                                ) -> Tuple[Dict[str, torch.Tensor], str,
                                           List[str]]:
    """Convert a backbone/classifier/segmentor state dict to our key names.

    Args:
        state_dict (dict): the checkpoint (wrappers are removed).
        layout (str, optional): force a layout instead of detecting it.

    Returns:
        tuple: ``(converted, layout, notes)``: the backbone tensors under our
        names; the layout found; sentences saying what was dropped (classifier
        heads, keys outside the backbone) and which of the four output norms
        ``norm0..3`` the checkpoint could not fill.
    """
    state_dict = unwrap_state_dict(state_dict)
    if layout is None:
        layout = detect_layout(state_dict)
    elif layout not in LAYOUTS:
        raise ValueError(f'layout={layout!r} is not one of {list(LAYOUTS)}')
    else:  # a forced layout must not contradict the keys
        try:
            found = detect_layout(state_dict)
        except CheckpointError:
            found = layout
        if found != layout:
            raise CheckpointError(f'layout {layout!r} was requested, but the '
                                  f'keys are in the {found!r} layout')
    notes = []
    if layout == 'hf':  # PoolFormerForImageClassification: norm, classifier
        state_dict = {k[len('poolformer.'):] if k.startswith('poolformer.')
                      else k: v for k, v in state_dict.items()}
    elif layout == 'mmpretrain' or (layout == 'ours' and
                                    _plain_layout(state_dict) is None):
        # a classifier or segmentor: only its backbone is ours to take
        outside = sorted({k.split('.', 1)[0] + '.' for k in state_dict
                          if not k.startswith('backbone.')})
        if outside:
            notes.append(f"ignored keys outside 'backbone.': "
                         f'{", ".join(outside)}')
        state_dict = _strip(state_dict, 'backbone.')
    converted, dropped = _map_keys(state_dict, layout)
    if dropped:
        notes.append(f'dropped {len(dropped)} tensors without a backbone '
                     f'counterpart: {_format_keys(dropped, 6)}')
    return converted, layout, notes + _norm_notes(converted, layout)


# ----------------------------------------------------------------------------
# In-place conversion of a module's keys inside a bigger state dict


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


def _conversion_message(layout: str, count: int, prefix: str) -> str:
    where = f" under '{prefix}'" if prefix else ''
    source = 'mmseg/mmpretrain/sail-sg' if layout == 'official_feat' \
        else LAYOUTS[layout]
    return (f'PoolFormer: converted {count} backbone keys{where} from the '
            f'{source} layout to poolformer_seg names')


def upstream_keys_pre_hook(module, state_dict, prefix, local_metadata, strict,
                           missing_keys, unexpected_keys, error_msgs):
    """``load_state_dict`` pre-hook of ``PoolFormer``: convert upstream keys.

    Torch and mmengine call it from ``_load_from_state_dict`` before the
    module's own keys are matched, with the (copied) state dict of the whole
    load, so converting in place is what the rest of the load sees. Tensors
    without a counterpart (classifier heads) are removed and reported as
    unexpected keys under their original names.
    """
    layout, count, dropped = convert_prefixed_keys(state_dict, prefix)
    if layout is not None:
        unexpected_keys.extend(dropped)
        print_log(_conversion_message(layout, count, prefix),
                  logger='current')


# ----------------------------------------------------------------------------
# Reading files


def _resolve_path(checkpoint: str) -> str:
    """A HF model directory -> its weights file; other paths unchanged."""
    if osp.isdir(checkpoint):
        for name in ('model.safetensors', 'pytorch_model.bin'):
            if osp.isfile(osp.join(checkpoint, name)):
                return osp.join(checkpoint, name)
        raise CheckpointError(f'{checkpoint} is a directory without '
                              'model.safetensors or pytorch_model.bin')
    return checkpoint


def read_checkpoint(filename: str):
    """Load a local file (torch or ``.safetensors``) or a URL, safely."""
    filename = os.fspath(filename)
    if re.match(r'[a-z0-9+]+://', filename):
        from mmengine.runner.checkpoint import CheckpointLoader
        return CheckpointLoader.load_checkpoint(filename, map_location='cpu')
    return load(_resolve_path(filename), map_location='cpu')


def _format_keys(keys, limit: int = 12) -> str:
    keys = list(keys)
    shown = ', '.join(keys[:limit])
    return shown + (f' ... and {len(keys) - limit} more'
                    if len(keys) > limit else '')


def _shape_mismatches(state_dict: dict, expected: dict) -> List[str]:
    return [f'{key} (checkpoint {list(state_dict[key].shape)}, model '
            f'{list(value.shape)})' for key, value in expected.items()
            if key in state_dict and state_dict[key].shape != value.shape]


# ----------------------------------------------------------------------------
# Backbone: init_cfg=dict(type='Pretrained')


def load_pretrained(model: torch.nn.Module, checkpoint: str,
                    prefix: Optional[str] = None) -> List[str]:
    """Load pretrained weights of any layout into a ``PoolFormer``.

    Args:
        model: our backbone.
        checkpoint (str): path, HF model directory or URL.
        prefix (str, optional): keep only keys under this prefix and strip it
            (mmseg configs pass ``'backbone.'``); the layout's own prefix is
            found automatically without it.

    Only the output norms may be absent (classification checkpoints have at
    most the final one); any other missing key, any unexpected stage key
    (another depth) and any shape mismatch (another width) raise
    :class:`CheckpointMismatchError` naming the keys. Everything else is
    logged: the layout found, missing and unexpected keys, and the output
    norms that stay at their initialisation.

    Returns:
        list[str]: the log lines.
    """
    state_dict = unwrap_state_dict(read_checkpoint(checkpoint))
    if prefix:
        selected = _strip(state_dict, prefix)
        if not selected:
            raise CheckpointError(
                f'{checkpoint}: no key starts with prefix={prefix!r}; first '
                f'keys: {_format_keys(state_dict, 5)}')
        state_dict = selected
    try:
        converted, layout, notes = convert_backbone_state_dict(state_dict)
    except CheckpointError as err:
        raise CheckpointError(f'{checkpoint}: {err}') from None

    expected = model.state_dict()
    mismatched = _shape_mismatches(converted, expected)
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    is_norm = re.compile(r'norm\d\.').match
    fatal_missing = [k for k in missing if not is_norm(k)]
    # an unexpected stage key means another depth; other strays are reported
    fatal_unexpected = [k for k in unexpected
                        if k.startswith(('stem.', 'stages.'))]
    if mismatched or fatal_missing or fatal_unexpected:
        raise CheckpointMismatchError('\n'.join(
            [f'{checkpoint} ({LAYOUTS[layout]} layout) does not fit '
             f'PoolFormer(arch layers={model.arch["layers"]}, '
             f'embed_dims={model.arch["embed_dims"]}); was it saved from '
             'another arch?'] +
            ([f'  shape mismatch: {_format_keys(mismatched, 6)}']
             if mismatched else []) +
            ([f'  missing: {_format_keys(fatal_missing)}']
             if fatal_missing else []) +
            ([f'  unexpected: {_format_keys(fatal_unexpected)}']
             if fatal_unexpected else [])))
    model.load_state_dict(converted, strict=False)

    left = sorted({k.split('.')[0] for k in missing})
    lines = [f'PoolFormer: loaded {len(converted) - len(unexpected)} tensors '
             f'from {checkpoint} ({LAYOUTS[layout]} layout)']
    # the model-specific line below replaces the converter's generic one
    lines += [f'PoolFormer: {note}' for note in notes
              if not note.startswith('output norms not in')]
    lines.append(f'PoolFormer: missing keys: {_format_keys(missing)}'
                 if missing else 'PoolFormer: missing keys: none')
    lines.append(f'PoolFormer: unexpected keys (ignored): '
                 f'{_format_keys(unexpected)}' if unexpected else
                 'PoolFormer: unexpected keys: none')
    if left:
        lines.append(f'PoolFormer: output norms {", ".join(left)} of this '
                     'model are not in the checkpoint and stay at their '
                     'initialisation (weight 1, bias 0)')
    for line in lines:
        print_log(line, logger='current')
    return lines


# ----------------------------------------------------------------------------
# Segmentor: strict loading for evaluation and inference


def _convert_model_keys(model: torch.nn.Module, state_dict: dict, logger):
    """Run the pre-hook conversion for every PoolFormer inside ``model``."""
    from poolformer_seg.models.backbones.poolformer import PoolFormer
    dropped = []
    for name, module in model.named_modules():
        if isinstance(module, PoolFormer):
            prefix = f'{name}.' if name else ''
            layout, count, lost = convert_prefixed_keys(state_dict, prefix)
            if layout is not None:
                logger.info(_conversion_message(layout, count, prefix))
                dropped += lost
    return dropped


def load_segmentor_checkpoint(model: torch.nn.Module, filename: str,
                              allow_partial: bool = False, logger=None):
    """Load a segmentor checkpoint for evaluation or inference, strictly.

    Handles ``state_dict``/``model`` wrappers, ``module.`` prefixes, model
    wrappers (DDP etc.) and upstream PoolFormer backbone keys (mmseg 1.x over
    mmpretrain, sail-sg's mmseg 0.x code), which are converted in memory.

    Args:
        model: the segmentor (or a DDP/TTA wrapper of it).
        filename (str): local path or URL.
        allow_partial (bool): load what fits and only warn about the rest,
            for deliberate partial loading. Default False.
        logger: defaults to mmengine's current logger.

    Raises:
        CheckpointMismatchError: a parameter or buffer of the model is not in
            the checkpoint, or has another shape there (e.g. a 19-class head
            for a 150-class model). The message lists missing keys,
            unexpected keys and shape mismatches.

    Returns:
        dict: the loaded checkpoint (``meta`` etc. untouched).
    """
    from mmengine.model import BaseTTAModel, is_model_wrapper
    logger = logger or MMLogger.get_current_instance()
    checkpoint = read_checkpoint(filename)
    state_dict = dict(unwrap_state_dict(checkpoint))
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    dropped = _convert_model_keys(model, state_dict, logger)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict
               and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state_dict if k not in expected] + dropped
    mismatched = _shape_mismatches(state_dict, expected)
    report = []
    if missing:
        report.append(f'  missing ({len(missing)}): {_format_keys(missing)}')
    if mismatched:
        report.append(f'  shape mismatch ({len(mismatched)}): '
                      f'{_format_keys(mismatched, 6)}')
    if unexpected:
        report.append(f'  unexpected ({len(unexpected)}): '
                      f'{_format_keys(unexpected)}')
    if missing or mismatched:
        head = (f'checkpoint {filename} does not fit the model: these '
                'parameters would stay uninitialised or do not match')
        if not allow_partial:
            raise CheckpointMismatchError('\n'.join(
                [head] + report +
                ['To load the rest anyway, pass allow_partial=True '
                 '(tools/test.py: --allow-partial-load).']))
        logger.warning('\n'.join([head + ' (allow_partial: loading the '
                                  'rest)'] + report))
    elif unexpected:
        logger.warning('\n'.join([f'checkpoint {filename} has keys the model '
                                  'does not use (ignored):'] + report))
    loadable = {k: v for k, v in state_dict.items()
                if k in expected and v.shape == expected[k].shape}
    model.load_state_dict(loadable, strict=False)
    logger.info(f'loaded {len(loadable)} of {len(expected)} tensors from '
                f'{filename}')
    return checkpoint
