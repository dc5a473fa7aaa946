# Semantic FPN + PoolFormerV2-S36 on ADE20K; everything else as the S12 config.
_base_ = './fpn_poolformerv2_s12_ade20k.py'
# timm hub copy: https://huggingface.co/timm/poolformerv2_s36.sail_in1k/resolve/main/model.safetensors
checkpoint_file = 'https://huggingface.co/sail/dl/resolve/main/poolformerv2/poolformerv2_s36.pth'  # noqa: E501
model = dict(
    backbone=dict(
        arch='poolformerv2_s36',
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[64, 128, 320, 512]))
