# Semantic FPN + PoolFormer-M48 on ADE20K; everything else as the S12 config.
# Paper: 42.7 mIoU; mmseg 1.x with this test pipeline (mIoU*): 42.76.
_base_ = './fpn_poolformer_s12_ade20k.py'
# sail-sg original: https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_m48.pth.tar
checkpoint_file = 'https://download.openmmlab.com/mmclassification/v0/poolformer/poolformer-m48_3rdparty_32xb128_in1k_20220414-9378f3eb.pth'  # noqa: E501
model = dict(
    backbone=dict(
        arch='m48',
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[96, 192, 384, 768]))
