"""UPerNet's head and the FCN auxiliary head with a leaner loss and
forward; same results."""
import torch
import torch.nn as nn
from mmseg.models.decode_heads import FCNHead, UPerHead
from mmseg.registry import MODELS

from ..winograd import conv_module_forward
from .fast_head import FastDecodeHead, resized_like


@MODELS.register_module()
class FastUPerHead(FastDecodeHead, UPerHead):
    """``UPerHead`` with a faster loss and forward; same function.

    Training: the loss is computed block by block
    (:class:`~.fast_head.FastDecodeHead`, which also lists the loss
    settings that are supported and refuses the others at build time).

    Forward: ``UPerHead``'s, with every ConvModule run by
    :func:`~poolformer_seg.models.winograd.conv_module_forward`: on CPU the
    3x3 convolutions at stride 4 (``fpn_convs[0]`` and ``fpn_bottleneck``,
    most of the head's multiply-adds) by Winograd's F(4x4, 3x3), forward
    and backward, and eval-mode BatchNorm folded into its convolution. The
    resizes to the size a map already has (copies) are skipped. Under
    autocast the classifier runs in fp32.

    Layers and state-dict keys are ``UPerHead``'s, so checkpoints move
    freely between the two types.
    """

    def _forward_feature(self, inputs):
        """``UPerHead._forward_feature``: laterals, the pyramid-pooling top,
        the top-down sums, the FPN convolutions at every level but the top,
        and the bottleneck over their concatenation at stride 4."""
        inputs = self._transform_inputs(inputs)
        laterals = [conv_module_forward(conv, feature)
                    for conv, feature in zip(self.lateral_convs, inputs)]
        top = inputs[-1]
        # the pooled branches (upsampled from 1x1..6x6 maps) come back NCHW,
        # and a concatenation of mixed layouts is NCHW: everything after it
        # would lose channels_last (and Winograd with it)
        layout = torch.channels_last if top.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format
        branches = [branch.contiguous(memory_format=layout)
                    for branch in self.psp_modules(top)]
        pooled = torch.cat([top, *branches], dim=1)
        laterals.append(conv_module_forward(self.bottleneck, pooled))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resized_like(
                laterals[i], laterals[i - 1], self.align_corners)
        outs = [conv_module_forward(conv, lateral)
                for conv, lateral in zip(self.fpn_convs, laterals)]
        outs.append(laterals[-1])
        outs = [outs[0]] + [resized_like(out, outs[0], self.align_corners)
                            for out in outs[1:]]
        return conv_module_forward(self.fpn_bottleneck,
                                   torch.cat(outs, dim=1))

    def plain_forward(self, inputs):
        return self.cls_seg(UPerHead._forward_feature(self, inputs))


@MODELS.register_module()
class FastFCNHead(FastDecodeHead, FCNHead):
    """``FCNHead`` (UPerNet's auxiliary head) with the block-by-block loss
    of :class:`~.fast_head.FastDecodeHead` and its ConvModules run by
    :func:`~poolformer_seg.models.winograd.conv_module_forward`; same
    function, layers and state-dict keys as ``FCNHead``."""

    def _forward_feature(self, inputs):
        x = self._transform_inputs(inputs)
        convs = self.convs if isinstance(self.convs, nn.Sequential) else []
        feats = x
        for conv in convs:
            feats = conv_module_forward(conv, feats)
        if self.concat_input:
            feats = conv_module_forward(self.conv_cat,
                                        torch.cat([x, feats], dim=1))
        return feats

    def plain_forward(self, inputs):
        return self.cls_seg(FCNHead._forward_feature(self, inputs))
