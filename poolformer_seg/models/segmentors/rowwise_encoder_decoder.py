"""An ``EncoderDecoder`` whose label map costs memory in proportion to the
image, not to 150 x the image.

mmseg's ``EncoderDecoder.postprocess_result`` resizes the logits of all
classes to the original image size in fp32 and keeps them as ``seg_logits``
next to the labels: ``4 * num_classes`` bytes per pixel, 14.4 GB for a
6000x4000 photo and 150 classes, although only their arg-max is used.
:func:`twice_resized_argmax` computes the labels of both of mmseg's
resizes (to the input size, then to the original size) straight from the
head's logits, in blocks of output rows; where that would need too much
memory (a photo far wider than the input), :func:`resized_argmax` computes
the second resize and the arg-max in blocks of rows, so that memory stays
bounded whatever the photo's size.

``impl`` is the model's one switch between our fast path (the default) and
upstream mmseg's computation of the same function (``impl='plain'``, e.g.
``--cfg-options model.impl=plain``). ``test_cfg['compile']`` says whether
inference runs its tensor part through ``torch.compile`` (True; ``'auto'``
is decided by whoever builds the model for inference,
:func:`compile_decision`).
"""
import copy
import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from mmengine.structures import PixelData
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.models.necks import FPN
from mmseg.models.segmentors import EncoderDecoder, SegTTAModel
from mmseg.registry import MODELS

from ..backbones.base import IMPLS
from ..decode_heads import FastDecodeHead, FastFPNHead
from ..necks import FastFPN
from ..resize import input_size
from ..utils import autocast_off

__all__ = ['RowwiseEncoderDecoder', 'FullLogitsSegTTAModel', 'resized_argmax',
           'source_positions', 'IMPLS', 'PLAIN_TYPES', 'check_compile_setting',
           'compile_decision']

# What ``impl='plain'`` builds in place of our fast modules: mmseg's own
# classes, which take the same arguments and hold the same weights.
PLAIN_TYPES = {'FastFPN': 'FPN', 'FastFPNHead': 'FPNHead',
               'FastUPerHead': 'UPerHead', 'FastFCNHead': 'FCNHead'}


def check_compile_setting(value):
    """``value`` if it is ``'auto'``, True or False (not 1 or ``'true'``),
    else ValueError naming ``model.test_cfg.compile``."""
    if value is True or value is False or value == 'auto':
        return value
    raise ValueError(f'model.test_cfg.compile={value!r} is not known; '
                     f"choose 'auto' (compiled by poolformer_seg.apis."
                     f"init_model on CUDA, eager in the tools), True or "
                     f"False")


def compile_decision(setting, device) -> bool:
    """Whether a model built for repeated inference on ``device``
    (:func:`poolformer_seg.apis.init_model`) compiles, for a
    ``test_cfg['compile']`` ``setting``; a model itself compiles only when
    its setting is True (:meth:`RowwiseEncoderDecoder.compiles`).

    ``'auto'`` is True on CUDA only. What passes over each image once
    (``tools/test.py``, validation in training, ``tools/inference.py``,
    mmseg's tools) keeps ``'auto'`` eager everywhere, because there the
    compilation costs more than it gains: on CUDA (an H200's host, 16
    cores) the first compilation with dynamic shapes took over two minutes,
    against milliseconds for an eager forward. On CPU (2 cores,
    fp32, S12, 512x512) it took 110 s (upstream model) to 245 s (ours) with
    AVX2 for at most ~7% faster inference; with AVX-512, 50 s (upstream)
    and 100 s (ours) for 1.12x and 1.10x (ours: 429 against 474 ms),
    repaid after about 1,000 images. On ``meta`` there is nothing to run.
    """
    setting = check_compile_setting(setting)
    if setting == 'auto':
        return torch.device(device).type == 'cuda'
    return setting


def _logits(model, inputs):
    """The tensor part of inference: ``decode_head.forward`` of the
    features, logits at the head's resolution."""
    return model.decode_head.forward(model.head_inputs(inputs))


def _traced_logits(model, inputs):
    """:func:`_logits` as the compiler traces it: a fast neck or head runs
    the forward of the mmseg class it derives from (``FPN.forward``, a fast
    head's ``plain_forward``: same layers and weights). Their CPU tricks --
    in-place sums guarded by storage checks, Winograd convolutions chosen
    by size -- are graph breaks or size guards to dynamo, and the compiler
    fuses the plain graph itself."""
    x = model.backbone(inputs)
    if model.with_neck:
        neck = model.neck
        x = FPN.forward(neck, x) if isinstance(neck, FPN) else neck(x)
    head = model.decode_head
    if isinstance(head, FastDecodeHead):
        return head.plain_forward(x)
    return head.forward(x)


