"""Semantic FPN's head with a leaner loss and logits resize; same results."""
import sys

import torch
from mmseg.models.decode_heads import FPNHead
from mmseg.models.losses import CrossEntropyLoss
from mmseg.models.utils import Upsample, resize
from mmseg.registry import MODELS

from ...compat import storage_users, upsample_bilinear_into
from ..losses import resized_cross_entropy
from ..utils import autocast_off
from ..winograd import conv_module_forward


class RecycledOutput:
    """The memory of the last output (per dtype and device), handed out
    again once unused.

    A full-size logits tensor is large (157 MB for 150 classes at 512x512
    in fp32), and a fresh one is mapped from the kernel page by page on its
    first write: on CPU those page faults cost about three times the resize
    itself. When the caller has dropped every reference to the previous
    output (views included), nothing can observe its memory any more, and
    the next resize of the same shape writes into it. A buffer is taken out
    before use, so concurrent callers never share one.

    "No reference" is checked at three levels (the counters are private
    PyTorch API; ``tests/models/decode_heads`` pins their meaning): the
    Python object (the caller may hold the very tensor returned), the
    tensor (autograd may have saved it for a backward) and its memory
    (views, e.g. one image sliced out of the batch).
    """

    def __init__(self):
        self._last = {}  # (dtype, device) -> tensor

    def take(self, like: torch.Tensor, shape) -> torch.Tensor:
        """A reusable tensor of ``shape`` in ``like``'s dtype, device and
        memory format, or None."""
        last = self._last.pop((like.dtype, like.device), None)
        if last is None or last.shape != shape or \
                not last.is_contiguous(memory_format=_memory_format(like)):
            return None
        if last.is_inference() and not torch.is_inference_mode_enabled():
            return None  # made under inference_mode: read-only outside it
        # 2: ``last`` and getrefcount's argument
        if sys.getrefcount(last) > 2 or storage_users(last) > 1:
            return None
        return last

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        self._last[(tensor.dtype, tensor.device)] = tensor
        return tensor

    def clear(self):
        self._last.clear()


def _needs_grad(tensor) -> bool:
    return torch.is_grad_enabled() and tensor.requires_grad


def _memory_format(tensor):
    channels_last = tensor.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last and \
        not tensor.is_contiguous() else torch.contiguous_format


