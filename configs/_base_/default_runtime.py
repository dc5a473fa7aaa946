# Default runtime (mmseg 1.x conventions). Iteration-based: checkpoints and
# log lines are counted in iterations, not epochs.
default_scope = 'mmseg'
# Registers PoolFormer, the transforms and the optim wrapper of this project.
custom_imports = dict(imports=['poolformer_seg'], allow_failed_imports=False)

env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # tools/train.py and tools/test.py switch this to gloo on machines
    # without CUDA (nccl needs GPUs).
    dist_cfg=dict(backend='nccl'),
)
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # CheckpointHook with atomic saves, no NaN checkpoints, and --resume from
    # the last complete checkpoint (docs/reliability.md).
    checkpoint=dict(type='SafeCheckpointHook', by_epoch=False, interval=4000),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
# FiniteLossHook stops at the first NaN/Inf loss; RNGStateHook saves the RNG
# states in checkpoints so that --resume continues exactly as an
# uninterrupted run; CheckpointFitHook checks what load_from/--resume load
# (only the head may differ when fine-tuning) (docs/reliability.md).
custom_hooks = [
    dict(type='FiniteLossHook'),
    dict(type='RNGStateHook'),
    dict(type='CheckpointFitHook')
]
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(
    type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False

# mmseg's SegTTAModel; it makes the RowwiseEncoderDecoder return the
# full-size seg_logits that it averages over the views.
tta_model = dict(type='FullLogitsSegTTAModel')
