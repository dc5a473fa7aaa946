# Semantic FPN with a PoolFormer-S12 backbone (Kirillov et al. 2019; Yu et al.
# 2022). Values as in mmseg 1.x configs/_base_/models/fpn_poolformer_s12.py and
# the official sail-sg/poolformer segmentation configs.
norm_cfg = dict(type='SyncBN', requires_grad=True)

# ImageNet-1k weights of PoolFormer-S12. Two published copies, same tensors:
# - mmpretrain's conversion (used here and by mmseg's configs): it keeps the
#   classifier's final norm ('backbone.norm6'), which fills our output norm
#   norm3, as mmseg's PoolFormer does;
#   https://download.openmmlab.com/mmclassification/v0/poolformer/poolformer-s12_3rdparty_32xb128_in1k_20220414-f8d83051.pth
# - the originals of sail-sg (used by the paper's own mmseg 0.x code, whose
#   loader leaves all four output norms at their initialisation):
#   https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_s12.pth.tar
# Both load through init_cfg (the layout is detected); to use a local copy:
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/poolformer_s12.pth.tar
checkpoint_file = 'https://download.openmmlab.com/mmclassification/v0/poolformer/poolformer-s12_3rdparty_32xb128_in1k_20220414-f8d83051.pth'  # noqa: E501

data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255)
# RowwiseEncoderDecoder is mmseg's EncoderDecoder (same layers and weights)
# whose label map at the photo's size is computed one row at a time:
# memory grows with the photo, not with 150 x the photo, and data samples
# carry no full-size seg_logits unless keep_seg_logits=True
# (docs/inference.md).
# impl='fast': the fast path (fused PoolFormer blocks in channels_last,
# FastFPN, FastFPNHead). impl='plain' (--cfg-options model.impl=plain)
# computes the same function with the same weights as upstream mmseg does:
# plain NCHW blocks, mmseg's FPN and FPNHead, full-size seg_logits.
model = dict(
    type='RowwiseEncoderDecoder',
    impl='fast',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='PoolFormer',
        arch='s12',
        # Our stages are numbered 0..3; mmpretrain's (0, 2, 4, 6) counts the
        # downsampling layers in between. Same four feature maps.
        out_indices=(0, 1, 2, 3),
        # -1 trains every layer. mmseg's config passes frozen_stages=0 to
        # mmpretrain's PoolFormer, which there freezes the stem conv (9,472
        # parameters for S12) -- a side effect of its ResNet-style numbering,
        # not a choice of the paper, whose code trains the whole backbone.
        frozen_stages=-1,
        drop_path_rate=0.,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(
        type='FastFPN',
        in_channels=[64, 128, 320, 512],
        out_channels=256,
        num_outs=4),
    decode_head=dict(
        type='FastFPNHead',
        in_channels=[256, 256, 256, 256],
        in_index=[0, 1, 2, 3],
        feature_strides=[4, 8, 16, 32],
        channels=128,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    # compile='auto': torch.compile for repeated inference on CUDA
    # (poolformer_seg.apis.init_model); tools/test.py and validation run
    # eager, as a compilation costs minutes (docs/inference.md)
    test_cfg=dict(mode='whole', compile='auto'))
