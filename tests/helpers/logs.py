"""Capture what poolformer_seg logs through mmengine's current MMLogger."""
import contextlib
import logging

from mmengine.logging import MMLogger


class _ListHandler(logging.Handler):

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def captured_mmengine_log():
    """Yield a list that collects every message of the current MMLogger.

    ``print_log(..., logger='current')`` and ``MMLogger.get_current_instance``
    both resolve to the latest MMLogger; MMLoggers do not propagate to the
    root logger, so pytest's ``caplog`` does not see them.
    """
    logger = MMLogger.get_current_instance()
    handler = _ListHandler()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
