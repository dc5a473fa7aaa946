from .fast_fpn_head import FastFPNHead
from .fast_head import FastDecodeHead
from .fast_uper_head import FastFCNHead, FastUPerHead

__all__ = ['FastFPNHead', 'FastUPerHead', 'FastFCNHead', 'FastDecodeHead']
