# Semantic FPN with a PoolFormerV2-S12 backbone (MetaFormer baselines, Yu et
# al., TPAMI 2023). Neck, head and data preprocessing exactly as
# fpn_poolformer_s12.py (the PoolFormer recipe); only the backbone differs.
_base_ = './fpn_poolformer_s12.py'

# ImageNet-1k weights of PoolFormerV2-S12 (78.0% top-1). Two published copies
# of the same tensors; both load through init_cfg (the layout is detected):
# - sail-sg original (used here: a .pth with a unique file name):
#   https://huggingface.co/sail/dl/resolve/main/poolformerv2/poolformerv2_s12.pth
# - timm hub (poolformerv2_s12.sail_in1k):
#   https://huggingface.co/timm/poolformerv2_s12.sail_in1k/resolve/main/model.safetensors
#   Every timm hub file is called model.safetensors and the http loader caches
#   by file name, so download it, rename it and pass the local path:
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/poolformerv2_s12.safetensors
# Classification checkpoints fill only the last output norm (norm3, from the
# classifier's final LayerNorm); norm0..norm2 start at weight 1, bias 0.
checkpoint_file = 'https://huggingface.co/sail/dl/resolve/main/poolformerv2/poolformerv2_s12.pth'  # noqa: E501

model = dict(
    backbone=dict(
        _delete_=True,
        type='MetaFormer',
        arch='poolformerv2_s12',
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        drop_path_rate=0.,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))
