"""Semantic FPN's head with a leaner loss and forward; same results."""
import torch
from mmseg.models.decode_heads import FPNHead
from mmseg.models.losses import CrossEntropyLoss
from mmseg.models.utils import resize
from mmseg.registry import MODELS

from ..losses import resized_cross_entropy
from ..utils import autocast_off
from ..winograd import conv_module_forward


@MODELS.register_module()
class FastFPNHead(FPNHead):
    """``FPNHead`` with a faster loss and forward; same function.

    Training: mmseg's ``loss_by_feat`` resizes the ``B x num_classes x H/4
    x W/4`` logits to the label size and runs the cross-entropy and the
    accuracy over that tensor; this head computes the same ``loss_ce`` and
    ``acc_seg`` block by block (:func:`~poolformer_seg.models.losses.
    resized_cross_entropy`), several times faster on CPU and without the
    full-size buffers.

    Forward: ``FPNHead``'s, minus three resizes to the same size (copies);
    when no gradient is needed the scale heads are summed in place.

    BatchNorm in eval mode (inference, or frozen statistics) is folded into
    the preceding convolution of each scale head: one pass over those
    activations instead of two, and one bf16 rounding fewer under autocast.
    On CPU the large 3x3 convolutions run by Winograd's F(4x4, 3x3)
    (:mod:`~poolformer_seg.models.winograd`). BatchNorm in training mode
    runs as it is, after the convolution.

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
        the same size only copies. When no gradient needs the summands, the
        sum is taken in place."""
        x = self._transform_inputs(inputs)
        output = self._scale_head(self.scale_heads[0], x[0])
        # any summand may need a gradient (a frozen first scale head, a
        # trainable later one): then nothing is written in place
        in_place = not (torch.is_grad_enabled() and (
            any(t.requires_grad for t in x) or
            any(p.requires_grad for p in self.scale_heads.parameters())))
        for scale_head, feature in zip(self.scale_heads[1:], x[1:]):
            head = self._to_size(self._scale_head(scale_head, feature),
                                 output)
            output = output.add_(head) if in_place else output + head
        return self.cls_seg(output)

    def _to_size(self, head, output):
        if head.shape[2:] == output.shape[2:]:
            return head
        return resize(head, size=output.shape[2:], mode='bilinear',
                      align_corners=self.align_corners)

    @staticmethod
    def _scale_head(scale_head, feature):
        """``scale_head(feature)``, its convolutions run by
        :func:`~poolformer_seg.models.winograd.conv_module_forward` (eval
        BatchNorm folded, Winograd where it pays)."""
        for module in scale_head:  # ConvModules and Upsamples
            feature = conv_module_forward(module, feature)
        return feature

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

