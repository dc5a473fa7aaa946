"""Build a segmentor from a config + checkpoint and segment images.

    from poolformer_seg.apis import init_model, predict_mask
    model = init_model('configs/fpn_poolformer_s12_ade20k.py', 'iter.pth')
    mask = predict_mask(model, 'photo.jpg')   # H x W int64, labels 0..149

Differences from ``mmseg.apis`` (same names, same config conventions):

* checkpoints load **strictly** through
  :func:`poolformer_seg.utils.loading.load_segmentor_checkpoint` (a missing
  or mis-shaped weight is an error; upstream PoolFormer checkpoints are
  converted), not mmengine's lenient ``load_checkpoint``;
* the test transforms are taken from ``test_dataloader.dataset.pipeline``
  (what ``tools/test.py`` evaluates with), and the config is never modified
  (mmseg's ``inference_model`` edits ``cfg.test_pipeline`` in place, so an
  array input after a path input, or the reverse, used the wrong loader);
* classes and palette come from the checkpoint's ``meta.dataset_meta`` or
  else from the config's test dataset class, and must match the head's
  ``num_classes`` (mmseg guesses a dataset from the class count).
"""
import copy
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from mmengine.config import Config, ConfigDict
from mmengine.dataset import Compose
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmseg.registry import DATASETS, MODELS

from poolformer_seg.datasets.validation import check_input_file
from poolformer_seg.engine.config_check import check_config, read_config
from poolformer_seg.models.segmentors.rowwise_encoder_decoder import \
    compile_decision
from poolformer_seg.utils.loading import load_segmentor_checkpoint

__all__ = ['build_segmentor', 'init_model', 'for_repeated_inference',
           'inference_model', 'predict_mask', 'load_config',
           'inference_transforms']

ImageInput = Union[str, Path, np.ndarray]


def load_config(config, cfg_options: Optional[dict] = None) -> Config:
    """A :class:`Config` from a path or a Config (copied, never modified),
    checked by :func:`~poolformer_seg.engine.config_check.check_config`."""
    source = None
    if isinstance(config, (str, Path)):
        source = str(config)
        config = read_config(source)
    elif isinstance(config, Config):
        config = copy.deepcopy(config)
    else:
        raise TypeError(f'config must be a path or an mmengine Config, got '
                        f'{type(config)}')
    if cfg_options:
        config.merge_from_dict(cfg_options)
    check_config(config, source)
    return config


def _dataset_meta(cfg: Config, checkpoint: Optional[dict],
                  num_classes: int) -> dict:
    """``{'classes': ..., 'palette': ...}`` for the model's classes."""
    meta = (checkpoint or {}).get('meta', {}).get('dataset_meta')
    source = 'the checkpoint meta'
    if not meta or 'classes' not in meta or 'palette' not in meta:
        dataset_type = cfg.get('test_dataloader', {}).get(
            'dataset', {}).get('type')
        dataset_cls = DATASETS.get(dataset_type) if dataset_type else None
        if dataset_cls is None:
            raise ValueError(
                'cannot name the classes: the checkpoint has no '
                'meta.dataset_meta and the config has no registered '
                f'test_dataloader.dataset.type (got {dataset_type!r})')
        meta = dataset_cls.METAINFO
        source = f'{dataset_type}.METAINFO'
    classes, palette = tuple(meta['classes']), meta['palette']
    if len(classes) != num_classes or len(palette) < num_classes:
        raise ValueError(f'{source} lists {len(classes)} classes and '
                         f'{len(palette)} colours, but the decode head '
                         f'predicts {num_classes} classes')
    return dict(classes=classes, palette=[list(c) for c in palette])


