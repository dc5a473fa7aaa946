"""Semantic FPN's head with a leaner loss and forward; same results."""
import torch
from mmseg.models.decode_heads import FPNHead
from mmseg.registry import MODELS

from ..necks.fast_fpn import FinestLevel
from ..winograd import conv_module_forward
from .fast_head import FastDecodeHead, resized_like


@MODELS.register_module()
class FastFPNHead(FastDecodeHead, FPNHead):
    """``FPNHead`` with a faster loss and forward; same function.

    Training: the loss is computed block by block
    (:class:`~.fast_head.FastDecodeHead`, which also lists the
    loss settings that are supported and refuses the others at build time).

    Forward: ``FPNHead``'s, minus three resizes to the same size (copies);
    when no gradient is needed the scale heads are summed in place.

    BatchNorm in eval mode (inference, or frozen statistics) is folded into
    the preceding convolution of each scale head: one pass over those
    activations instead of two, and one bf16 rounding fewer under autocast.
    On CPU the large 3x3 convolutions run by Winograd's F(4x4, 3x3)
    (:mod:`~poolformer_seg.models.winograd`). BatchNorm in training mode
    runs as it is, after the convolution. Under autocast the classifier
    runs in fp32.

    Layers and state-dict keys are ``FPNHead``'s, so checkpoints move
    freely between the two types.
    """

    def forward(self, inputs):
        """``FPNHead.forward`` without its no-op resizes: each scale head
        already upsamples to the size of the first, and a bilinear resize to
        the same size only copies. When no gradient needs the summands, the
        sum is taken in place. A finest level that the neck left uncomputed
        (:class:`~poolformer_seg.models.necks.fast_fpn.FinestLevel`) goes
        into the first scale head's convolution composed with it."""
        x = self._transform_inputs(inputs)
        output = self._scale_head(self.scale_heads[0], x[0])
        # any summand may need a gradient (a frozen first scale head, a
        # trainable later one): then nothing is written in place
        in_place = not (torch.is_grad_enabled() and (
            output.requires_grad or any(t.requires_grad for t in x[1:]) or
            any(p.requires_grad for p in self.scale_heads[1:].parameters())))
        for scale_head, feature in zip(self.scale_heads[1:], x[1:]):
            head = resized_like(self._scale_head(scale_head, feature),
                                output, self.align_corners)
            output = output.add_(head) if in_place else output + head
        return self.cls_seg(output)

    def plain_forward(self, inputs):
        return FPNHead.forward(self, inputs)

    @staticmethod
    def _scale_head(scale_head, feature):
        """``scale_head(feature)``, its convolutions run by
        :func:`~poolformer_seg.models.winograd.conv_module_forward` (eval
        BatchNorm folded, Winograd where it pays); a ``FinestLevel``
        ``feature`` through :meth:`~poolformer_seg.models.necks.fast_fpn.
        FinestLevel.through`."""
        modules = iter(scale_head)  # ConvModules and Upsamples
        if isinstance(feature, FinestLevel):
            feature = feature.through(next(modules))
        for module in modules:
            feature = conv_module_forward(module, feature)
        return feature
