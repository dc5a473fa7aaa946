"""Read a config and check that its parts fit together before work starts.

Mistakes that MMEngine accepts silently or reports far from their cause:

* a syntax error: mmengine reports it without the file's line, or as a
  "There are syntax errors" message without the file of a base;
* a misspelt top-level key (``train_cfgg``): the Runner ignores keys it does
  not know, so the setting silently does nothing;
* ``model.decode_head.num_classes`` unlike the dataset's class count: a bare
  ``IndexError`` from the loss, or metrics over the wrong classes;
* ``model.neck.in_channels`` unlike the channels that the backbone returns
  for its ``out_indices``: an assertion without a message, or a shape error
  in the first forward;
* ``model.impl`` (``--cfg-options model.impl=plain``, the switch between the
  fast path and upstream mmseg's computation) with a value other than
  ``'fast'``/``'plain'``, or on a segmentor type without the switch (mmseg's
  ``EncoderDecoder``): a ``TypeError`` from deep inside the build;
* ``model.test_cfg.compile`` other than ``'auto'``, True or False (a
  misspelt ``'ture'`` would otherwise only fail at the build), or True on
  a segmentor type that does not read it (mmseg's ``EncoderDecoder``).

Each raises :class:`ConfigError` naming the file or key and the fix.
"""
import ast
import difflib
import inspect
import os.path as osp
from typing import Iterator, List, Optional, Tuple

from mmengine.config import Config

__all__ = ['ConfigError', 'read_config', 'check_config',
           'known_top_level_keys']


class ConfigError(ValueError):
    """A config cannot be read, or its settings contradict each other."""


def _runner_keys() -> set:
    from mmengine.runner import Runner
    return set(inspect.signature(Runner.__init__).parameters) - {'self',
                                                                 'cfg'}


# Read by the Runner builders and mmseg's/our tools besides Runner's own
# arguments, and the variables that OpenMMLab configs conventionally define.
_CONVENTIONS = {
    '_base_', 'custom_imports', 'runner_type', 'model_wrapper_cfg',
    'find_unused_parameters', 'tta_model', 'tta_pipeline', 'vis_backends',
    'compile', 'strategy', 'cfg', 'work_dir', 'launcher', 'resume',
    'norm_cfg', 'crop_size', 'img_scale', 'img_ratios', 'data_root',
    'dataset_type', 'train_pipeline', 'test_pipeline', 'val_pipeline',
    'checkpoint', 'checkpoint_file', 'pretrained', 'backend_args',
    'num_classes', 'dist_params', 'workflow', 'data_preprocessor',
    'test_pipeline_aligned', 'optimizer', 'optimizer_config', 'lr_config',
    'runner', 'evaluation', 'checkpoint_config', 'log_config',
    'cudnn_benchmark',
}
# ``difflib`` ratio above which an unknown key is taken for a typo of a
# known one: one wrong, added or missing letter in a name of 8+ letters.
_TYPO_RATIO = 0.85


def known_top_level_keys() -> set:
    """Top-level keys that something reads, or that configs use by
    convention."""
    return _runner_keys() | _CONVENTIONS


def read_config(path: str) -> Config:
    """``Config.fromfile(path)``, with errors that name the file and line.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: ``path`` is not a regular file, or it or one of its
            ``_base_`` files has a syntax error.
    """
    path = str(path)
    if not osp.exists(path):
        raise FileNotFoundError(f'config file not found: {path}')
    if not osp.isfile(path):
        raise ConfigError(f'config {path} is not a regular file')
    _parse(path)
    try:
        return Config.fromfile(path)
    except SyntaxError as err:  # mmengine does not say which _base_ file
        _base_files(path)  # raises for the first broken one
        raise ConfigError(f'config {_where(err, path)} (or one of its '
                          f'_base_ files): syntax error: {err.msg}') from None


def _base_files(path: str, seen=None) -> List[str]:
    """The local ``.py`` files that ``path`` inherits, recursively, each
    checked by :func:`_parse`."""
    seen = set() if seen is None else seen
    tree = _parse(path)
    found = []
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == '_base_'
                for t in node.targets)):
            continue
        try:
            bases = ast.literal_eval(node.value)
        except ValueError:
            continue
        for base in [bases] if isinstance(bases, str) else list(bases):
            base = osp.join(osp.dirname(path), base)
            if base.endswith('.py') and osp.isfile(base) and \
                    base not in seen:
                seen.add(base)
                found += [base] + _base_files(base, seen)
    return found


