# Semantic FPN with a PoolFormerV2-S12 backbone (MetaFormer baselines, Yu et
# al., TPAMI 2023). Neck, head and data preprocessing exactly as
# fpn_poolformer_s12.py (the PoolFormer recipe); only the backbone differs.
norm_cfg = dict(type='SyncBN', requires_grad=True)

# ImageNet-1k weights of PoolFormerV2-S12 (78.0% top-1). Two published copies
# of the same tensors; both load through init_cfg (the layout is detected):
# - sail-sg original (used here: a .pth with a unique file name):
#   https://huggingface.co/sail/dl/resolve/main/poolformerv2/poolformerv2_s12.pth
# - timm hub (poolformerv2_s12.sail_in1k):
#   https://huggingface.co/timm/poolformerv2_s12.sail_in1k/resolve/main/model.safetensors
#   Every timm hub file is called model.safetensors and the http loader caches
#   by file name, so download it, rename it and pass the local path:
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/poolformerv2_s12.safetensors
# Classification checkpoints fill only the last output norm (norm3, from the
# classifier's final LayerNorm); norm0..norm2 start at weight 1, bias 0.
checkpoint_file = 'https://huggingface.co/sail/dl/resolve/main/poolformerv2/poolformerv2_s12.pth'  # noqa: E501

data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='MetaFormer',
        arch='poolformerv2_s12',
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        drop_path_rate=0.,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(
        type='FPN',
        in_channels=[64, 128, 320, 512],
        out_channels=256,
        num_outs=4),
    decode_head=dict(
        type='FPNHead',
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
    test_cfg=dict(mode='whole'))
