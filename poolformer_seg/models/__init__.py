from .backbones import MetaFormer, PoolFormer
from .decode_heads import FastFCNHead, FastFPNHead, FastUPerHead
from .losses import resized_cross_entropy
from .necks import FastFPN
from .segmentors import RowwiseEncoderDecoder, resized_argmax

__all__ = ['MetaFormer', 'PoolFormer', 'FastFPN', 'FastFPNHead',
           'FastUPerHead', 'FastFCNHead',
           'resized_cross_entropy', 'RowwiseEncoderDecoder', 'resized_argmax']