def _where(err: SyntaxError, default: str) -> str:
    filename = err.filename if err.filename and \
        err.filename != '<unknown>' else default
    return f'{filename}, line {err.lineno}' if err.lineno else filename


def _parse(path: str) -> ast.Module:
    with open(path, encoding='utf-8') as f:
        source = f.read()
    try:
        return ast.parse(source, filename=path)
    except SyntaxError as err:
        text = (err.text or '').strip()
        shown = f' ({text!r})' if text else ''
        raise ConfigError(f'config {_where(err, path)}: syntax error: '
                          f'{err.msg}{shown}; fix that line') from None


def check_config(cfg: Config, source: Optional[str] = None) -> None:
    """Run every check of this module on ``cfg``; raise the first problem.

    Args:
        cfg: a loaded config (after ``--cfg-options``).
        source: the config file, for messages.
    """
    check_top_level_keys(cfg, source)
    check_num_classes(cfg)
    check_neck_channels(cfg)
    check_model_impl(cfg)
    check_compile_setting(cfg)


def check_top_level_keys(cfg: Config, source: Optional[str] = None) -> None:
    """Refuse a top-level key that nothing reads and that is a near-miss of
    one that something does (``train_cfgg`` for ``train_cfg``).

    Configs may define their own variables (``crop_size = (512, 512)``), so
    an unknown key alone is fine; only a close match to a known key counts.
    """
    known = known_top_level_keys()
    where = f' in {source}' if source else ''
    for key in cfg.keys():
        if key in known or key.startswith('_'):
            continue
        close = difflib.get_close_matches(key, known, n=1,
                                          cutoff=_TYPO_RATIO)
        if close:
            raise ConfigError(
                f'unknown top-level config key {key!r}{where} (did you mean '
                f'{close[0]!r}?): nothing reads it, so it would be ignored. '
                f'Rename it; if it is a variable of your own, give it a name '
                f'that is not a near-miss of {close[0]!r}')


def _heads(model: dict) -> Iterator[Tuple[str, dict]]:
    for name in ('decode_head', 'auxiliary_head'):
        heads = model.get(name)
        if isinstance(heads, dict):
            yield f'model.{name}', heads
        elif isinstance(heads, (list, tuple)):
            for i, head in enumerate(heads):
                if isinstance(head, dict):
                    yield f'model.{name}[{i}]', head


def _dataset_classes(dataset: dict) -> Optional[Tuple[str, int]]:
    """``(type, number of classes)`` of a dataset config, or None when the
    type is not registered or lists no classes."""
    from mmseg.registry import DATASETS
    metainfo = dataset.get('metainfo') or {}
    if metainfo.get('classes') is not None:
        return dataset.get('type', '?'), len(metainfo['classes'])
    if 'type' not in dataset:
        return None
    if isinstance(dataset.get('dataset'), dict):  # wrappers (RepeatDataset)
        return _dataset_classes(dataset['dataset'])
    dataset_cls = DATASETS.get(dataset['type']) \
        if isinstance(dataset['type'], str) else dataset['type']
    classes = getattr(dataset_cls, 'METAINFO', {}).get('classes')
    if not classes:
        return None
    return dataset_cls.__name__, len(classes)


def check_num_classes(cfg: Config) -> None:
    """Each head's ``num_classes`` against each data loader's dataset."""
    model = cfg.get('model')
    if not isinstance(model, dict):
        return
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dataset = (cfg.get(loader) or {}).get('dataset')
        found = _dataset_classes(dataset) if isinstance(dataset, dict) \
            else None
        if found is None:
            continue
        dataset_type, count = found
        for name, head in _heads(model):
            num = head.get('num_classes')
            # binary segmentation: 2 classes, one sigmoid output
            binary = count == 2 and head.get('out_channels', num) == 1
            if num is None or num == count or binary:
                continue
            raise ConfigError(
                f'{name}.num_classes={num} but {loader}.dataset '
                f'({dataset_type}) has {count} classes: the head needs one '
                f'output per class. Set {name}.num_classes={count} (e.g. '
                f'--cfg-options {name}.num_classes={count}), or give the '
                f'dataset metainfo=dict(classes=[...]) with {num} classes')


