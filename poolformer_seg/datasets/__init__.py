from .transforms import AlignedResize
from .validation import (CheckedADE20KDataset, DataError, check_input_file,
                         file_problem, scan_folder)

__all__ = ['AlignedResize', 'CheckedADE20KDataset', 'DataError',
           'check_input_file', 'file_problem', 'scan_folder']
