# UPerNet + CAFormer-S36 on ADE20K, 512x512 crops, 160k iterations, batch 16
# (8 GPUs x 2), mmseg's UPerNet recipe for ConvNeXt (see
# _base_/schedules/schedule_160k_adamw.py).
# Published ADE20K mIoU: none found (docs/metaformer.md).
# ImageNet-1k weights (84.5% top-1), sail-sg original; same tensors:
#   timm hub caformer_s36.sail_in1k: https://huggingface.co/timm/caformer_s36.sail_in1k/resolve/main/model.safetensors
#   (every timm hub file is model.safetensors and the http loader caches by
#   file name: download, rename, and pass the local path with
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/file);
#   ImageNet-21k pretrained, 1k fine-tuned: https://huggingface.co/sail/dl/resolve/main/caformer/caformer_s36_in21ft1k.pth
_base_ = './upernet_caformer_s18_ade20k.py'
checkpoint_file = 'https://huggingface.co/sail/dl/resolve/main/caformer/caformer_s36.pth'  # noqa: E501
model = dict(
    backbone=dict(
        arch='caformer_s36',
        drop_path_rate=0.3,  # as its ImageNet-1k training
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[64, 128, 320, 512]),
    auxiliary_head=dict(in_channels=320))
