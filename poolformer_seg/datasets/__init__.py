from .transforms import AlignedResize
from .validation import CheckedADE20KDataset, DataError

__all__ = ['AlignedResize', 'CheckedADE20KDataset', 'DataError']
