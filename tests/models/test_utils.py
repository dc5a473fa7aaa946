"""derived_weights keeps what it derives only while its sources are
unchanged, and never where autograd or the compiler needs the computation."""
import pytest
import torch
import torch.nn as nn

from poolformer_seg import compat
from poolformer_seg.models import utils
from poolformer_seg.models.utils import derived_weights


class Counted:
    """``make`` for derived_weights: the weight doubled, counting calls."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def __call__(self):
        self.calls += 1
        return self.module.weight * 2

    def get(self, *key):
        return derived_weights(self.module, 'doubled',
                               list(self.module.parameters()), self, *key)


def test_kept_while_the_sources_are_unchanged():
    make = Counted(nn.Linear(3, 4))
    with torch.no_grad():
        first, again = make.get(), make.get()
    assert make.calls == 1 and again is first
    torch.testing.assert_close(first, make.module.weight * 2)


@pytest.mark.parametrize('change', [
    'in place', 'load_state_dict', 'optimizer step', 'to float64',
    'new parameter', 'through .data', 'key'])
def test_made_again_when_a_source_or_the_key_changes(change):
    module = nn.Linear(3, 4)
    make = Counted(module)
    with torch.no_grad():
        make.get(torch.float32)
    key = torch.float32
    if change == 'in place':
        with torch.no_grad():
            module.weight.add_(1)
    elif change == 'load_state_dict':
        module.load_state_dict({k: torch.randn_like(v)
                                for k, v in module.state_dict().items()})
    elif change == 'optimizer step':
        optimizer = torch.optim.SGD(module.parameters(), lr=1.)
        module(torch.randn(2, 3)).sum().backward()
        optimizer.step()
    elif change == 'to float64':
        module.double()
    elif change == 'new parameter':
        module.weight = nn.Parameter(module.weight.detach().clone())
    elif change == 'through .data':  # mmengine's EMA hook: no version bump
        version = compat.tensor_version(module.weight)
        module.weight.data.copy_(module.weight.data * 1.1)
        assert compat.tensor_version(module.weight) == version
    else:
        key = torch.bfloat16
    with torch.no_grad():
        out = make.get(key)
    assert make.calls == 2
    torch.testing.assert_close(out, module.weight * 2)
    assert len(module.__dict__['_derived_weights']) == 1  # one per name


def test_the_kept_result_pins_the_sources_storage():
    """A source replaced by a tensor of the same shape cannot land at its
    old address while the result derived from it is kept."""
    module = nn.Linear(3, 4)
    make = Counted(module)
    with torch.no_grad():
        make.get()
        old = module.weight.data_ptr()
        module.weight.data = torch.randn(4, 3)
        assert module.weight.data_ptr() != old
        make.get()
    assert make.calls == 2


def test_not_kept_where_autograd_or_the_compiler_needs_it(monkeypatch):
    module = nn.Linear(3, 4)
    make = Counted(module)
    first, again = make.get(), make.get()  # gradients enabled
    assert make.calls == 2 and first.grad_fn is not None
    assert '_derived_weights' not in module.__dict__
    monkeypatch.setattr(utils, 'is_compiling', lambda: True)
    with torch.no_grad():
        make.get(), make.get()
    assert make.calls == 4


def test_not_kept_on_meta_or_without_version_counts(monkeypatch):
    make = Counted(nn.Linear(3, 4, device='meta'))
    with torch.no_grad():
        make.get(), make.get()
    assert make.calls == 2
    make = Counted(nn.Linear(3, 4))
    monkeypatch.setattr(utils, 'tensor_version', lambda t: None)
    with torch.no_grad():
        make.get(), make.get()
    assert make.calls == 2


def test_tensor_version_counts_in_place_writes():
    t = torch.zeros(3)
    before = compat.tensor_version(t)
    t.add_(1)
    assert compat.tensor_version(t) == before + 1
    assert compat.tensor_version(object()) is None


def test_switched_off_nothing_is_kept(monkeypatch):
    monkeypatch.setattr(utils, 'KEEP_DERIVED', False)
    make = Counted(nn.Linear(3, 4))
    with torch.no_grad():
        make.get(), make.get()
    assert make.calls == 2
