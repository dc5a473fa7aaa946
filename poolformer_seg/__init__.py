"""poolformer_seg: PoolFormer and MetaFormer backbones for MMSegmentation 1.x.

Importing the package applies the stack workarounds in
:mod:`poolformer_seg.compat` (they must precede the first ``mmseg.models``
import) and registers everything in mmseg's registries, so a config only
needs ``custom_imports = dict(imports=['poolformer_seg'])``.
"""
from . import compat

compat.apply()

from . import datasets, engine, models  # noqa: E402,F401  (registers modules)
from .models import MetaFormer, PoolFormer  # noqa: E402

__version__ = '0.1.0'
__all__ = ['MetaFormer', 'PoolFormer', '__version__']
