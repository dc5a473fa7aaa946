"""Hooks that make training runs crash-safe and exactly resumable.

* :class:`SafeCheckpointHook` -- mmengine's ``CheckpointHook`` with atomic
  writes of the ``.pth`` and of ``last_checkpoint``, old checkpoints deleted
  only *after* the new one is complete, no checkpoint of non-finite weights,
  and ``--resume`` that picks the last complete checkpoint.
* :class:`RNGStateHook` -- saves the python/numpy/torch(/CUDA) RNG states of
  the main process in each checkpoint and restores them on resume at the
  exact point of the uninterrupted run. Together with mmengine's replay of
  the already-seen batches (which re-creates the data order and the state of
  the dataloader workers' RNGs) this makes a resumed run equal to one that
  was never interrupted.
* :class:`FiniteLossHook` -- stops training at the first non-finite loss,
  before a checkpoint of it can be written.
* :class:`CheckpointFitHook` -- checks what a Runner loads (``load_from``,
  ``--resume``, mmseg's ``tools/test.py``) against the model, the run and
  the dataset, naming the file.
"""
import copy
import glob
import math
import os
import os.path as osp
import random
from typing import Optional

import numpy as np
import torch
from mmengine.dist import all_reduce, get_world_size, is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.runner.loops import IterBasedTrainLoop
from mmseg.registry import HOOKS

from ..compat import (built_eval_loop, built_train_loop, diff_rank_seed,
                      infinite_dataloader_iterator, runner_resume,
                      set_runner_load_from, train_dataloader_cfg)
from ..utils.layouts import unwrap_state_dict
from ..utils.loading import (FINE_TUNE_HINT, check_class_count,
                             check_resumable, fit_state_dict)
