"""Loading checkpoints into models: pretrained init and strict segmentors.

Layouts and key names are :mod:`poolformer_seg.utils.layouts`' business;
reading a file without running code from it is
:mod:`poolformer_seg.utils.safe_load`'s. Two entry points:

* :func:`load_pretrained` -- ``init_cfg=dict(type='Pretrained', ...)`` of a
  backbone: any layout, non-strict for the output norms only.
* :func:`load_segmentor_checkpoint` -- strict loading for evaluation and
  inference: raises :class:`CheckpointMismatchError` naming every key that
  would leave a parameter uninitialised or has the wrong shape.

Upstream backbone keys inside a whole segmentor checkpoint are converted by
one mechanism: the backbone's ``convert_checkpoint_keys(state_dict, prefix)``
method, which the backbone also registers as its ``load_state_dict``
pre-hook (so ``load_from``, ``--resume`` and mmseg's own loaders convert
too). :func:`load_segmentor_checkpoint` calls the same method before its
check, because the check must see our names.
"""
import os
import os.path as osp
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from mmengine.logging import MMLogger, print_log

from .layouts import (LAYOUTS, conversion_message, convert_backbone,
                      format_keys, strip_prefix, unwrap_state_dict)
from .safe_load import CheckpointError, check_finite_weights, load

__all__ = [
    'CheckpointError', 'CheckpointMismatchError', 'KeyReport',
    'read_checkpoint', 'load_pretrained', 'load_segmentor_checkpoint'
]


class CheckpointMismatchError(CheckpointError):
    """A checkpoint leaves model parameters uninitialised or has bad shapes."""


@dataclass
class KeyReport:
    """How a state dict's keys compare with a model's."""
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)  # 'key (ckpt, model)'

    @classmethod
    def compare(cls, state_dict: dict, expected: dict) -> 'KeyReport':
        return cls(
            missing=[k for k in expected if k not in state_dict],
            unexpected=[k for k in state_dict if k not in expected],
            mismatched=[
                f'{key} (checkpoint {list(state_dict[key].shape)}, model '
                f'{list(value.shape)})' for key, value in expected.items()
                if key in state_dict
                and state_dict[key].shape != value.shape])

    def lines(self) -> List[str]:
        """One indented line per non-empty category."""
        rows = [('missing', self.missing, 12),
                ('shape mismatch', self.mismatched, 6),
                ('unexpected', self.unexpected, 12)]
        return [f'  {name} ({len(keys)}): {format_keys(keys, limit)}'
                for name, keys, limit in rows if keys]


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
    """Load a local file (torch or ``.safetensors``) or a URL, safely.

    The archive's checksums are verified and NaN/Inf weights refused
    (:class:`~poolformer_seg.utils.safe_load.NonFiniteCheckpointError`).
    """
    filename = os.fspath(filename)
    if re.match(r'[a-z0-9+]+://', filename):
        from mmengine.runner.checkpoint import CheckpointLoader
        return CheckpointLoader.load_checkpoint(filename, map_location='cpu')
    checkpoint = load(_resolve_path(filename), map_location='cpu')
    check_finite_weights(checkpoint, filename)
    return checkpoint


# ----------------------------------------------------------------------------
# Backbone: init_cfg=dict(type='Pretrained')

_OUTPUT_NORM = re.compile(r'norm\d\.')


def _pretrained_mismatch(checkpoint: str, layout: str, model,
                         report: KeyReport) -> Optional[str]:
    """The error text when the weights do not fit this arch, else None.

    Only the output norms may be missing (classification checkpoints have at
    most the final one); an unexpected stage key means another depth.
    """
    missing = [k for k in report.missing if not _OUTPUT_NORM.match(k)]
    unexpected = [k for k in report.unexpected
                  if k.startswith(('stem.', 'stages.'))]
    if not (missing or unexpected or report.mismatched):
        return None
    fatal = KeyReport(missing, unexpected, report.mismatched)
    return '\n'.join(
        [f'{checkpoint} ({LAYOUTS[layout].description} layout) does not fit '
         f'PoolFormer(arch layers={model.arch["layers"]}, '
         f'embed_dims={model.arch["embed_dims"]}); was it saved from '
         'another arch?'] + fatal.lines())


