"""Small helpers shared by the fast backbone ops and heads."""
import contextlib

import torch


def autocast_off(device: torch.device):
    """A context that turns autocast off on ``device``.

    The ``meta`` device has no autocast (``torch.autocast('meta')`` raises),
    and nothing to turn off: there it is a no-op, so that a model can be run
    on ``meta`` tensors for shapes and FLOPs.
    """
    if device.type == 'meta':
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)
