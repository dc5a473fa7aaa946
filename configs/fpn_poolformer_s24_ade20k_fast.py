# fpn_poolformer_s24_ade20k.py with the fast path (docs/benchmark.md): the
# same function and weights, computed faster and in less memory.
_base_ = './fpn_poolformer_s24_ade20k.py'
model = dict(
    backbone=dict(fused=True, channels_last=True),
    neck=dict(type='FastFPN'),
    decode_head=dict(type='FastFPNHead'))
