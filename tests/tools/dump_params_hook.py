"""Test helper: each rank saves its parameters and the images it trained on.

Used by test_train_test.py::test_distributed_gloo_replicas_identical through
``custom_imports`` (the module must be importable in the worker processes).
"""
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmseg.registry import HOOKS


def _params(runner):
    model = runner.model.module if is_model_wrapper(runner.model) \
        else runner.model
    return {name: param.detach().clone()
            for name, param in model.named_parameters()}


@HOOKS.register_module()
class DumpParamsHook(Hook):
    """Writes ``work_dir/params_rank{r}.pth``: ``initial`` and ``final``
    parameters and the ``images`` (paths) of every training batch."""

    def before_train(self, runner):
        self.initial = _params(runner)
        self.images = []

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.images += [sample.img_path
                        for sample in data_batch['data_samples']]

    def after_train(self, runner):
        torch.save(dict(initial=self.initial, final=_params(runner),
                        images=self.images),
                   osp.join(runner.work_dir, f'params_rank{get_rank()}.pth'))
