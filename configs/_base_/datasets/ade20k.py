# ADE20K (SceneParsing, ADEChallengeData2016): 150 classes; label 0 ("other")
# is ignored through reduce_zero_label (0 -> 255, k -> k - 1).
# Layout under data_root (see docs/training.md):
#   images/{training,validation}/*.jpg, annotations/{training,validation}/*.png
# tools/make_ade_dataset.py writes a small synthetic dataset in this layout.
# CheckedADE20KDataset is mmseg's ADE20KDataset plus checks that name a bad
# file and the fix (missing data root or annotation, corrupt image, label
# out of range, annotation size != image size); see docs/reliability.md.
dataset_type = 'CheckedADE20KDataset'
data_root = 'data/ade/ADEChallengeData2016'
crop_size = (512, 512)
img_scale = (2048, 512)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(
        type='RandomResize',
        scale=img_scale,
        ratio_range=(0.5, 2.0),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
# Resize + ResizeToMultiple(32) reproduces the official AlignResize (mmseg's
# mIoU* column). LoadAnnotations comes after the resizes, so evaluation is
# against the ground truth at its original size.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='ResizeToMultiple', size_divisor=32),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
# The paper's own test transform in one step (poolformer_seg AlignedResize);
# same result as the two resizes above. To use it from the command line
# (the ResizeToMultiple after it then has nothing left to do):
#   --cfg-options test_dataloader.dataset.pipeline.1.type=AlignedResize
# or in a config inheriting this one:
#   test_dataloader = dict(dataset=dict(
#       pipeline={{_base_.test_pipeline_aligned}}))
test_pipeline_aligned = [
    dict(type='LoadImageFromFile'),
    dict(type='AlignedResize', scale=img_scale, size_divisor=32),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
# tools/test.py --tta: multi-scale (0.5x..1.75x of img_scale) + flip, softmax
# scores averaged by SegTTAModel. As in the paper's mmseg 0.x code
# (MultiScaleFlipAug), each scale resizes the original image once, to
# img_scale * ratio, and is then made a multiple of 32.
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='TestTimeAug',
        transforms=[
            [
                dict(
                    type='Resize',
                    scale=(int(img_scale[0] * r), int(img_scale[1] * r)),
                    keep_ratio=True) for r in img_ratios
            ],
            [dict(type='ResizeToMultiple', size_divisor=32)],
            [
                dict(type='RandomFlip', prob=0., direction='horizontal'),
                dict(type='RandomFlip', prob=1., direction='horizontal')
            ],
            [dict(type='LoadAnnotations', reduce_zero_label=True)],
            [dict(type='PackSegInputs')],
        ])
]

# mmseg's PoolFormer configs wrap the training set in RepeatDataset(times=50),
# a leftover of epoch-based 0.x runners; with an InfiniteSampler it changes
# nothing but the shuffling order, so it is left out.
train_dataloader = dict(
    batch_size=4,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(
            img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(
            img_path='images/validation',
            seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader

val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
