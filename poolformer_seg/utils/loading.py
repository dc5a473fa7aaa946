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
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from mmengine.logging import MMLogger, print_log

from . import metaformer_layouts
from .layouts import (LAYOUTS, conversion_message, convert_backbone,
                      format_keys, strip_prefix, unwrap_state_dict)
from .safe_load import CheckpointError, check_finite_weights, load

__all__ = [
    'CheckpointError', 'CheckpointMismatchError', 'ClassCountMismatchError',
    'KeyReport', 'read_checkpoint', 'load_pretrained',
    'load_pretrained_metaformer', 'load_segmentor_checkpoint',
    'fit_state_dict', 'checked_for_mmengine', 'check_resumable',
    'check_class_count'
]


class CheckpointMismatchError(CheckpointError):
    """A checkpoint leaves model parameters uninitialised or has bad shapes."""


def _fits(value: torch.Tensor, expected: torch.Tensor) -> bool:
    # Same shape, and a float where the model has a float (torch casts
    # between float widths exactly as it would on save; an integer tensor
    # in place of a float weight is not a weight).
    return value.shape == expected.shape and \
        value.is_floating_point() == expected.is_floating_point()


def _describe_tensor(value: torch.Tensor) -> str:
    return f'{list(value.shape)}' + (
        '' if value.is_floating_point() else f' {value.dtype}')


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
                f'{key} (checkpoint {_describe_tensor(state_dict[key])}, '
                f'model {_describe_tensor(value)})'
                for key, value in expected.items()
                if key in state_dict and torch.is_tensor(state_dict[key])
                and not _fits(state_dict[key], value)])

    @property
    def mismatched_keys(self) -> List[str]:
        return [entry.split(' ', 1)[0] for entry in self.mismatched]

    def lines(self, counts: bool = True) -> List[str]:
        """One indented line per non-empty category (``missing (3): ...``,
        or ``missing: ...`` without ``counts``)."""
        rows = [('missing', self.missing, 12),
                ('shape mismatch', self.mismatched, 6),
                ('unexpected', self.unexpected, 12)]
        return [f'  {name}{f" ({len(keys)})" if counts else ""}: '
                f'{format_keys(keys, limit)}'
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
         'another arch?'] + fatal.lines(counts=False))


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
    state_dict = _under_prefix(unwrap_state_dict(read_checkpoint(checkpoint)),
                               checkpoint, prefix)
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


def _select_backbone(state_dict: dict, checkpoint: str,
                     prefix: Optional[str]):
    """``(state_dict, notes)``: the keys under ``prefix`` (default
    ``'backbone.'`` when the file is a whole segmentor), prefix taken off."""
    notes = []
    if prefix is None and any(k.startswith('backbone.') for k in state_dict):
        prefix = 'backbone.'
        outside = sorted({k.split('.', 1)[0] for k in state_dict
                          if not k.startswith(prefix)})
        if outside:
            notes.append(f"ignored keys outside 'backbone.': "
                         f'{", ".join(outside)}')
    return _under_prefix(state_dict, checkpoint, prefix), notes


def _under_prefix(state_dict: dict, checkpoint: str,
                  prefix: Optional[str]) -> dict:
    """The keys under ``prefix`` with it taken off (all keys without one)."""
    if not prefix:
        return state_dict
    selected = strip_prefix(state_dict, prefix)
    if not selected:
        raise CheckpointError(
            f'{checkpoint}: no key starts with prefix={prefix!r}; first '
            f'keys: {format_keys(state_dict, 5)}')
    return selected


