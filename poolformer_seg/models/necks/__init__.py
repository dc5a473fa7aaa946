from .fast_fpn import FastFPN

__all__ = ['FastFPN']
