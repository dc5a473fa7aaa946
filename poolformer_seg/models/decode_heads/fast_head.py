"""What the fast decode heads share: mmseg's cross-entropy computed block
by block, the classifier in fp32, and the mmseg computation kept for
tracing."""
from mmseg.models.losses import CrossEntropyLoss
from mmseg.models.utils import resize

from ...compat import autocast_dtype
from ..losses import resized_cross_entropy
from ..resize import input_size, resize_scores
from ..utils import autocast_off


BLOCKWISE_LOSS = True
"""Whether the fast heads compute their loss block by block
(:func:`~poolformer_seg.models.losses.resized_cross_entropy`) rather than
by mmseg's ``loss_by_feat`` on the whole resized logits (the switch of
``tools/benchmark.py --ablations``' training row
``ours-no-blockwise-loss``)."""


def mmseg_base(fast_type: type) -> type:
    """The mmseg class that one of our fast necks or heads derives from
    (``FPNHead`` for ``FastFPNHead``, ``FPN`` for ``FastFPN``)."""
    return next(cls for cls in fast_type.__mro__
                if cls.__module__.startswith('mmseg.'))


def resized_like(x, like, align_corners: bool):
    """``x`` bilinearly resized to ``like``'s height and width, as mmseg's
    heads do; ``x`` itself where the sizes already agree (the resize would
    only copy it)."""
    if x.shape[2:] == like.shape[2:]:
        return x
    return resize(x, size=like.shape[2:], mode='bilinear',
                  align_corners=align_corners)


class FastDecodeHead:
    """Mixin, listed before an mmseg decode head in the bases
    (``class FastFPNHead(FastDecodeHead, FPNHead)``); the subclass computes
    the mmseg head's function faster and gives :meth:`plain_forward`.

    Training: mmseg's ``loss_by_feat`` resizes the ``B x num_classes x h x
    w`` logits to the label size and runs the cross-entropy and the
    accuracy over that tensor; this computes the same ``loss_ce`` and
    ``acc_seg`` block by block (:func:`~poolformer_seg.models.losses.
    resized_cross_entropy`), several times faster on CPU and without the
    full-size buffers.

    The loss of the published configs is supported, and anything else is
    refused at build time: one ``CrossEntropyLoss`` with softmax
    (``use_sigmoid=False``), mean reduction, no ``class_weight`` and no
    pixel ``sampler``; ``avg_non_ignore``, ``loss_weight``, ``loss_name``
    and ``align_corners`` are honoured.

    Mixed precision: under autocast the classifier ``conv_seg`` runs in
    fp32, so the logits (and the loss and labels computed from them) are
    fp32; the input-size scores of :meth:`predict_by_feat` follow autocast,
    as mmseg's.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        unsupported = self._unsupported_options()
        if unsupported:
            name, base = type(self).__name__, mmseg_base(type(self)).__name__
            raise ValueError(
                f'{name} supports one softmax CrossEntropyLoss with mean '
                f'reduction, computed as {base} does; these settings would '
                f'give another result: {", ".join(unsupported)}. Use '
                f'type="{base}" for them')

    def _unsupported_options(self):
        """The head and loss settings the blockwise loss does not compute
        as mmseg's head does, as ``name=value`` strings."""
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

    def plain_forward(self, inputs):
        """The mmseg head's own forward on this head's layers: what
        ``torch.compile`` traces (the fast forward's size-dependent
        choices would be guards and graph breaks to it)."""
        raise NotImplementedError

    def cls_seg(self, feat):
        """The classifier, in fp32 even under autocast: bf16 keeps 8 bits
        of mantissa, too coarse for logits whose top two classes are often
        close (rounding alone would change the arg-max of ~1% of pixels).
        A 1x1 convolution at the head's resolution, it costs little in
        fp32."""
        if self.dropout is not None:
            feat = self.dropout(feat)
        with autocast_off(feat.device):
            return self.conv_seg(feat.to(self.conv_seg.weight.dtype))

    def predict_by_feat(self, seg_logits, batch_img_metas):
        """mmseg's: the logits resized to the input size
        (:func:`~poolformer_seg.models.resize.resize_scores`). Under
        autocast they are resized into its dtype and returned in it, as
        mmseg's head returns them (its classifier computes in that dtype):
        half the memory of fp32, ``num_classes`` values per pixel. Their
        arg-max agrees with fp32 as often as mmseg's own
        (``tools/benchmark.py``'s agreement)."""
        dtype = autocast_dtype(seg_logits.device.type)
        return resize_scores(seg_logits, input_size(batch_img_metas[0]),
                             self.align_corners, dtype)

    def loss_by_feat(self, seg_logits, batch_data_samples) -> dict:
        if not BLOCKWISE_LOSS:
            return super().loss_by_feat(seg_logits, batch_data_samples)
        seg_label = self._stack_batch_gt(batch_data_samples).squeeze(1)
        loss, acc = resized_cross_entropy(
            seg_logits, seg_label, ignore_index=self.ignore_index,
            avg_non_ignore=self.loss_decode.avg_non_ignore,
            align_corners=self.align_corners)
        return {self.loss_decode.loss_name: self.loss_decode.loss_weight *
                loss, 'acc_seg': acc}