def load_pretrained_metaformer(model: torch.nn.Module, checkpoint: str,
                               prefix: Optional[str] = None) -> List[str]:
    """Load timm or sail-sg weights (any file format) into a ``MetaFormer``.

    Strict except for the output norms ``norm{i}`` (classifiers have at
    most the final one, see :mod:`poolformer_seg.utils.metaformer_layouts`):
    a missing or unexpected stem/stage key, or a shape that does not fit,
    raises :class:`CheckpointMismatchError` naming the keys and the arch.

    Args:
        checkpoint (str): local file (``.pth``, ``.bin``,
            ``.safetensors``), HF model directory or URL.
        prefix (str, optional): keep only keys under it and strip it. A
            checkpoint with ``backbone.`` keys (a whole segmentor) uses
            ``'backbone.'`` without being told.

    Returns:
        list[str]: the log lines (also printed to the current logger).
    """
    state_dict, notes = _select_backbone(
        unwrap_state_dict(read_checkpoint(checkpoint)), checkpoint, prefix)
    try:
        converted, layout, layout_notes = \
            metaformer_layouts.convert_metaformer_state_dict(state_dict)
    except CheckpointError as err:
        raise CheckpointError(f'{checkpoint}: {err}') from None
    expected = model.state_dict()
    converted = metaformer_layouts.match_pointwise_shapes(converted, expected)
    report = KeyReport.compare(converted, expected)
    fatal = KeyReport(
        [k for k in report.missing if not _OUTPUT_NORM.match(k)],
        [k for k in report.unexpected if not _OUTPUT_NORM.match(k)],
        report.mismatched)
    description = metaformer_layouts.LAYOUTS[layout][0]
    if fatal.missing or fatal.unexpected or fatal.mismatched:
        raise CheckpointMismatchError('\n'.join(
            [f'{checkpoint} ({description} layout) does not fit '
             f'{model.describe()}; was it saved from another variant?'] +
            fatal.lines(counts=False)))
    model.load_state_dict(
        {k: v for k, v in converted.items() if k in expected}, strict=False)

    lines = [f'MetaFormer: loaded {len(converted) - len(report.unexpected)} '
             f'tensors from {checkpoint} ({description} layout) into '
             f'{model.describe()}']
    lines += [f'MetaFormer: {note}' for note in notes + layout_notes]
    if report.unexpected:
        lines.append('MetaFormer: output norms in the checkpoint for stages '
                     'not in out_indices (ignored): '
                     f'{format_keys(report.unexpected)}')
    empty = sorted({k.split('.')[0] for k in report.missing})
    if empty:
        lines.append(f'MetaFormer: output norms {", ".join(empty)} are not '
                     'in the checkpoint and keep their initialisation '
                     '(weight 1, bias 0)')
    for line in lines:
        print_log(line, logger='current')
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


HEAD_PREFIXES = ('decode_head.', 'auxiliary_head.')
PARTIAL_HINT = ('To load the rest anyway, pass allow_partial=True '
                '(tools/test.py: --allow-partial-load).')
FINE_TUNE_HINT = (
    'Only decode_head/auxiliary_head weights may differ, and only when '
    'training from load_from (fine-tuning: they keep their initialisation); '
    'the rest must come from a checkpoint of the same architecture. Check '
    'that the config and the checkpoint are of the same model.')


def has_own_backbone(model: torch.nn.Module) -> bool:
    """True if ``model`` contains (below its root) a module that converts
    checkpoint keys: a poolformer_seg backbone, i.e. one of our configs."""
    return any(callable(getattr(module, 'convert_checkpoint_keys', None))
               for name, module in _unwrapped(model).named_modules() if name)


def _backbone_prefixes(model: torch.nn.Module) -> List[str]:
    return [f'{name}.' for name, module in model.named_modules()
            if name and callable(getattr(module, 'convert_checkpoint_keys',
                                         None))]


