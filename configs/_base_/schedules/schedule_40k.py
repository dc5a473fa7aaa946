# 40k iterations, AdamW lr 2e-4 (weight decay 1e-4), poly decay (power 0.9)
# to 0: the paper's Semantic FPN schedule (it follows PVT), for a total batch
# of 32 images (8 GPUs x 4).
#
# AmpOnCudaOptimWrapper (poolformer_seg/engine/optim_wrapper.py) trains in
# mixed precision where CUDA is available (bf16 if the GPU supports it, else
# fp16 with a dynamic loss scale; mmseg's config uses fp16) and in fp32
# elsewhere, so this config runs unchanged on CPU-only machines.
optim_wrapper = dict(
    type='AmpOnCudaOptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0002, weight_decay=0.0001))
param_scheduler = [
    dict(
        type='PolyLR',
        power=0.9,
        eta_min=0.0,
        begin=0,
        end=40000,
        by_epoch=False)
]
# With fewer GPUs, keep the per-GPU batch of 4 and add
#   --cfg-options auto_scale_lr.enable=True
# to scale lr by (GPUs x 4) / 32, or keep lr and accept a smaller batch.
auto_scale_lr = dict(enable=False, base_batch_size=32)

train_cfg = dict(type='IterBasedTrainLoop', max_iters=40000, val_interval=4000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
