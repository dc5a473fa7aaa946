"""Semantic FPN's head with a leaner loss; same parameters, same results."""
from mmseg.models.decode_heads import FPNHead
from mmseg.models.losses import CrossEntropyLoss
from mmseg.registry import MODELS

from ..losses import resized_cross_entropy


@MODELS.register_module()
class FastFPNHead(FPNHead):
    """``FPNHead`` whose training loss never builds full-size logits.

    mmseg's ``loss_by_feat`` resizes the ``B x num_classes x H/4 x W/4``
    logits to the label size and then runs the cross-entropy and the
    accuracy over that tensor; this head computes the same ``loss_ce`` and
    ``acc_seg`` block by block (:func:`~poolformer_seg.models.losses.
    resized_cross_entropy`), several times faster on CPU and without the
    full-size buffers. Layers, state-dict keys, ``forward`` and inference
    are ``FPNHead``'s, so checkpoints move freely between the two types.

    It supports the loss of the published configs, and says so at build
    time otherwise: one ``CrossEntropyLoss`` with softmax
    (``use_sigmoid=False``), no ``class_weight`` and no pixel ``sampler``;
    ``avg_non_ignore``, ``loss_weight``, ``loss_name`` and
    ``align_corners`` are honoured.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        loss = self.loss_decode
        if not isinstance(loss, CrossEntropyLoss) or loss.use_sigmoid or \
                loss.use_mask or loss.class_weight is not None or \
                self.sampler is not None:
            raise ValueError(
                'FastFPNHead supports one softmax CrossEntropyLoss without '
                'class_weight and no sampler; got loss_decode='
                f'{kwargs.get("loss_decode")!r}, sampler='
                f'{kwargs.get("sampler")!r}. Use type="FPNHead" for others')

    def loss_by_feat(self, seg_logits, batch_data_samples) -> dict:
        seg_label = self._stack_batch_gt(batch_data_samples).squeeze(1)
        loss, acc = resized_cross_entropy(
            seg_logits, seg_label, ignore_index=self.ignore_index,
            avg_non_ignore=self.loss_decode.avg_non_ignore,
            align_corners=self.align_corners)
        return {self.loss_decode.loss_name: self.loss_decode.loss_weight *
                loss, 'acc_seg': acc}
