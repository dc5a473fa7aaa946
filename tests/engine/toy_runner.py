"""A seconds-fast mmengine Runner whose training consumes every kind of RNG.

* data order: ``InfiniteSampler(shuffle=True)`` (its own generator);
* augmentation in the data pipeline: ``np.random`` noise and a
  ``random.random()`` sign flip (in dataloader workers when
  ``num_workers > 0``, else in the main process);
* the model: ``Dropout(0.5)`` (main-process torch RNG);
* AdamW with PolyLR, so optimizer and scheduler state matter too.

So a resumed run matches an uninterrupted one only if the data order, the
worker and main-process RNG states, the optimizer and the scheduler are all
restored.
"""
import random
import uuid

import numpy as np
import torch
import torch.nn as nn
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

import poolformer_seg  # noqa: F401  (safe loading, hooks)
from mmseg.registry import METRICS, MODELS  # noqa: E402


@MODELS.register_module(force=True)
class ToyModel(BaseModel):

    def __init__(self, nan_at_call: int = -1):
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 1)
        self.nan_at_call = nan_at_call
        self.calls = 0

    def forward(self, inputs, targets=None, mode='tensor'):
        out = self.fc2(self.drop(torch.relu(self.fc1(inputs)))).squeeze(-1)
        if mode != 'loss':
            return out
        self.calls += 1
        loss = ((out - targets) ** 2).mean()
        if self.calls == self.nan_at_call:
            loss = loss * float('nan')
        return dict(loss=loss)


class NoisyDataset(Dataset):
    """32 fixed vectors; each fetch adds numpy noise and a python-random
    sign flip."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 4, generator=gen)
        self.y = self.x.sum(1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        noise = torch.from_numpy(np.random.normal(size=4).astype('float32'))
        sign = -1. if random.random() < 0.5 else 1.
        return dict(inputs=sign * (self.x[i] + 0.1 * noise),
                    targets=sign * self.y[i])


@METRICS.register_module(force=True)
class ToyMetric(BaseMetric):
    """Mean absolute prediction (validation only has to run)."""

    def process(self, data_batch, data_samples):
        self.results.extend(float(abs(s)) for s in data_samples)

    def compute_metrics(self, results):
        return dict(mean_abs=sum(results) / len(results))


def toy_runner(work_dir, max_iters=8, interval=2, resume=False,
               load_from=None, seed=0, num_workers=0, rng_hook=True,
               nan_at_call=-1, max_keep_ckpts=-1, val=False):
    """Build a Runner on :class:`ToyModel`; ``seed=None`` picks one at
    random (as mmseg does by default)."""
    custom_hooks = [dict(type='FiniteLossHook')]
    if rng_hook:
        custom_hooks.append(dict(type='RNGStateHook'))
    loader = dict(dataset=NoisyDataset(), batch_size=4,
                  num_workers=num_workers,
                  persistent_workers=num_workers > 0,
                  sampler=dict(type='InfiniteSampler', shuffle=True),
                  collate_fn=dict(type='default_collate'))
    val_kwargs = {}
    if val:
        val_kwargs = dict(
            val_dataloader=dict(loader, sampler=dict(type='DefaultSampler',
                                                     shuffle=False)),
            val_cfg=dict(type='ValLoop'),
            val_evaluator=dict(type='ToyMetric'))
    return Runner(
        # built by the runner after seeding, so weights depend on `seed`
        model=dict(type='ToyModel', nan_at_call=nan_at_call),
        work_dir=str(work_dir),
        experiment_name=f'toy_{uuid.uuid4().hex[:8]}',
        train_dataloader=loader,
        train_cfg=dict(by_epoch=False, max_iters=max_iters,
                       val_interval=interval),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.05)),
        param_scheduler=dict(type='PolyLR', by_epoch=False, power=0.9,
                             eta_min=0, end=8),
        default_hooks=dict(
            checkpoint=dict(type='SafeCheckpointHook', by_epoch=False,
                            interval=interval,
                            max_keep_ckpts=max_keep_ckpts),
            logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=custom_hooks,
        randomness=dict(seed=seed),
        resume=resume, load_from=load_from,
        default_scope='mmseg',
        **val_kwargs)


def final_weights(runner) -> dict:
    return {k: v.detach().clone()
            for k, v in runner.model.state_dict().items()}


def stop_workers(*runners) -> None:
    """Stop the runners' dataloader workers now: left to garbage
    collection, each worker costs a 5 s join timeout."""
    for runner in runners:
        train, val = runner._train_loop, runner._val_loop
        iterators = [getattr(getattr(train, 'dataloader_iterator', None),
                             '_iterator', None)]
        iterators += [getattr(getattr(loop, 'dataloader', None), '_iterator',
                              None) for loop in (train, val)]
        for iterator in iterators:
            if hasattr(iterator, '_shutdown_workers'):
                iterator._shutdown_workers()
