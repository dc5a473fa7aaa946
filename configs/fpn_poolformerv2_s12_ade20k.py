# Semantic FPN + PoolFormerV2-S12 on ADE20K, 512x512 crops, 40k iterations,
# batch 32 (8 GPUs x 4): the PoolFormer recipe of fpn_poolformer_s12_ade20k.py
# with the v2 backbone. No published segmentation result for PoolFormerV2
# (docs/metaformer.md).
_base_ = [
    '_base_/models/fpn_poolformerv2_s12.py', '_base_/datasets/ade20k.py',
    '_base_/default_runtime.py', '_base_/schedules/schedule_40k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(data_preprocessor=data_preprocessor)
