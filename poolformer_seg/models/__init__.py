from .backbones import PoolFormer

__all__ = ['PoolFormer']
