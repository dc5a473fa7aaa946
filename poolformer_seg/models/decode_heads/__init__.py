from .fast_fpn_head import FastFPNHead

__all__ = ['FastFPNHead']
