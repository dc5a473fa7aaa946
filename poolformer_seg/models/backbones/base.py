"""What the four-stage backbones (PoolFormer, MetaFormer) share.

Stages are counted 0..3 (strides 4, 8, 16, 32). A subclass builds ``stem``,
``stages`` (a ``ModuleList``) and one output norm ``norm{i}`` per index in
``out_indices``, implements ``stage_features(x)`` (the raw stage outputs for
``out_indices``), names in ``EVAL_NORMS`` the norm types that
``norm_eval=True`` keeps in eval mode, and gives its arch table's resolver
(``resolve_arch``, returning a dict with ``embed_dims``) and default arch.
"""
import inspect
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.model import BaseModule

NUM_STAGES = 4

IMPLS = ('fast', 'plain')
"""How a backbone computes its function (same weights and keys): see each
backbone's ``impl`` argument."""


def check_impl(impl, backbone: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f'impl={impl!r} is not an implementation of '
                         f'{backbone}; choose one of {list(IMPLS)}')
    return impl


def impl_memory_format(impl: str) -> torch.memory_format:
    """The weights' memory format: channels_last for ``'fast'`` (on CPU a
    1x1 convolution is then a matrix product over rows of channels, 3x3
    average pooling runs several times faster, and compiled MetaFormers
    1.2-1.4x faster), NCHW for ``'plain'``."""
    return torch.channels_last if impl == 'fast' else torch.contiguous_format


def check_out_indices(out_indices) -> Tuple[int, ...]:
    """Sorted stage indices in 0..3 (negative ones count from the end)."""
    if isinstance(out_indices, int):
        out_indices = (out_indices, )
    if not isinstance(out_indices, Sequence) or not out_indices:
        raise ValueError('out_indices must be a non-empty sequence of stage '
                         f'indices, got {out_indices!r}')
    resolved = []
    for index in out_indices:
        if not isinstance(index, int) or not -NUM_STAGES <= index < NUM_STAGES:
            raise ValueError(
                f'out_indices entry {index!r} is out of range: stages are '
                f'counted 0..{NUM_STAGES - 1} (or -{NUM_STAGES}..-1)')
        resolved.append(index % NUM_STAGES)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f'out_indices {tuple(out_indices)} names a stage '
                         'twice')
    return tuple(sorted(resolved))


def check_frozen_stages(frozen_stages) -> int:
    if not isinstance(frozen_stages, int) or \
            not -1 <= frozen_stages <= NUM_STAGES:
        raise ValueError(f'frozen_stages must be an int in [-1, '
                         f'{NUM_STAGES}], got {frozen_stages!r}')
    return frozen_stages


def check_drop_path_rate(drop_path_rate) -> float:
    if not 0. <= drop_path_rate < 1.:
        raise ValueError(f'drop_path_rate must be in [0, 1), got '
                         f'{drop_path_rate}')
    return drop_path_rate


class StagedBackbone(BaseModule):
    """Output norms, ResNet-style freezing and ``norm_eval`` of a four-stage
    backbone (see the module docstring for what a subclass provides)."""

    EVAL_NORMS: Tuple[type, ...] = ()

    @staticmethod
    def resolve_arch(arch) -> dict:
        raise NotImplementedError

    @classmethod
    def output_channels(cls, arch=None, out_indices=(0, 1, 2, 3)):
        """The channels of the maps a backbone built with these arguments
        returns, without building it (``arch=None``: the default)."""
        if arch is None:
            arch = inspect.signature(cls).parameters['arch'].default
        dims = cls.resolve_arch(arch)['embed_dims']
        return [dims[i] for i in check_out_indices(out_indices)]

    def stage_features(self, x) -> List[torch.Tensor]:
        raise NotImplementedError

    min_input_size: int = 1  # smallest height/width the stem accepts

    def _check_input(self, x):
        """A ``B x in_channels x H x W`` float tensor, big enough for the
        stem: anything else is refused naming what is wrong."""
        name = type(self).__name__
        if not torch.is_tensor(x) or x.dim() != 4:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x)
            raise ValueError(f'{name} expects a B x C x H x W tensor, got '
                             f'{shape}')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'{name} was built with in_channels='
                             f'{self.in_channels} but the input has '
                             f'{x.shape[1]} channels')
        if not x.is_floating_point():
            raise TypeError(f'{name} expects a float tensor, got '
                            f'{x.dtype}; normalise the image first')
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f'input {tuple(x.shape[-2:])} is smaller than '
                             f'the minimum {self.min_input_size} px per side '
                             'of the stem convolution')

    def forward(self, x) -> Tuple[torch.Tensor, ...]:
        return self._forward(x)

    def _forward(self, x) -> Tuple[torch.Tensor, ...]:
        features = self.stage_features(x)
        return tuple(getattr(self, f'norm{i}')(feature)
                     for i, feature in zip(self.out_indices, features))

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules = [self.stem]
        for i in range(self.frozen_stages):
            modules.append(self.stages[i])
            if i in self.out_indices:
                modules.append(getattr(self, f'norm{i}'))
        return modules

    def _freeze_stages(self):
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, self.EVAL_NORMS):
                    module.eval()
        return self
