# UPerNet + ConvFormer-S18 on ADE20K, 512x512 crops, 160k iterations, batch 16
# (8 GPUs x 2), mmseg's UPerNet recipe for ConvNeXt (see
# _base_/schedules/schedule_160k_adamw.py).
# Published ADE20K mIoU: none that we could verify. ConvFormer-S18 48.6
# (UPerNet, 160k) circulates in a third-party README but is not in the
# paper text or in sail-sg/metaformer (docs/metaformer.md).
# ImageNet-1k weights (83.0% top-1), sail-sg original; same tensors:
#   timm hub convformer_s18.sail_in1k: https://huggingface.co/timm/convformer_s18.sail_in1k/resolve/main/model.safetensors
#   (every timm hub file is model.safetensors and the http loader caches by
#   file name: download, rename, and pass the local path with
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/file);
#   ImageNet-21k pretrained, 1k fine-tuned: https://huggingface.co/sail/dl/resolve/main/convformer/convformer_s18_in21ft1k.pth
_base_ = [
    '_base_/models/upernet_metaformer.py', '_base_/datasets/ade20k_upernet.py',
    '_base_/default_runtime.py', '_base_/schedules/schedule_160k_adamw.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
checkpoint_file = 'https://huggingface.co/sail/dl/resolve/main/convformer/convformer_s18.pth'  # noqa: E501
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        arch='convformer_s18',
        # the stochastic-depth rate of its ImageNet-1k training (sail-sg
        # scripts/convformer/train_convformer_s18.sh)
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[64, 128, 320, 512]),
    auxiliary_head=dict(in_channels=320))
train_dataloader = dict(batch_size=2)
# a checkpoint at every validation
default_hooks = dict(checkpoint=dict(interval=16000))