def fit_state_dict(model: torch.nn.Module, state_dict: dict, source: str,
                   new_head: bool = False, allow_partial: bool = False,
                   hint: str = PARTIAL_HINT, logger=None) -> dict:
    """A converted copy of ``state_dict`` checked against ``model``.

    Upstream backbone keys are converted (:func:`convert_model_keys`). Then
    every parameter and buffer of the model must be in the result with its
    shape (``num_batches_tracked`` may be missing), and no key under a
    backbone's prefix may be unused (a deeper arch of the same width).

    Args:
        model: the segmentor (or a DDP/TTA wrapper of it).
        state_dict: tensors, without wrapper or ``module.`` prefix.
        source (str): the file, for messages.
        new_head (bool): fine-tuning: ``decode_head.*``/``auxiliary_head.*``
            tensors that are missing or have another shape (150 -> 19
            classes) are replaced by the model's own (initialised) tensors,
            and one log line names them.
        allow_partial (bool): warn about the rest instead of raising; the
            result then holds only the tensors that fit.
        hint (str): the last line of the error, saying what to do.

    Raises:
        CheckpointMismatchError: naming missing keys, shape mismatches (both
            shapes) and unexpected backbone keys.
    """
    logger = logger or MMLogger.get_current_instance()
    model = _unwrapped(model)
    fitted = OrderedDict(state_dict)
    metadata = getattr(state_dict, '_metadata', None)
    if metadata is not None:
        fitted._metadata = metadata
    dropped = convert_model_keys(model, fitted, logger)
    expected: Dict[str, torch.Tensor] = model.state_dict()
    report = KeyReport.compare(fitted, expected)
    report.missing = [k for k in report.missing
                      if not k.endswith('num_batches_tracked')]
    if new_head:
        _keep_initialised_head(fitted, expected, report, source, logger)
    prefixes = tuple(_backbone_prefixes(model))
    foreign = [k for k in report.unexpected if prefixes and
               k.startswith(prefixes)]
    report.unexpected += dropped
    if report.missing or report.mismatched or foreign:
        head = (f'checkpoint {source} does not fit the model: these '
                'parameters would stay uninitialised or do not match')
        if foreign:
            head += (f' ({len(foreign)} unexpected backbone keys: a '
                     'checkpoint of another depth?)')
        if not allow_partial:
            raise CheckpointMismatchError('\n'.join([head] + report.lines() +
                                                    [hint]))
        logger.warning('\n'.join([head + ' (allow_partial: loading the '
                                  'rest)'] + report.lines()))
        return OrderedDict((k, v) for k, v in fitted.items()
                           if k in expected and _fits(v, expected[k]))
    if report.unexpected:
        logger.warning('\n'.join([f'checkpoint {source} has keys the model '
                                  'does not use (ignored):'] + report.lines()))
    return fitted


def _keep_initialised_head(fitted: dict, expected: dict, report: KeyReport,
                           source: str, logger) -> None:
    """Fine-tuning: head tensors that do not fit are taken from the model."""
    skipped = [k for k in report.missing + report.mismatched_keys
               if k.startswith(HEAD_PREFIXES)]
    if not skipped:
        return
    for key in skipped:
        fitted[key] = expected[key]
    report.missing = [k for k in report.missing if k not in skipped]
    report.mismatched = [entry for entry, key in zip(
        report.mismatched, report.mismatched_keys) if key not in skipped]
    logger.info(f'fine-tuning from {source}: {len(skipped)} head tensors do '
                'not fit this model (another class count or head) and keep '
                f'their initialisation: {format_keys(skipped)}')


def load_segmentor_checkpoint(model: torch.nn.Module, filename: str,
                              allow_partial: bool = False, logger=None):
    """Load a segmentor checkpoint for evaluation or inference, strictly.

    Handles ``state_dict``/``model`` wrappers, ``module.`` prefixes, model
    wrappers (DDP etc.) and upstream PoolFormer backbone keys (mmseg 1.x over
    mmpretrain, sail-sg's mmseg 0.x code), which are converted in memory.
    The archive's checksums are verified and NaN/Inf weights refused.

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
        CheckpointError: the file is damaged (checksums) or its weights hold
            NaN/Inf (:class:`NonFiniteCheckpointError`).

    Returns:
        dict: the loaded checkpoint (``meta`` etc. untouched).
    """
    logger = logger or MMLogger.get_current_instance()
    checkpoint = read_checkpoint(filename)
    model = _unwrapped(model)
    fitted = fit_state_dict(model, unwrap_state_dict(checkpoint), filename,
                            allow_partial=allow_partial, logger=logger)
    model.load_state_dict(fitted, strict=False)
    expected = model.state_dict()
    loaded = sum(key in expected for key in fitted)
    logger.info(f'loaded {loaded} of {len(expected)} tensors from '
                f'{filename}')
    return checkpoint