from .atomic import atomic_write, find_resumable_checkpoint, pointer_to


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/Inf loss or parameter."""


def _non_finite_entries(model: torch.nn.Module, limit: int = 3) -> list:
    names = []
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            names.append(name)
            if len(names) == limit:
                break
    return names


@HOOKS.register_module()
class SafeCheckpointHook(CheckpointHook):
    """``CheckpointHook`` that never leaves a broken checkpoint behind.

    Same arguments as mmengine's ``CheckpointHook``. Differences:

    * local checkpoints are written through the ``'local_atomic'`` file
      backend (temporary file + ``os.replace``), and ``last_checkpoint`` is
      replaced atomically after the checkpoint is complete, so a kill or a
      full disk during a save leaves the previous pair intact;
    * with ``max_keep_ckpts``, the oldest checkpoint is deleted after the new
      one is written (mmengine deletes it first);
    * it refuses to save weights containing NaN/Inf (:class:`NonFiniteError`);
    * with ``resume=True`` and no explicit checkpoint, the run resumes from
      :func:`~poolformer_seg.engine.atomic.find_resumable_checkpoint`.
    """

    def __init__(self, *args, out_dir=None, backend_args=None,
                 file_client_args=None, **kwargs):
        local = out_dir is None or '://' not in str(out_dir)
        if backend_args is None and file_client_args is None and local:
            backend_args = dict(backend='local_atomic')
        super().__init__(*args, out_dir=out_dir, backend_args=backend_args,
                         file_client_args=file_client_args, **kwargs)

    def before_run(self, runner) -> None:
        # Runs before Runner.load_or_resume().
        resume, load_from = runner_resume(runner)
        if not resume:
            return
        if load_from is None:
            load_from = find_resumable_checkpoint(runner.work_dir)
            set_runner_load_from(runner, load_from)
            origin = f'the last checkpoint in {runner.work_dir}'
        else:
            origin = 'load_from'
        if load_from is not None:
            runner.logger.info(f'--resume: resuming from {load_from} '
                               f'({origin})')

    def before_train(self, runner) -> None:
        super().before_train(runner)
        # A run killed during a save leaves its temporary file behind.
        if is_main_process() and self.backend_args == dict(
                backend='local_atomic'):
            for stale in glob.glob(osp.join(self.out_dir, '*.pth.*.tmp')):
                runner.logger.info(f'removing {stale}, a checkpoint that an '
                                   'interrupted run did not finish writing')
                os.remove(stale)

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        bad = _non_finite_entries(runner.model)
        if bad:
            raise NonFiniteError(
                f'refusing to save a checkpoint at step {step}: {bad} contain '
                'NaN/Inf values. Training diverged; lower the learning rate '
                'or clip gradients (optim_wrapper.clip_grad), then resume '
                'from the last checkpoint.')
        stale = []
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and
                                            self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                stale.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids',
                                           list(self.keep_ckpt_ids))
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        runner.save_checkpoint(
            self.out_dir, filename, self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler, meta=meta,
            by_epoch=self.by_epoch, backend_args=self.backend_args,
            **self.args)
        if not is_main_process():
            return
        atomic_write(osp.join(runner.work_dir, 'last_checkpoint'),
                     pointer_to(self.last_ckpt, runner.work_dir))
        for old in stale:
            path = self.file_backend.join_path(self.out_dir,
                                               self.filename_tmpl.format(old))
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)


def capture_rng_state() -> dict:
    """RNG states of this process: python, numpy, torch and, when CUDA is
    in use, the current device's (one device per process, as in DDP)."""
    state = dict(python=random.getstate(), numpy=np.random.get_state(),
                 torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'].cpu())


class _RestoreBeforeFirstFetch:
    """Iterator wrapper: calls ``restore`` before item ``skip + 1``.

    mmengine's ``IterBasedTrainLoop`` replays the ``iter`` already-trained
    batches through the data pipeline on resume and then fetches the next
    batch; the RNG states must be put back exactly in between.
    """

    def __init__(self, iterator, skip: int, restore):
        self._iterator = iterator
        self._remaining = skip
        self._restore = restore

    def __iter__(self):
        return self

    def __next__(self):
        if self._remaining == 0:
            self._restore()
        self._remaining -= 1
        return next(self._iterator)

    def __getattr__(self, name):
        return getattr(self._iterator, name)


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Save the RNG states in checkpoints and restore them on resume.

    Where the randomness of a run is consumed, and how it is reproduced:

    * data order: the sampler's own generator, seeded from the run's seed;
      mmengine replays the seen batches on resume. If the resumed run was
      started with another seed than the checkpoint's, the train dataloader
      is rebuilt with the checkpoint's seed (mmengine builds it before it
      reads the seed from the checkpoint).
    * augmentation in dataloader workers: workers are seeded from the run's
      seed when the iterator starts and consume randomness only for their
      batches, so the replay brings them to the same state.
    * main process (dropout, drop path, augmentation when
      ``num_workers=0``): the states saved in ``checkpoint['rng_state']`` are
      restored after the replay, right before the first new batch is fetched.
    * validation consumes randomness (e.g. the dataloader's base seed); its
      use is undone after each validation so that a run that validates at
      iteration k and one that resumes from k continue identically.

    Exactness holds per process; with ``randomness.diff_rank_seed=True`` in
    distributed training, ranks other than 0 get rank 0's state back.
    """

    priority = 'VERY_LOW'

    def __init__(self):
        self._loader_seed = None
        self._resumed_state: Optional[dict] = None
        self._train_state: Optional[dict] = None  # stashed during validation

    def before_run(self, runner) -> None:
        # The train loop (and its dataloader) is built before this hook runs
        # and before the runner reads the seed from a resumed checkpoint.
        self._loader_seed = runner.seed

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint['rng_state'] = (self._train_state if self._train_state
                                   is not None else capture_rng_state())

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._resumed_state = checkpoint.get('rng_state')

    def before_val(self, runner) -> None:
        if built_train_loop(runner) is not None:  # training, not test-only
            self._train_state = capture_rng_state()

    def after_val(self, runner) -> None:
        if self._train_state is not None:
            restore_rng_state(self._train_state)
            self._train_state = None

    def before_train(self, runner) -> None:
        loop = runner.train_loop
        state, self._resumed_state = self._resumed_state, None
        if loop.iter == 0 and loop.epoch == 0:
            return  # fresh run or load_from: nothing to restore
        if runner.seed != self._loader_seed and isinstance(
                loop, IterBasedTrainLoop):
            self._rebuild_dataloader(runner, loop)
        if state is None:
            runner.logger.warning(
                'the resumed checkpoint holds no RNG state (it was written '
                'without RNGStateHook): the data order is restored, but '
                'random augmentation and dropout will differ from an '
                'uninterrupted run')
            return
        if isinstance(loop, IterBasedTrainLoop):
            inner = loop.dataloader_iterator

            def restore():
                restore_rng_state(state)
                loop.dataloader_iterator = inner

            loop.dataloader_iterator = _RestoreBeforeFirstFetch(
                inner, loop.iter, restore)
        else:  # epoch-based loops do not replay batches
            restore_rng_state(state)

    def _rebuild_dataloader(self, runner, loop) -> None:
        cfg = train_dataloader_cfg(runner)
        if not isinstance(cfg, dict):
            runner.logger.warning(
                f'the train dataloader was built with seed '
                f'{self._loader_seed}, not the resumed seed {runner.seed}, '
                'and cannot be rebuilt (it was passed as an object): the '
                'data order will differ from the interrupted run')
            return
        runner.logger.info(
            f'rebuilding the train dataloader with the resumed seed '
            f'{runner.seed} (it was built with {self._loader_seed})')
        loop.dataloader = runner.build_dataloader(
            copy.deepcopy(cfg), seed=runner.seed,
            diff_rank_seed=diff_rank_seed(runner))
        loop.dataloader_iterator = infinite_dataloader_iterator(
            loop.dataloader)


@HOOKS.register_module()
class FiniteLossHook(Hook):
    """Stop training at the first NaN/Inf loss, before it is checkpointed.

    Runs after each iteration, ahead of the checkpoint hook (priority
    ``ABOVE_NORMAL`` < ``VERY_LOW``), and raises :class:`NonFiniteError`
    naming the iteration, the non-finite loss terms and the last good
    checkpoint. In distributed runs all ranks agree before raising, so no
    rank is left waiting in a collective.
    """

    priority = 'ABOVE_NORMAL'

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs: Optional[dict] = None) -> None:
        losses = {key: float(torch.as_tensor(value).detach())
                  for key, value in (outputs or {}).items()
                  if key.startswith('loss') or '.loss' in key}
        bad = {key: value for key, value in losses.items()
               if not math.isfinite(value)}
        if get_world_size() > 1:
            flag = torch.tensor([1. if bad else 0.])
            all_reduce(flag, op='max')
            if flag.item() > 0 and not bad:
                bad = {'(another rank)': float('nan')}
        if not bad:
            return
        last = runner.message_hub.get_info('last_ckpt') or 'none saved yet'
        raise NonFiniteError(
            f'training stopped at iteration {runner.iter + 1}: non-finite '
            f'loss {bad}. No checkpoint was written for this iteration; the '
            f'last good one is {last}. Lower the learning rate (optimizer.lr'
            f'), clip gradients (optim_wrapper.clip_grad=dict(max_norm=...)'
            f') or check the data, then resume with --resume.')


@HOOKS.register_module()
class CheckpointFitHook(Hook):
    """Check every checkpoint a Runner loads before it reaches the model.

    mmengine's ``Runner.load_checkpoint`` (``load_from``, ``--resume``, and
    mmseg's ``tools/test.py``, which sets ``load_from``) calls
    ``after_load_checkpoint`` between reading the file and loading it into
    the model; the state dict is converted and checked there
    (:func:`~poolformer_seg.utils.loading.fit_state_dict`), naming the file:

    * ``--resume``: the file must be a training checkpoint
      (:func:`~poolformer_seg.utils.loading.check_resumable`) and fit the
      model exactly;
    * ``load_from`` in training (fine-tuning): the head may differ (another
      class count); its tensors keep their initialisation and one log line
      names them. Everything else must fit: an m36 file for the s12 config
      stops the run with the keys;
    * evaluation only (``runner.test()``/``val()``): the file must fit
      exactly, and ``model.decode_head.num_classes``, the dataset's classes
      and the checkpoint's ``meta.dataset_meta.classes`` must agree.

    Checkpoint integrity (CRC-32) and NaN/Inf weights are checked earlier,
    when mmengine reads the file (:mod:`poolformer_seg.utils.safe_load`).
    """

    priority = 'VERY_HIGH'

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        resume, load_from = runner_resume(runner)
        source = load_from or 'the checkpoint'
        if resume:
            check_resumable(checkpoint, source)
        training = built_train_loop(runner) is not None
        checkpoint['state_dict'] = fit_state_dict(
            runner.model, unwrap_state_dict(checkpoint), source,
            new_head=training and not resume, logger=runner.logger,
            hint=FINE_TUNE_HINT)
        loop = None if training else built_eval_loop(runner)
        if loop is not None:
            check_class_count(runner.model, loop.dataloader.dataset,
                              checkpoint, source)


__all__ = ['SafeCheckpointHook', 'RNGStateHook', 'FiniteLossHook',
           'CheckpointFitHook',
           'NonFiniteError', 'capture_rng_state', 'restore_rng_state']
