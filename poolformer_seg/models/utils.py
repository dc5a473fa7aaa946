"""Small helpers shared by the fast backbone ops and heads."""
import contextlib

import torch
import torch.nn as nn

from ..compat import is_compiling, tensor_version


def autocast_off(device: torch.device):
    """A context that turns autocast off on ``device``.

    The ``meta`` device has no autocast (``torch.autocast('meta')`` raises),
    and nothing to turn off: there it is a no-op, so that a model can be run
    on ``meta`` tensors for shapes and FLOPs.
    """
    if device.type == 'meta':
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


KEEP_DERIVED = True
"""Whether :func:`derived_weights` keeps what it derives (the switch of
``tools/benchmark.py --ablations``' row ``ours-no-keep-weights``)."""


def _state(t: torch.Tensor):
    return id(t), t.data_ptr(), t.dtype, t.device, t.shape, tensor_version(t)


def derived_weights(owner: nn.Module, name: str, sources, make, *key):
    """``make()``: tensors derived from the tensors ``sources`` (weights
    folded, composed or cast), kept on ``owner`` under ``name`` and returned
    again while ``sources`` and ``key`` are unchanged.

    A source is unchanged while it is the same tensor with the same storage,
    dtype, device, shape and in-place version (an optimizer step,
    ``load_state_dict`` or ``.to`` change one of them); the kept result
    holds the sources' storages, so that no new tensor can take their
    addresses. Computed anew, and not kept, where the result must be part of
    an autograd graph (gradients enabled and a source requiring one), under
    ``torch.compile`` (which traces ``make`` instead), on ``meta`` and where
    torch keeps no version count. One result per ``(owner, name)``: the
    memory is bounded by the derived weights of one call.
    """
    if not KEEP_DERIVED or is_compiling() or \
            sources[0].device.type == 'meta' or (
            torch.is_grad_enabled() and any(t.requires_grad
                                            for t in sources)):
        return make()
    state = (tuple(_state(t) for t in sources), key)
    if any(s[-1] is None for s in state[0]):
        return make()
    kept = owner.__dict__.setdefault('_derived_weights', {})
    if name not in kept or kept[name][0] != state:
        kept.pop(name, None)  # freed before the new one is made
        pinned = [t.untyped_storage() for t in sources]
        kept[name] = (state, pinned, make())
    return kept[name][2]
