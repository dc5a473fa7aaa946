# ADE20K as in ade20k.py, with mmseg's plain test resize (short side 512, no
# rounding to a multiple of 32): the UPerNet configs infer with sliding
# 512x512 windows, which need no particular image size (mmseg 1.x's
# UPerNet/ConvNeXt ADE20K configs use the same test pipeline).
_base_ = './ade20k.py'
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
