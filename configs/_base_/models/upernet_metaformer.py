# UPerNet (Xiao et al. 2018) with a MetaFormer backbone (CAFormer-S18 here;
# the per-variant configs change arch, channels and weights). Heads as
# mmseg 1.x's upernet_convnext.py: UPerHead with 512 channels and pyramid
# pooling (1, 2, 3, 6), an FCN auxiliary head on stage 2 (loss weight 0.4),
# SyncBN, and sliding-window inference with 512x512 windows. FastUPerHead and
# FastFCNHead are mmseg's UPerHead and FCNHead computed faster (same weights
# and results; model.impl='plain' builds mmseg's own).
norm_cfg = dict(type='SyncBN', requires_grad=True)
# ImageNet-1k CAFormer-S18 (sail-sg original); see the per-variant configs.
checkpoint_file = 'https://huggingface.co/sail/dl/resolve/main/caformer/caformer_s18.pth'  # noqa: E501
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255)
model = dict(
    type='RowwiseEncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='MetaFormer',
        arch='caformer_s18',
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        drop_path_rate=0.15,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(
        type='FastUPerHead',
        in_channels=[64, 128, 320, 512],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FastFCNHead',
        in_channels=320,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    # compile='auto': torch.compile for repeated inference on CUDA
    # (poolformer_seg.apis.init_model); tools/test.py and validation run
    # eager, as a compilation costs minutes (docs/inference.md)
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341),
                  compile='auto'))