def load_pretrained(model: torch.nn.Module, checkpoint: str,
                    prefix: Optional[str] = None) -> List[str]:
    """Load pretrained weights of any layout into a ``PoolFormer``.

    Args:
        model: our backbone.
        checkpoint (str): path, HF model directory or URL.
        prefix (str, optional): keep only keys under this prefix and strip it
            (mmseg configs pass ``'backbone.'``); the layout's own prefix is
            found automatically without it.

    Raises:
        CheckpointMismatchError: a key other than an output norm is missing,
            a stage key is unexpected (another depth) or a shape differs
            (another width); the message names the keys.

    Returns:
        list[str]: the log lines: the layout found, missing and unexpected
        keys, and the output norms that stay at their initialisation.
    """
    state_dict = unwrap_state_dict(read_checkpoint(checkpoint))
    if prefix:
        selected = strip_prefix(state_dict, prefix)
        if not selected:
            raise CheckpointError(
                f'{checkpoint}: no key starts with prefix={prefix!r}; first '
                f'keys: {format_keys(state_dict, 5)}')
        state_dict = selected
    try:
        conversion = convert_backbone(state_dict)
    except CheckpointError as err:
        raise CheckpointError(f'{checkpoint}: {err}') from None

    converted = conversion.state_dict
    report = KeyReport.compare(converted, model.state_dict())
    error = _pretrained_mismatch(checkpoint, conversion.layout, model, report)
    if error:
        raise CheckpointMismatchError(error)
    model.load_state_dict(converted, strict=False)
    lines = _pretrained_log(checkpoint, conversion, report)
    for line in lines:
        print_log(line, logger='current')
    return lines


def _pretrained_log(checkpoint: str, conversion, report: KeyReport):
    loaded = len(conversion.state_dict) - len(report.unexpected)
    lines = [f'PoolFormer: loaded {loaded} tensors from {checkpoint} '
             f'({LAYOUTS[conversion.layout].description} layout)']
    lines += [f'PoolFormer: {note}'
              for note in conversion.notes(empty_norms=False)]
    lines.append('PoolFormer: missing keys: ' +
                 (format_keys(report.missing) if report.missing else 'none'))
    lines.append('PoolFormer: unexpected keys (ignored): ' +
                 format_keys(report.unexpected) if report.unexpected else
                 'PoolFormer: unexpected keys: none')
    empty = sorted({k.split('.')[0] for k in report.missing})
    if empty:
        lines.append(f'PoolFormer: output norms {", ".join(empty)} of this '
                     'model are not in the checkpoint and stay at their '
                     'initialisation (weight 1, bias 0)')
    return lines


# ----------------------------------------------------------------------------
# Segmentor: strict loading for evaluation and inference


def convert_model_keys(model: torch.nn.Module, state_dict: dict,
                       logger=None) -> List[str]:
    """Convert upstream backbone keys in place, for every backbone of ``model``.

    Each module with a ``convert_checkpoint_keys(state_dict, prefix)`` method
    (our backbones, where it is also the ``load_state_dict`` pre-hook)
    converts the keys under its own prefix.

    Returns:
        list[str]: original names of tensors dropped for lack of a
        counterpart (classifier parts).
    """
    logger = logger or MMLogger.get_current_instance()
    dropped = []
    for name, module in model.named_modules():
        convert = getattr(module, 'convert_checkpoint_keys', None)
        if callable(convert):
            prefix = f'{name}.' if name else ''
            layout, count, lost = convert(state_dict, prefix)
            if layout is not None:
                logger.info(conversion_message(layout, count, prefix))
                dropped += lost
    return dropped


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    from mmengine.model import BaseTTAModel, is_model_wrapper
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    return model


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
    logger = logger or MMLogger.get_current_instance()
    checkpoint = read_checkpoint(filename)
    state_dict = dict(unwrap_state_dict(checkpoint))
    model = _unwrapped(model)
    dropped = convert_model_keys(model, state_dict, logger)

    expected: Dict[str, torch.Tensor] = model.state_dict()
    report = KeyReport.compare(state_dict, expected)
    report.missing = [k for k in report.missing
                      if not k.endswith('num_batches_tracked')]
    report.unexpected += dropped
    if report.missing or report.mismatched:
        head = (f'checkpoint {filename} does not fit the model: these '
                'parameters would stay uninitialised or do not match')
        if not allow_partial:
            raise CheckpointMismatchError('\n'.join(
                [head] + report.lines() +
                ['To load the rest anyway, pass allow_partial=True '
                 '(tools/test.py: --allow-partial-load).']))
        logger.warning('\n'.join([head + ' (allow_partial: loading the '
                                  'rest)'] + report.lines()))
    elif report.unexpected:
        logger.warning('\n'.join([f'checkpoint {filename} has keys the model '
                                  'does not use (ignored):'] + report.lines()))
    loadable = {k: v for k, v in state_dict.items()
                if k in expected and v.shape == expected[k].shape}
    model.load_state_dict(loadable, strict=False)
    logger.info(f'loaded {len(loadable)} of {len(expected)} tensors from '
                f'{filename}')
    return checkpoint
