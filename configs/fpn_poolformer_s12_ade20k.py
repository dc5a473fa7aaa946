# Semantic FPN + PoolFormer-S12 on ADE20K, 512x512 crops, 40k iterations,
# batch 32 (8 GPUs x 4). Paper (Yu et al., CVPR 2022, Table 3): 37.2 mIoU;
# mmseg 1.x with this test pipeline (mIoU*): 37.07.
_base_ = [
    '_base_/models/fpn_poolformer_s12.py', '_base_/datasets/ade20k.py',
    '_base_/default_runtime.py', '_base_/schedules/schedule_40k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(data_preprocessor=data_preprocessor)
