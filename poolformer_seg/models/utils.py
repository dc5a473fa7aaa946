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


def _fingerprint(sources) -> torch.Tensor:
    """Sum and sum of squares of each floating-point source, in float64:
    what a write behind the version count changes (``p.data.copy_(...)``,
    as mmengine's EMA hook swaps the averaged weights in)."""
    sums = []
    for t in sources:
        if t.is_floating_point():
            flat = t.detach().reshape(-1)
            sums += [flat.sum(dtype=torch.float64),
                     torch.dot(flat, flat).double()]
    return torch.stack(sums) if sums else torch.zeros(0)


def derived_weights(owner: nn.Module, name: str, sources, make, *key):
    """``make()``: tensors derived from the tensors ``sources`` (weights
    composed or folded), kept on ``owner`` under ``name`` and returned
    again while ``sources`` and ``key`` are unchanged. ``sources`` are the
    parameters and buffers themselves: a view is a new tensor on each call,
    and would never match.

    A source is unchanged while it is the same tensor with the same storage,
    dtype, device, shape and in-place version (an optimizer step,
    ``load_state_dict`` or ``.to`` change one of them), and the same sum and
    sum of squares (:func:`_fingerprint`: writes through ``.data`` keep the
    version); the kept result holds the sources' storages, so that no new
    tensor can take their addresses. Checking costs two passes over the
    sources per call: worth it where ``make`` costs many more (the composed
    kernels of :mod:`~poolformer_seg.models.necks.fast_fpn`, a 0.7 GMAC
    convolution of weights for S12). Computed anew, and not kept, where the
    result must be part of an autograd graph (gradients enabled and a
    source requiring one), under ``torch.compile`` (which traces ``make``
    instead), on ``meta`` and where torch keeps no version count. One
    result per ``(owner, name)``: the memory is bounded by the derived
    weights of one call.
    """
    if not KEEP_DERIVED or is_compiling() or \
            sources[0].device.type == 'meta' or (
            torch.is_grad_enabled() and any(t.requires_grad
                                            for t in sources)):
        return make()
    state = (tuple(_state(t) for t in sources), key)
    if any(s[-1] is None for s in state[0]):
        return make()
    fingerprint = _fingerprint(sources)
    kept = owner.__dict__.setdefault('_derived_weights', {})
    entry = kept.get(name)
    if entry is None or entry[0] != state or \
            not torch.equal(entry[1], fingerprint):
        kept.pop(name, None)  # freed before the new one is made
        pinned = [t.untyped_storage() for t in sources]
        entry = kept[name] = (state, fingerprint, pinned, make())
    return entry[3]