def _backbone_out_channels(backbone: dict) -> Optional[List[int]]:
    """Channels of each output of a PoolFormer or MetaFormer backbone
    config, or None for other backbones (they are built to find out)."""
    from mmseg.registry import MODELS

    from poolformer_seg.models.backbones.base import StagedBackbone
    backbone_cls = MODELS.get(backbone.get('type')) \
        if isinstance(backbone.get('type'), str) else backbone.get('type')
    if not (isinstance(backbone_cls, type)
            and issubclass(backbone_cls, StagedBackbone)):
        return None
    return backbone_cls.output_channels(
        backbone.get('arch'), backbone.get('out_indices', (0, 1, 2, 3)))


def check_neck_channels(cfg: Config) -> None:
    """``model.neck.in_channels`` against the backbone's outputs."""
    model = cfg.get('model')
    if not isinstance(model, dict) or not isinstance(model.get('neck'),
                                                     dict):
        return
    backbone, neck = model.get('backbone') or {}, model['neck']
    expected = _backbone_out_channels(backbone)
    in_channels = neck.get('in_channels')
    if expected is None or in_channels is None:
        return
    given = list(in_channels) if isinstance(in_channels, (list, tuple)) \
        else [in_channels]
    if given == expected:
        return
    arch = backbone.get('arch', 's12')
    raise ConfigError(
        f'model.neck.in_channels={given} does not match the backbone: '
        f'model.backbone ({backbone["type"]}, arch={arch!r}) with '
        f'out_indices={tuple(backbone.get("out_indices", (0, 1, 2, 3)))} '
        f'returns {len(expected)} feature maps with {expected} channels. '
        f'Set model.neck.in_channels={expected}, or change '
        'model.backbone.out_indices')


def check_model_impl(cfg: Config) -> None:
    """``model.impl``: a known value, on a segmentor type that takes it."""
    from mmseg.registry import MODELS

    from poolformer_seg.models.segmentors.rowwise_encoder_decoder import \
        IMPLS
    model = cfg.get('model')
    if not isinstance(model, dict) or 'impl' not in model:
        return
    if model['impl'] not in IMPLS:
        raise ConfigError(f'model.impl={model["impl"]!r} is not known; '
                          f'choose one of {list(IMPLS)}')
    kind = model.get('type')
    model_cls = MODELS.get(kind) if isinstance(kind, str) else kind
    if isinstance(model_cls, type) and \
            'impl' not in inspect.signature(model_cls).parameters:
        raise ConfigError(
            f'model.impl is set but model.type={kind!r} has no impl switch. '
            f"Set model.type='RowwiseEncoderDecoder' (EncoderDecoder's "
            'layers and weights, with the switch), or remove model.impl '
            '(inherited from a _base_ model: redefine model with '
            '_delete_=True)')


def check_compile_setting(cfg: Config) -> None:
    """``model.test_cfg.compile``: ``'auto'``, True or False."""
    from mmseg.registry import MODELS

    from poolformer_seg.models.segmentors import rowwise_encoder_decoder
    model = cfg.get('model') or {}
    test_cfg = model.get('test_cfg') or {}
    if 'compile' not in test_cfg:
        return
    try:
        rowwise_encoder_decoder.check_compile_setting(test_cfg['compile'])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    # True asks for compiling; 'auto' (inherited from our base configs) and
    # False are what a segmentor without the setting does anyway
    kind = model.get('type')
    model_cls = MODELS.get(kind) if isinstance(kind, str) else kind
    if test_cfg['compile'] is True and isinstance(model_cls, type) and \
            not issubclass(model_cls,
                           rowwise_encoder_decoder.RowwiseEncoderDecoder):
        raise ConfigError(
            f'model.test_cfg.compile=True but model.type={kind!r} does '
            "not read it (it would do nothing). Set model.type="
            "'RowwiseEncoderDecoder', or remove model.test_cfg.compile")