def build_segmentor(config, cfg_options: Optional[dict] = None
                    ) -> torch.nn.Module:
    """The segmentor of ``config`` for inference, with weights left as built.

    No pretrained backbone is downloaded (``init_cfg`` is dropped), SyncBN
    becomes BN (it only matters for distributed training), eval mode, on the
    CPU. ``.cfg`` holds the (copied) config.
    """
    cfg = load_config(config, cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    cfg.model.pop('pretrained', None)
    cfg.model.train_cfg = None
    if 'backbone' in cfg.model:
        cfg.model.backbone.init_cfg = None
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    model.cfg = cfg
    return model.eval()


def init_model(config, checkpoint: Optional[str] = None,
               device: Optional[str] = None,
               cfg_options: Optional[dict] = None,
               allow_partial: bool = False,
               compile=None) -> torch.nn.Module:
    """Build the segmentor of ``config`` in eval mode, in its fastest form
    for repeated inference, and load its weights.

    The model is called as mmseg's are (``model(inputs, mode='tensor')``,
    ``model.test_step(batch)``, ``mmseg.apis.inference_model``). The
    configs build the fast path (``model.impl='fast'``) and say whether
    inference runs through ``torch.compile``: ``model.test_cfg.compile``,
    ``'auto'`` by default, which this function turns into True on CUDA
    (the returned model's setting) and leaves eager on CPU. A compiled model
    pays the compilation (over two minutes on an H200's host) at its first
    image; one graph then serves every image size. A caller with one image
    (or a few hundred) skips it with ``compile=False``; ``compile=True``
    compiles on CPU too (there it costs one to four minutes and gains
    7-12%).

    Args:
        config (str | Path | Config): config file or object.
        checkpoint (str, optional): segmentor checkpoint (path or URL). None
            initialises the weights randomly (the model's ``init_weights``
            without the backbone's ImageNet ``init_cfg``, which is never
            downloaded here): for tests and cost analysis.
        device (str, optional): e.g. ``'cpu'``, ``'cuda:0'``. Default: CUDA
            if available, else CPU.
        cfg_options (dict, optional): ``Config.merge_from_dict`` overrides.
        allow_partial (bool): load a checkpoint that lacks some weights, with
            a warning, instead of raising ``CheckpointMismatchError``.
        compile (bool | str, optional): overrides
            ``model.test_cfg.compile`` (``'auto'``, True, False); None keeps
            the config's.

    Returns:
        The segmentor, with ``.cfg`` (the config) and ``.dataset_meta``
        (``classes`` and RGB ``palette``) set.
    """
    if compile is not None:
        cfg_options = {**(cfg_options or {}),
                       'model.test_cfg.compile': compile}
    model = build_segmentor(config, cfg_options)
    loaded = None
    if checkpoint is None:
        model.init_weights()
    else:
        loaded = load_segmentor_checkpoint(model, checkpoint,
                                           allow_partial=allow_partial)
    model.dataset_meta = _dataset_meta(model.cfg, loaded,
                                       model.decode_head.num_classes)
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return for_repeated_inference(model, device).to(device).eval()


def for_repeated_inference(model: torch.nn.Module, device) -> torch.nn.Module:
    """``model``, its ``test_cfg.compile='auto'`` turned into True where
    a model that serves many images compiles (:func:`~poolformer_seg.
    models.segmentors.rowwise_encoder_decoder.compile_decision`: CUDA).
    Other settings, and segmentors without the setting, are left as they
    are."""
    setting = getattr(model, 'compile_setting', None)
    if setting == 'auto' and compile_decision(setting, device):
        if model.test_cfg is None:
            model.test_cfg = ConfigDict()
        model.test_cfg['compile'] = True
    return model


def inference_transforms(cfg: Config) -> List[dict]:
    """The test pipeline of ``cfg`` without image loading and annotations.

    Taken from ``test_dataloader.dataset.pipeline``, else ``test_pipeline``.
    """
    pipeline = cfg.get('test_dataloader', {}).get('dataset', {}).get(
        'pipeline') or cfg.get('test_pipeline')
    if not pipeline:
        raise ValueError('the config has neither '
                         'test_dataloader.dataset.pipeline nor test_pipeline')
    if pipeline[0].get('type') not in ('LoadImageFromFile',
                                       'LoadImageFromNDArray'):
        raise ValueError(f'the test pipeline must start by loading the image '
                         f'(LoadImageFromFile), got {pipeline[0]}')
    return [dict(t) for t in pipeline[1:]
            if t.get('type') != 'LoadAnnotations']


def _load_step(img: ImageInput) -> dict:
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f'an image array must be H x W x 3 uint8 (BGR, '
                             f'as cv2.imread gives), got {img.dtype} '
                             f'{img.shape}')
        return dict(img=img)
    if isinstance(img, (str, Path)):
        check_input_file(str(img), 'image file')
        return dict(img_path=str(img))
    raise TypeError(f'img must be a path or an H x W x 3 uint8 array, got '
                    f'{type(img)}')


def inference_model(model: torch.nn.Module, img: Union[ImageInput,
                                                       Sequence[ImageInput]]):
    """Segment one image or a list of images with the config's test pipeline.

    Args:
        model: from :func:`init_model` (needs ``model.cfg``).
        img: a file path, an ``H x W x 3`` uint8 **BGR** array (OpenCV /
            mmcv order), or a list of these. Images are run one at a time,
            so they may differ in size.

    Returns:
        ``SegDataSample`` (a list for a list input) with ``pred_sem_seg``
        (``1 x H x W`` labels) at the input's original size. The configs
        here build a ``RowwiseEncoderDecoder``, which computes the labels
        one row at a time and returns no ``seg_logits``; build the model
        with ``cfg_options={'model.keep_seg_logits': True}`` to get them
        (``C x H x W`` fp32 at the original size: 4 * C bytes per pixel).
    """
    if not hasattr(model, 'cfg'):
        raise ValueError('model has no .cfg; build it with init_model()')
    is_batch = isinstance(img, (list, tuple))
    images = list(img) if is_batch else [img]
    transforms = inference_transforms(model.cfg)
    pipelines = {
        loader: Compose([dict(type=loader)] + transforms)
        for loader in ('LoadImageFromFile', 'LoadImageFromNDArray')}
    results = []
    for image in images:
        inputs = _load_step(image)
        loader = 'LoadImageFromFile' if 'img_path' in inputs else \
            'LoadImageFromNDArray'
        data = pipelines[loader](inputs)
        batch = dict(inputs=[data['inputs']],
                     data_samples=[data['data_samples']])
        with torch.no_grad():
            results.extend(model.test_step(batch))
    return results if is_batch else results[0]


def predict_mask(model: torch.nn.Module, img: Union[ImageInput,
                                                    Sequence[ImageInput]]):
    """Like :func:`inference_model`, but return the label map(s) as numpy:
    ``H x W`` int64 arrays of class indices ``0..num_classes-1`` at the
    input's original size."""
    results = inference_model(model, img)
    if isinstance(results, list):
        return [r.pred_sem_seg.data[0].cpu().numpy() for r in results]
    return results.pred_sem_seg.data[0].cpu().numpy()