def checked_for_mmengine(module: torch.nn.Module, state_dict: dict) -> dict:
    """What mmengine's ``load_state_dict`` loads into ``module``.

    For a model that contains a poolformer_seg backbone (our configs), the
    state dict is converted and checked by :func:`fit_state_dict`, so
    ``mmseg.apis.init_model``, ``MMSegInferencer``, a Runner's ``load_from``
    and ``--resume`` and mmseg's ``tools/test.py`` load as strictly as ours.
    Other models are left to mmengine. Installed by
    :func:`poolformer_seg.compat.apply`.
    """
    if not has_own_backbone(module):
        return state_dict
    return fit_state_dict(module, state_dict, "(loaded by mmengine's "
                          'load_state_dict)',
                          hint=FINE_TUNE_HINT)


# ----------------------------------------------------------------------------
# Runner checks: resume, class counts


def check_resumable(checkpoint: dict, source: str) -> None:
    """Refuse to ``--resume`` from a file that holds no training state.

    Raises:
        CheckpointError: ``meta.iter``/``meta.epoch`` or ``message_hub`` is
            missing (weights only, or written by tools/convert_checkpoint.py);
            the message says to use ``load_from`` instead.
    """
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    lacks = [f'meta.{key}' for key in ('iter', 'epoch') if key not in meta]
    lacks += [key for key in ('message_hub', ) if key not in checkpoint]
    if not lacks:
        return
    what = ('a checkpoint converted by tools/convert_checkpoint.py' if
            'poolformer_seg_converted_from' in meta else 'weights only')
    raise CheckpointError(
        f'cannot resume from {source}: it is not a training checkpoint '
        f'({what}; it lacks {", ".join(lacks)}). --resume continues a run '
        'from the iter_*.pth files that training writes (weights, optimizer, '
        'schedulers and iteration). To start a new run from these weights, '
        f'set load_from={source} (--cfg-options load_from=...) and train '
        'without --resume.')


class ClassCountMismatchError(CheckpointMismatchError):
    """The head, the checkpoint and the dataset disagree on the classes."""


def checkpoint_classes(checkpoint) -> Optional[tuple]:
    """The class names a checkpoint records (mmseg 1.x or 0.x meta)."""
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict):
        return None
    classes = (meta.get('dataset_meta') or {}).get('classes') or \
        meta.get('CLASSES')
    return tuple(classes) if classes else None


def check_class_count(model: torch.nn.Module, dataset, checkpoint,
                      source: str) -> None:
    """Refuse to evaluate a model on a dataset of another class count.

    Compares ``model.decode_head.num_classes``, the dataset's
    ``metainfo['classes']`` and, where recorded, the checkpoint's
    ``meta.dataset_meta.classes``.

    Raises:
        ClassCountMismatchError: naming the three counts.
    """
    head = getattr(_unwrapped(model), 'decode_head', None)
    dataset_classes = getattr(dataset, 'metainfo', {}).get('classes')
    if head is None or not dataset_classes:
        return
    recorded = checkpoint_classes(checkpoint)
    counts = {head.num_classes, len(dataset_classes)}
    if recorded is not None:
        counts.add(len(recorded))
    if len(counts) == 1:
        return
    stored = (f'{len(recorded)} ({", ".join(recorded[:3])}, ...)' if
              recorded else 'not recorded')
    raise ClassCountMismatchError(
        f'the class counts disagree: model.decode_head.num_classes='
        f'{head.num_classes}, the dataset {type(dataset).__name__} has '
        f'{len(dataset_classes)} classes, and checkpoint {source} '
        f'meta.dataset_meta.classes: {stored}. Evaluating would compare '
        'labels of different class sets and report a meaningless mIoU; use '
        'the config (and dataset) that the checkpoint was trained for.')
