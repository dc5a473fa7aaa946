# UPerNet + ConvFormer-M36 on ADE20K, 512x512 crops, 160k iterations, batch 16
# (8 GPUs x 2), mmseg's UPerNet recipe for ConvNeXt (see
# _base_/schedules/schedule_160k_adamw.py).
# Published ADE20K mIoU: none found (docs/metaformer.md).
# ImageNet-1k weights (84.5% top-1), sail-sg original; same tensors:
#   timm hub convformer_m36.sail_in1k: https://huggingface.co/timm/convformer_m36.sail_in1k/resolve/main/model.safetensors
#   (every timm hub file is model.safetensors and the http loader caches by
#   file name: download, rename, and pass the local path with
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/file);
#   ImageNet-21k pretrained, 1k fine-tuned: https://huggingface.co/sail/dl/resolve/main/convformer/convformer_m36_in21ft1k.pth
_base_ = './upernet_convformer_s18_ade20k.py'
checkpoint_file = 'https://huggingface.co/sail/dl/resolve/main/convformer/convformer_m36.pth'  # noqa: E501
model = dict(
    backbone=dict(
        arch='convformer_m36',
        drop_path_rate=0.4,  # as its ImageNet-1k training
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[96, 192, 384, 576]),
    auxiliary_head=dict(in_channels=384))
