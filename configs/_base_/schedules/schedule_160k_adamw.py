# 160k iterations, AdamW (lr 1e-4, betas (0.9, 0.999), weight decay 0.05),
# linear warm-up over 1500 iterations from 1e-6 x lr, then linear decay
# (poly, power 1) to 0, for a total batch of 16 (8 GPUs x 2): mmseg 1.x's
# UPerNet recipe for ConvNeXt, which the MetaFormer-baselines paper does not
# replace with a segmentation recipe of its own (docs/metaformer.md).
#
# Two differences from mmseg's ConvNeXt configs, both documented there:
# - no layer-wise lr decay: mmseg's LearningRateDecayOptimizerConstructor
#   only knows ConvNeXt/BEiT/MAE backbones (by class name) and mmpretrain's
#   parameter names, and raises NotImplementedError for MetaFormer;
# - "no weight decay on 1-D parameters", which that constructor applies, is
#   kept through mmengine's flat_decay_mult=0: norm weights, biases, the
#   res-scales and the StarReLU scalars are not decayed.
# AmpOnCudaOptimWrapper: mixed precision on CUDA (mmseg uses fp16 AMP), fp32
# elsewhere, so the configs also run on CPU-only machines.
optim_wrapper = dict(
    type='AmpOnCudaOptimWrapper',
    optimizer=dict(
        type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(flat_decay_mult=0.))
param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0,
        end=1500),
    dict(
        type='PolyLR',
        power=1.0,
        eta_min=0.0,
        begin=1500,
        end=160000,
        by_epoch=False)
]
auto_scale_lr = dict(enable=False, base_batch_size=16)

train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=160000, val_interval=16000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
# (configs using this set default_hooks.checkpoint.interval=16000 themselves:
# default_runtime.py owns default_hooks)
