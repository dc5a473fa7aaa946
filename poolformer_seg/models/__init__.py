from .backbones import PoolFormer
from .decode_heads import FastFPNHead
from .losses import resized_cross_entropy

__all__ = ['PoolFormer', 'FastFPNHead', 'resized_cross_entropy']
