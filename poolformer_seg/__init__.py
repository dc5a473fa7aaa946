"""poolformer_seg: PoolFormer and MetaFormer backbones for MMSegmentation 1.x.

Importing the package applies the stack workarounds in
:mod:`poolformer_seg.compat` (they must precede the first ``mmseg.models``
import) and registers everything in mmseg's registries, so a config only
needs ``custom_imports = dict(imports=['poolformer_seg'])``.

It sets nothing process-wide in PyTorch: allocator options such as huge
pages (``THP_MEM_ALLOC_ENABLE``) stay the caller's, as they are for the
upstream route (docs/benchmark.md has their measured effect on both).
"""
from . import compat

compat.apply()

from . import datasets, engine, models  # noqa: E402,F401  (registers modules)
from .models import MetaFormer, PoolFormer  # noqa: E402

__version__ = '0.1.0'
__all__ = ['MetaFormer', 'PoolFormer', '__version__']
