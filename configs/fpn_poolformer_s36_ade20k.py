# Semantic FPN + PoolFormer-S36 on ADE20K; everything else as the S12 config.
# Paper: 42.0 mIoU; mmseg 1.x with this test pipeline (mIoU*): 41.81.
_base_ = './fpn_poolformer_s12_ade20k.py'
# sail-sg original: https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_s36.pth.tar
checkpoint_file = 'https://download.openmmlab.com/mmclassification/v0/poolformer/poolformer-s36_3rdparty_32xb128_in1k_20220414-d78ff3e8.pth'  # noqa: E501
model = dict(
    backbone=dict(
        arch='s36',
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[64, 128, 320, 512]))