@functools.lru_cache(maxsize=None)
def _compiled_logits():
    # Compiled on first use and held here, not on the model: a checkpoint
    # or a deep copy never carries a compiled object, and a copy never calls
    # a function bound to the original. Dynamo guards on the model it is
    # given. dynamic=True: one graph serves images of every size (ADE20K's
    # test images all differ).
    return torch.compile(_traced_logits, dynamic=True)


def _plain_part(cfg):
    """``cfg`` with a fast neck/head type replaced by mmseg's own (each
    of a list of auxiliary heads)."""
    if isinstance(cfg, (list, tuple)):
        return [_plain_part(part) for part in cfg]
    if not isinstance(cfg, dict):
        return cfg
    cfg = copy.deepcopy(cfg)
    kind = cfg.get('type')
    name = kind.__name__ if isinstance(kind, type) else \
        str(kind).rsplit('.', 1)[-1]  # 'mmseg.FastFPN' -> 'FastFPN'
    if name in PLAIN_TYPES:
        cfg['type'] = PLAIN_TYPES[name]
    return cfg


def _plain_backbone(cfg):
    """``cfg`` with ``impl='plain'`` where the backbone type takes an
    ``impl`` (ours: PoolFormer); other backbones get nothing."""
    cfg = copy.deepcopy(cfg)
    if cfg.get('impl', 'plain') != 'plain':
        raise ValueError(
            f"model.impl='plain' contradicts model.backbone.impl="
            f"{cfg['impl']!r}: remove model.backbone.impl (model.impl "
            f"sets it) or set both to the same value")
    kind = cfg.get('type')
    backbone_cls = MODELS.get(kind) if isinstance(kind, str) else kind
    if isinstance(backbone_cls, type) and \
            'impl' in inspect.signature(backbone_cls).parameters:
        cfg['impl'] = 'plain'
    return cfg

def source_positions(in_size: int, out_size: int, align_corners: bool,
                     device=None):
    """For each output index of a bilinear resize along one axis: the two
    input indices and their weights, ``(i0, i1, w0, w1)``.

    The positions follow PyTorch's ``upsample_bilinear2d`` (what
    ``F.interpolate`` and mmseg's ``resize`` run): with ``align_corners``
    output ``d`` maps to ``d * (in - 1) / (out - 1)``, without it to
    ``(d + 0.5) * in / out - 0.5``, clamped at 0; ``i1 = i0 + 1`` except at
    the last input index. PyTorch's compiled kernel evaluates the latter as a
    fused multiply-add, reproduced here by computing it in float64 and
    rounding once.
    """
    out = torch.arange(out_size, dtype=torch.float32, device=device)
    if align_corners:
        scale = torch.tensor((in_size - 1) / (out_size - 1)
                             if out_size > 1 else 0., device=device)
        source = scale * out
    else:
        scale = torch.tensor(float(in_size), device=device) / out_size
        source = (scale.double() * (out + 0.5).double() - 0.5).float()
        source = source.clamp_min(0)
    i0 = source.floor().long().clamp_max(in_size - 1)
    w1 = (source - i0).clamp(0, 1)
    i1 = i0 + (i0 < in_size - 1).long()
    return i0, i1, 1 - w1, w1


WHOLE_IMAGE_BYTES = 256 * 2**20
"""Up to this size of the resized scores, :func:`resized_argmax` resizes
the whole image at once (mmseg's computation, the fastest)."""
BLOCK_BYTES = 32 * 2**20
"""Beyond :data:`WHOLE_IMAGE_BYTES`, the size of the scores of one block of
output rows (a few such temporaries exist at a time)."""


CPU_LABEL_BLOCK_BYTES = 4 * 2**20
"""The scores of one block of output rows in :func:`twice_resized_argmax`
on the CPU, read by the arg-max right after the product that writes them:
measured 1.7x faster than :data:`BLOCK_BYTES` (2 cores, 150 classes, 505
x 709: 122 against 204 ms). Elsewhere (CUDA) every block is kernel
launches, and blocks take :data:`BLOCK_BYTES`."""