@MODELS.register_module()
class FastFPNHead(FPNHead):
    """``FPNHead`` with a faster loss and logits resize; same function.

    Training: mmseg's ``loss_by_feat`` resizes the ``B x num_classes x H/4
    x W/4`` logits to the label size and runs the cross-entropy and the
    accuracy over that tensor; this head computes the same ``loss_ce`` and
    ``acc_seg`` block by block (:func:`~poolformer_seg.models.losses.
    resized_cross_entropy`), several times faster on CPU and without the
    full-size buffers.

    Inference: the logits are resized by the same ATen kernel as
    ``FPNHead``'s, but written into the memory of the previous output when
    the caller no longer references it (:class:`RecycledOutput`). The head
    therefore keeps its last output's memory between calls (until
    ``train()``).

    Forward: ``FPNHead``'s, minus three resizes to the same size (copies);
    when no gradient is needed the scale heads are summed in place, and
    the head keeps one scratch tensor for their upsampling between calls.

    BatchNorm in eval mode (inference, or frozen statistics) is folded into
    the preceding convolution of each scale head: one pass over those
    activations instead of two, and one bf16 rounding fewer under autocast.
    At inference on CPU the large 3x3 convolutions run by Winograd's
    F(4x4, 3x3) (:mod:`~poolformer_seg.models.winograd`). BatchNorm in
    training mode runs as it is.

    Mixed precision: under autocast the classifier ``conv_seg`` runs in
    fp32, so the logits (and the loss computed from them) are fp32.

    Layers and state-dict keys are ``FPNHead``'s, so checkpoints move
    freely between the two types. The loss of the
    published configs is supported, and anything else is refused at build
    time: one ``CrossEntropyLoss`` with softmax (``use_sigmoid=False``),
    no ``class_weight`` and no pixel ``sampler``; ``avg_non_ignore``,
    ``loss_weight``, ``loss_name`` and ``align_corners`` are honoured.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        unsupported = self._unsupported_options()
        if unsupported:
            raise ValueError(
                f'FastFPNHead supports one softmax CrossEntropyLoss with '
                f'mean reduction, computed as FPNHead does; these settings '
                f'would give another result: '
                f'{", ".join(unsupported)}. Use type="FPNHead" for them')
        self._output = RecycledOutput()
        self._scratch = RecycledOutput()  # see forward

    def _unsupported_options(self):
        """The head and loss settings the blockwise loss does not compute
        as ``FPNHead`` does, as ``name=value`` strings."""
        loss = self.loss_decode
        if not isinstance(loss, CrossEntropyLoss):
            return [f'loss_decode={type(loss).__name__} (one '
                    'CrossEntropyLoss, not a list or another loss)']
        checks = [
            ('loss_decode.use_sigmoid', loss.use_sigmoid, False),
            ('loss_decode.use_mask', loss.use_mask, False),
            ('loss_decode.class_weight', loss.class_weight, None),
            ('loss_decode.reduction', loss.reduction, 'mean'),
            ('sampler', self.sampler, None),
            ('out_channels', self.out_channels, self.num_classes),
        ]
        return [f'{name}={value!r}' for name, value, supported in checks
                if value != supported]

    def forward(self, inputs):
        """``FPNHead.forward`` without its no-op resizes: each scale head
        already upsamples to the size of the first, and a bilinear resize to
        the same size only copies.

        When no gradient needs the summands, the sum is taken in place, and
        each scale head's final 2x upsampling writes into one scratch
        tensor, kept between calls (:meth:`_scale_head_into`): at
        1024x2048 these are three 64 MB temporaries per call otherwise,
        each paid for again in page faults."""
        x = self._transform_inputs(inputs)
        output = self._scale_head_into(self.scale_heads[0], x[0], None)
        # any summand may need a gradient (a frozen first scale head, a
        # trainable later one): then nothing is written in place
        if torch.is_grad_enabled() and (
                any(t.requires_grad for t in x) or
                any(p.requires_grad for p in self.scale_heads.parameters())):
            for scale_head, feature in zip(self.scale_heads[1:], x[1:]):
                head = self._scale_head_into(scale_head, feature, None)
                output = output + self._to_size(head, output)
            return self.cls_seg(output)
        scratch = self._scratch.take(output, output.shape)
        for scale_head, feature in zip(self.scale_heads[1:], x[1:]):
            head = self._scale_head_into(scale_head, feature, scratch)
            output.add_(self._to_size(head, output))
            if head.shape == output.shape and head.dtype == output.dtype:
                scratch = head
            del head  # so that ``scratch`` is the only reference left
        if scratch is not None:
            self._scratch.keep(scratch)
        return self.cls_seg(output)

    def _to_size(self, head, output):
        if head.shape[2:] == output.shape[2:]:
            return head
        return resize(head, size=output.shape[2:], mode='bilinear',
                      align_corners=self.align_corners)

    @staticmethod
    def _scale_head_into(scale_head, feature, out):
        """``scale_head(feature)``, its convolutions run by
        :func:`~poolformer_seg.models.winograd.conv_module_forward` (eval
        BatchNorm folded, Winograd where it pays), and its final
        :class:`Upsample` written into ``out`` when that has the result's
        shape, dtype and memory format (the same ATen op as ``Upsample``
        calls)."""
        *body, last = scale_head
        if not isinstance(last, Upsample):
            body, last = scale_head, None
        for module in body:
            feature = conv_module_forward(module, feature)
        if last is None:
            return feature
        if out is None or last.size or last.mode != 'bilinear':
            return last(feature)
        size = [int(t * last.scale_factor) for t in feature.shape[-2:]]
        if out.shape != feature.shape[:2] + tuple(size) or \
                out.dtype != feature.dtype or not out.is_contiguous(
                    memory_format=_memory_format(feature)):
            return last(feature)
        return upsample_bilinear_into(feature, size, last.align_corners, out)

    def cls_seg(self, feat):
        """The classifier, in fp32 even under autocast: bf16 keeps 8 bits
        of mantissa, too coarse for logits whose top two classes are often
        close (rounding alone would change the arg-max of ~1% of pixels).
        A 1x1 convolution at stride 4, it costs little in fp32."""
        if self.dropout is not None:
            feat = self.dropout(feat)
        with autocast_off(feat.device):
            return self.conv_seg(feat.to(self.conv_seg.weight.dtype))

    def loss_by_feat(self, seg_logits, batch_data_samples) -> dict:
        seg_label = self._stack_batch_gt(batch_data_samples).squeeze(1)
        loss, acc = resized_cross_entropy(
            seg_logits, seg_label, ignore_index=self.ignore_index,
            avg_non_ignore=self.loss_decode.avg_non_ignore,
            align_corners=self.align_corners)
        return {self.loss_decode.loss_name: self.loss_decode.loss_weight *
                loss, 'acc_seg': acc}

    def predict_by_feat(self, seg_logits, batch_img_metas):
        meta = batch_img_metas[0]
        # the output size as FPNHead chooses it
        if isinstance(meta['img_shape'], torch.Size):  # slide inference
            size = tuple(meta['img_shape'])
        else:
            size = tuple(meta.get('pad_shape', meta['img_shape'])[:2])
        out = None if _needs_grad(seg_logits) else self._output.take(
            seg_logits, seg_logits.shape[:2] + size)
        if out is None:
            out = resize(seg_logits, size=size, mode='bilinear',
                         align_corners=self.align_corners)
        else:  # the op F.interpolate(size=...) runs, into the given output
            upsample_bilinear_into(seg_logits, size, self.align_corners, out)
        # a differentiable output is never kept: it holds its autograd graph
        return out if out.requires_grad else self._output.keep(out)

    def train(self, mode: bool = True):
        if mode:
            self._output.clear()
            self._scratch.clear()
        return super().train(mode)