def _batch_of_one(logits):
    """``logits[None]`` in the memory format of ``logits``.

    ``logits[None]`` of a classes-innermost (channels_last) ``C x h x w``
    gets a batch stride of ``C``, and PyTorch's bilinear resize then takes
    the tensor for NCHW: a strided read and an NCHW result, whose arg-max
    over classes is strided too. Measured (2 cores, 150 x 512 x 704 to
    372 x 512): 413 + 58 ms, against 77 + 19 ms when the batch stride is
    the whole image, as here."""
    if logits.stride(0) != 1 or logits.dim() != 3:
        return logits[None]
    return logits.permute(1, 2, 0)[None].permute(0, 3, 1, 2)


def resized_argmax(logits: torch.Tensor, size, align_corners: bool,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``argmax`` over classes of ``logits`` resized bilinearly to ``size``,
    in bounded memory.

    When the resized scores fit in :data:`WHOLE_IMAGE_BYTES` (an ADE20K image:
    150 classes at 512 x 683 are 210 MB), they are computed as mmseg does,
    ``F.interpolate`` then ``argmax``. Beyond that (a photo from a camera:
    14.4 GB at 6000 x 4000), one block of output rows at a time: as in
    PyTorch's kernel, output row ``r`` blends input rows ``i0[r]`` and
    ``i1[r]`` (weights ``w0[r]``, ``w1[r]``; :func:`source_positions`),
    each resized along the width first. A block takes the input rows it
    needs (a contiguous span: the positions only move forward), resizes
    them along the width once, blends them and takes the arg-max; its
    scores are at most :data:`BLOCK_BYTES`. All arithmetic is
    element-wise: ``x0 * w0 + x1 * w1`` per pixel and class, each product
    and sum rounded once, so the result does not depend on how the image is
    cut into blocks; ``tests/models/segmentors`` compares it with the same
    formula evaluated on the whole image at once. Against
    ``F.interpolate`` + ``argmax`` (mmseg): the scores agree to a few fp32
    ulps (the compiled kernel fuses some multiply-adds), so labels can differ
    only where the two best classes are that close (2 pixels in 10 million
    in the tests).

    Args:
        logits: ``C x h x w`` float scores of one image.
        size: ``(H, W)`` output size.
        align_corners: as the decode head's.
        out: optional ``H x W`` int64 tensor to write the labels into.

    Returns:
        ``H x W`` int64 class indices (``out`` if given).
    """
    height, width = size
    device, dtype = logits.device, logits.dtype
    if out is None:
        out = torch.empty(size, dtype=torch.long, device=device)
    rows0, rows1, row_w0, row_w1 = source_positions(
        logits.shape[1], height, align_corners, device)
    cols0, cols1, col_w0, col_w1 = source_positions(
        logits.shape[2], width, align_corners, device)
    col_w0 = col_w0.to(dtype).view(-1, 1)
    col_w1 = col_w1.to(dtype).view(-1, 1)
    row_w0 = row_w0.to(dtype).view(-1, 1, 1)
    row_w1 = row_w1.to(dtype).view(-1, 1, 1)
    # classes last: selecting rows and columns then moves whole C-vectors
    # (selecting along the innermost dimension is many times slower)
    pixels = logits.permute(1, 2, 0)  # h x w x C
    row_bytes = logits.shape[0] * width * logits.element_size()
    if row_bytes * height <= WHOLE_IMAGE_BYTES:
        resized = F.interpolate(_batch_of_one(logits), size, mode='bilinear',
                                align_corners=align_corners)
        return torch.argmax(resized[0], dim=0, out=out)
    step = max(1, BLOCK_BYTES // row_bytes)
    for start in range(0, height, step):
        block = slice(start, start + step)
        first, last = int(rows0[block][0]), int(rows1[block][-1])
        span = pixels[first:last + 1]  # the input rows the block needs
        wide = span.index_select(1, cols0).mul_(col_w0).add_(
            span.index_select(1, cols1).mul_(col_w1))  # rows x W x C
        # indexing, not index_select: the latter copies large rows slowly
        upper = wide[rows0[block] - first].mul_(row_w0[block])
        lower = wide[rows1[block] - first].mul_(row_w1[block])
        torch.argmax(upper.add_(lower), dim=-1, out=out[block])
    return out


def _interpolation_matrix(in_size: int, out_size: int, align_corners: bool,
                          device) -> torch.Tensor:
    """``out_size x in_size`` float64 matrix of a bilinear resize along one
    axis (two taps per row, :func:`source_positions`)."""
    i0, i1, w0, w1 = source_positions(in_size, out_size, align_corners,
                                      device)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64,
                         device=device)
    rows = torch.arange(out_size, device=device)
    matrix.index_put_((rows, i0), w0.double(), accumulate=True)
    matrix.index_put_((rows, i1), w1.double(), accumulate=True)
    return matrix


def twice_resized_argmax(logits: torch.Tensor, resize_to, crop, flip,
                         size, align_corners: bool) -> Optional[torch.Tensor]:
    """The labels of mmseg's prediction from head-resolution logits:
    ``logits`` (``C x h x w``) resized bilinearly to ``resize_to`` (the
    decode head's ``predict_by_feat``), cropped (``crop``: ``(top,
    bottom, left, right)`` rows and columns removed), flipped (``flip``:
    None, ``'horizontal'`` or ``'vertical'``), resized to ``size`` and
    arg-maxed over classes (``postprocess_result``).

    Both resizes are linear per class, so the scores are ``Ah L Aw^T``
    with ``Ah`` (``H x h``) and ``Aw`` (``W x w``) the composed matrices
    (3-4 taps per row): one matrix product along the width for all classes,
    then, for blocks of output rows, one along the height over the input
    rows the block needs, and the arg-max. The scores are rounded once
    where mmseg rounds twice (labels can differ only where the two best
    classes are within a few ulps); nothing of ``C x H x W`` is built.
    Returns None when the width product, ``C x h x W``, would exceed
    :data:`WHOLE_IMAGE_BYTES` (a photo much wider than the input).

    The products run in at least fp32 under autocast too (which would run
    them, the interpolation matrices' included, in bf16 or fp16).
    """
    with autocast_off(torch.device('cpu')), autocast_off(logits.device):
        return _twice_resized_argmax(logits, resize_to, crop, flip, size,
                                     align_corners)


def _twice_resized_argmax(logits, resize_to, crop, flip, size,
                          align_corners):
    """:func:`twice_resized_argmax`, autocast off."""
    classes, height, width = logits.shape
    out_h, out_w = size
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if classes * height * out_w * dtype.itemsize > WHOLE_IMAGE_BYTES:
        return None
    top, bottom, left, right = crop
    # the matrices are small: built on the CPU, where the row spans are read
    along_h = _interpolation_matrix(height, resize_to[0], align_corners,
                                    'cpu')[top:resize_to[0] - bottom]
    along_w = _interpolation_matrix(width, resize_to[1], align_corners,
                                    'cpu')[left:resize_to[1] - right]
    if flip == 'vertical':
        along_h = along_h.flip(0)
    elif flip == 'horizontal':
        along_w = along_w.flip(0)
    along_h = _interpolation_matrix(along_h.shape[0], out_h, align_corners,
                                    'cpu') @ along_h
    along_w = _interpolation_matrix(along_w.shape[0], out_w, align_corners,
                                    'cpu') @ along_w
    device = logits.device
    # h x W x classes: a block of output rows is then one product, and the
    # arg-max runs over contiguous classes (2.7x faster than over a middle
    # dimension on the CPU)
    wide = torch.matmul(along_w.to(device, dtype),
                        logits.to(dtype).permute(1, 2, 0))
    wide = wide.view(height, out_w * classes)
    used = along_h != 0
    along_h = along_h.to(device, dtype)
    labels = torch.empty(size, dtype=torch.long, device=device)
    block_bytes = CPU_LABEL_BLOCK_BYTES if device.type == 'cpu' else \
        BLOCK_BYTES
    step = max(1, block_bytes // (classes * out_w * dtype.itemsize))
    for start in range(0, out_h, step):
        block = slice(start, start + step)
        rows = used[block].any(0).nonzero()
        first, last = int(rows[0]), int(rows[-1]) + 1
        scores = along_h[block, first:last] @ wide[first:last]
        torch.argmax(scores.view(-1, out_w, classes), dim=2,
                     out=labels[block])
    return labels


@MODELS.register_module()
class RowwiseEncoderDecoder(EncoderDecoder):
    """mmseg's ``EncoderDecoder`` whose predictions at the original image
    size are computed by :func:`twice_resized_argmax` (or
    :func:`resized_argmax`).

    Same arguments, layers, state-dict keys and ``pred_sem_seg`` as
    ``EncoderDecoder``, plus:

    Args:
        impl (str): ``'fast'`` (default): the modules as configured (the
            configs use our fast ones: the backbones' default
            ``impl='fast'``, ``FastFPN``, ``FastFPNHead``, ``FastUPerHead``,
            ``FastFCNHead``) and the row-wise label map.
            ``'plain'``: the same function computed as upstream mmseg does:
            each fast neck or head (decode or auxiliary) is built as the
            mmseg class it derives from (:data:`PLAIN_TYPES`; same
            arguments), a backbone that
            takes ``impl`` gets ``impl='plain'`` (a backbone config that
            says ``impl='fast'`` is refused as a contradiction), and the
            predictions go through ``EncoderDecoder.postprocess_result``
            (full-size ``seg_logits``). Checkpoints load into either.
        keep_seg_logits (bool): also return ``seg_logits``, the
            ``C x H x W`` scores at the original size, computed as mmseg
            does (and costing what it costs: 4 * C bytes per pixel in fp32,
            the autocast dtype under autocast: :meth:`encode_decode`).
            Needed by ``SegTTAModel``, which averages them over the
            augmented views (:class:`FullLogitsSegTTAModel`, the configs'
            ``tta_model``, turns it on). Default False: data samples carry
            ``pred_sem_seg`` only.
        test_cfg (dict): mmseg's, plus ``compile``: ``'auto'`` (the
            default), ``True`` or ``False``. When True (``'auto'`` becomes
            True in :func:`poolformer_seg.apis.init_model` on CUDA,
            :func:`compile_decision`; it stays eager elsewhere),
            inference in eval mode without gradients runs the tensor part
            ``decode_head.forward(extract_feat(x))`` through
            ``torch.compile(dynamic=True)``, compiled on first use, for
            ``predict``/``test_step`` (via ``encode_decode``) and
            ``mode='tensor'``; the resize to the image and everything after
            stay eager. Training is never compiled.
    """

    def __init__(self, backbone, decode_head, neck=None, auxiliary_head=None,
                 *args, impl: str = 'fast', keep_seg_logits: bool = False,
                 **kwargs):
        if impl not in IMPLS:
            raise ValueError(f'model.impl={impl!r} is not known; choose one '
                             f'of {list(IMPLS)}')
        if impl == 'plain':
            backbone = _plain_backbone(backbone)
            neck, decode_head = _plain_part(neck), _plain_part(decode_head)
            auxiliary_head = _plain_part(auxiliary_head)
        super().__init__(backbone, decode_head, neck, auxiliary_head, *args,
                         **kwargs)
        self.impl = impl
        self.keep_seg_logits = keep_seg_logits
        check_compile_setting(self.compile_setting)

    @property
    def compile_setting(self):
        """``test_cfg['compile']``, ``'auto'`` when absent."""
        return (self.test_cfg or {}).get('compile', 'auto')

    def compiles(self) -> bool:
        """Whether inference now runs compiled: setting True, eval mode, no
        gradient."""
        if self.training or torch.is_grad_enabled():
            return False
        return self.compile_setting is True

    def _logits(self, inputs):
        if self.compiles():
            return _compiled_logits()(self, inputs)
        return _logits(self, inputs)

    def defers_finest(self) -> bool:
        """Whether :meth:`head_inputs` leaves FPN's finest output to the
        head: a ``FastFPN`` neck, a ``FastFPNHead`` whose first scale head
        is the only reader of that level (``in_index`` starts with 0, once;
        it composes the level with its convolution:
        :meth:`~poolformer_seg.models.necks.fast_fpn.FinestLevel.through`)
        and no auxiliary head."""
        head = self.decode_head
        return (self.with_neck and isinstance(self.neck, FastFPN)
                and isinstance(head, FastFPNHead)
                and list(head.in_index)[:1] == [0]
                and list(head.in_index).count(0) == 1
                and not self.with_auxiliary_head)

    def head_inputs(self, inputs):
        """``extract_feat(inputs)``, with FPN's finest output a
        ``FinestLevel`` where :meth:`defers_finest`."""
        if not self.defers_finest():
            return self.extract_feat(inputs)
        return self.neck(self.backbone(inputs), defer_finest=True)

    def loss(self, inputs, data_samples):
        """``EncoderDecoder.loss``, on :meth:`head_inputs`."""
        if not self.defers_finest():
            return super().loss(inputs, data_samples)
        return self._decode_head_forward_train(self.head_inputs(inputs),
                                               data_samples)

    def encode_decode(self, inputs, batch_img_metas):
        """``EncoderDecoder.encode_decode``: logits at the input size, the
        tensor part compiled where :meth:`compiles`. Under autocast they
        are in its dtype, as mmseg's: our fast heads' ``predict_by_feat``
        resizes their fp32 logits into it (:meth:`~poolformer_seg.models.
        decode_heads.FastDecodeHead.predict_by_feat`)."""
        return self.decode_head.predict_by_feat(self._logits(inputs),
                                                batch_img_metas)

    def _forward(self, inputs, data_samples=None):
        """``mode='tensor'``: the logits at the head's resolution."""
        return self._logits(inputs)

    def predict(self, inputs, data_samples=None):
        """mmseg's ``predict``; where :meth:`_labels_from_head_logits`, the
        labels come from the head-resolution logits through
        :func:`twice_resized_argmax` (mmseg's two resizes and arg-max in one
        pass), without the input-size scores."""
        if not self._labels_from_head_logits(data_samples):
            return super().predict(inputs, data_samples)
        # predict_by_feat's size: the first image's
        resize_to = input_size(data_samples[0].metainfo)
        head_logits = self._logits(inputs)
        for logits, sample in zip(head_logits, data_samples):
            crop, flip = _crop_and_flip(sample.metainfo)
            size = sample.metainfo['ori_shape'][:2]
            labels = twice_resized_argmax(logits, resize_to, crop, flip, size,
                                          self.align_corners)
            if labels is None:  # wider than the bound: mmseg's two steps
                with autocast_off(head_logits.device):  # fp32 scores
                    scores = self.decode_head.predict_by_feat(
                        head_logits, [s.metainfo for s in data_samples])
                return self.postprocess_result(scores, data_samples)
            sample.set_data(dict(pred_sem_seg=PixelData(data=labels[None])))
        return data_samples

    def _labels_from_head_logits(self, data_samples) -> bool:
        """Whether :meth:`predict` may skip the input-size scores: the fast
        path without ``seg_logits``, whole-image inference, a softmax head
        that resizes as mmseg's ``predict_by_feat`` does."""
        head = self.decode_head
        return (self.impl == 'fast' and not self.keep_seg_logits
                and data_samples is not None
                and (self.test_cfg or {}).get('mode', 'whole') == 'whole'
                and head.out_channels > 1
                and type(head).predict_by_feat in (
                    BaseDecodeHead.predict_by_feat,
                    FastDecodeHead.predict_by_feat))

    def postprocess_result(self, seg_logits, data_samples=None):
        if self.impl == 'plain' or self.keep_seg_logits or \
                data_samples is None or \
                seg_logits.shape[1] == 1:  # sigmoid head: mmseg's threshold
            return super().postprocess_result(seg_logits, data_samples)
        height, width = seg_logits.shape[2:]
        for logits, sample in zip(seg_logits, data_samples):
            (top, bottom, left, right), flip = _crop_and_flip(
                sample.metainfo)
            logits = logits[:, top:height - bottom, left:width - right]
            if flip is not None:
                logits = logits.flip(2 if flip == 'horizontal' else 1)
            labels = resized_argmax(logits, sample.metainfo['ori_shape'][:2],
                                    self.align_corners)
            sample.set_data(dict(pred_sem_seg=PixelData(data=labels[None])))
        return data_samples


def _crop_and_flip(meta):
    """``((top, bottom, left, right), flip)`` of an image's padding and
    flip (None, ``'horizontal'`` or ``'vertical'``) as mmseg's
    ``postprocess_result`` reads them from ``meta``."""
    left, right, top, bottom = meta.get(
        'img_padding_size', meta.get('padding_size', [0] * 4))
    flip = None
    if meta.get('flip', False):
        flip = meta.get('flip_direction')
        if flip not in ('horizontal', 'vertical'):
            raise ValueError(f'flip_direction must be horizontal or '
                             f'vertical, got {flip!r}')
    return (top, bottom, left, right), flip


@MODELS.register_module()
class FullLogitsSegTTAModel(SegTTAModel):
    """mmseg's ``SegTTAModel`` that turns on ``keep_seg_logits`` of its
    segmentor: it averages the views' full-size ``seg_logits``, which a
    :class:`RowwiseEncoderDecoder` otherwise does not return. Test-time
    augmentation therefore costs mmseg's memory (4 * C bytes per pixel and
    view)."""

    def __init__(self, module, *args, **kwargs):
        super().__init__(module, *args, **kwargs)
        if isinstance(self.module, RowwiseEncoderDecoder):
            self.module.keep_seg_logits = True
