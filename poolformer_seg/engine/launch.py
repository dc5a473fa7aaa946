"""Shared set-up of the tools.

* :func:`run_tool`: every tool's entry point; the project's own errors
  (bad data, config, checkpoint, input file, full disk) become one short
  message and exit status 1 instead of a traceback;
* config loading with the mmseg tools' precedence rules and the checks of
  :mod:`poolformer_seg.engine.config_check`;
* the adjustments that let a GPU config run distributed on CPU-only
  machines;
* the filter for upstream warnings known to be harmless here.
"""
import argparse
import datetime
import os
import os.path as osp
import re
import sys
import warnings
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as torch_dist
from mmengine.config import Config

from .config_check import ConfigError, check_config, read_config

DEBUG_ENV = 'POOLFORMER_SEG_DEBUG'


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--debug`` flag that :func:`run_tool` reads."""
    parser.add_argument(
        '--debug', action='store_true',
        help=f'show the full traceback of an error (or set {DEBUG_ENV}=1)')


def user_errors() -> tuple:
    """Exceptions that explain themselves: raised by this project's checks
    with a message naming the file, key or parameter and the fix."""
    from poolformer_seg.datasets.validation import DataError
    from poolformer_seg.utils.safe_load import CheckpointError

    from .atomic import DiskFullError
    from .hooks import NonFiniteError
    return (ConfigError, DataError, CheckpointError, DiskFullError,
            NonFiniteError, FileNotFoundError)


def error_message(err: BaseException) -> str:
    """The message of ``err``, without the traceback text that a DataLoader
    worker prepends when it re-raises an error in the main process."""
    message = str(err)
    if 'Original Traceback' in message:
        found = re.findall(rf'^{type(err).__name__}: (.*)$', message,
                           flags=re.MULTILINE | re.DOTALL)
        message = found[-1] if found else message
    return f'{type(err).__name__}: {message.strip()}'


def run_tool(main: Callable, argv: Optional[Sequence[str]] = None):
    """Run ``main(argv)`` as a command-line tool.

    An error of :func:`user_errors` is printed as ``error: <Type>: <message>``
    plus a line on ``--debug``, and the process exits with status 1; with
    ``--debug`` in ``argv`` or ``POOLFORMER_SEG_DEBUG=1`` it propagates with
    its traceback. Other exceptions (bugs) always keep their traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv or \
        os.environ.get(DEBUG_ENV, '').strip() not in ('', '0')
    try:
        return main(argv)
    except user_errors() as err:
        if debug:
            raise
        print(f'error: {error_message(err)}', file=sys.stderr, flush=True)
        print(f'(run with --debug or {DEBUG_ENV}=1 for the traceback)',
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None


# (message regex, category, why it is harmless with this project's configs).
# Filtered by the tools only: a library user keeps every warning.
KNOWN_WARNINGS = [
    (r'``build_(backbone|neck|head|loss)`` would be deprecated soon',
     UserWarning,
     "mmseg 1.2.2's own heads call its deprecated builders; nothing a "
     'config can change'),
    (r'Default ``avg_non_ignore`` is False', UserWarning,
     "the paper's setting, which the configs keep on purpose"),
    (r'`reduce_zero_label` will be deprecated', UserWarning,
     "mmseg's ADE20K pipeline sets it on LoadAnnotations, as the paper's "
     'configs do; it works as documented'),
    (r'The draw is False, it means that the hook for visualization',
     UserWarning, "mmseg's default runtime: pictures are drawn only with "
     "tools/test.py's --show-dir, which turns it on"),
    (r'This DataLoader will create \d+ worker processes', UserWarning,
     'the configs keep the paper\'s 4 workers per GPU; on fewer cores the '
     'workers only share them'),
]


def quiet_known_warnings() -> None:
    """Ignore the :data:`KNOWN_WARNINGS`, so that a tool's output shows
    progress and results. Every other warning still prints."""
    for message, category, _ in KNOWN_WARNINGS:
        warnings.filterwarnings('ignore', message=message, category=category)


def load_tool_config(args) -> Config:
    """Load ``args.config`` as mmseg's tools do.

    ``--cfg-options`` are merged, ``args.launcher`` is recorded, and the work
    dir is: ``--work-dir`` > the config's ``work_dir`` >
    ``./work_dirs/<config name>``. The result passes
    :func:`~poolformer_seg.engine.config_check.check_config`.
    """
    quiet_known_warnings()
    cfg = read_config(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    check_config(cfg, args.config)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    return cfg


def _replace_sync_bn(node) -> int:
    """Turn every ``type='SyncBN'`` in a config tree into ``'BN'``."""
    count = 0
    if isinstance(node, dict):
        if node.get('type') == 'SyncBN':
            node['type'] = 'BN'
            count += 1
        for value in node.values():
            count += _replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += _replace_sync_bn(value)
    return count


def adapt_to_cpu_distributed(cfg: Config) -> List[str]:
    """Make a distributed launch work without CUDA; no-op otherwise.

    When ``cfg.launcher`` is not ``'none'`` and CUDA is unavailable:

    * ``env_cfg.dist_cfg.backend`` ``nccl`` (GPU only) becomes ``gloo``;
    * ``SyncBN`` in ``cfg.model`` becomes ``BN``: torch's SyncBatchNorm
      refuses CPU tensors when a process group exists. Each rank then keeps
      its own BN statistics (parameters stay identical through DDP);
    * DDP is built without ``device_ids`` (MMEngine passes the local rank,
      which DDP rejects for CPU modules).

    Then call :func:`init_cpu_process_group` before building the Runner.

    Returns:
        list[str]: one line per change, for the log.
    """
    if cfg.get('launcher', 'none') == 'none' or torch.cuda.is_available():
        return []
    notes = []
    dist_cfg = cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})
    if dist_cfg.get('backend', 'nccl') == 'nccl':
        dist_cfg['backend'] = 'gloo'
        notes.append('no CUDA: distributed backend nccl -> gloo')
    if _replace_sync_bn(cfg.model):
        notes.append('no CUDA: SyncBN -> BN (per-process statistics)')
    if cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel', device_ids=None,
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
        notes.append('no CUDA: DDP on CPU (device_ids=None)')
    return notes


def init_cpu_process_group(cfg: Config) -> List[str]:
    """Start the process group of a distributed launch without CUDA.

    MMEngine's ``init_dist`` calls ``torch.cuda.set_device`` before it
    creates the group, which fails without CUDA; the Runner skips
    ``init_dist`` when a group exists. The group is built from the
    environment that torchrun sets (only ``--launcher pytorch``) with the
    backend of ``cfg.env_cfg.dist_cfg`` (see :func:`adapt_to_cpu_distributed`).
    No-op with CUDA, without a launcher, or when a group exists.

    Returns:
        list[str]: the log line, if a group was started.
    """
    if cfg.get('launcher', 'none') == 'none' or torch.cuda.is_available() \
            or torch_dist.is_initialized():
        return []
    if cfg.launcher != 'pytorch':
        raise SystemExit(f'without CUDA, distributed runs need '
                         f'--launcher pytorch (torchrun), got '
                         f'--launcher {cfg.launcher}')
    dist_cfg = dict(cfg.env_cfg.dist_cfg)
    backend = dist_cfg.pop('backend')
    if 'timeout' in dist_cfg:
        dist_cfg['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
    torch_dist.init_process_group(backend=backend, **dist_cfg)
    return [f'no CUDA: process group started with {backend}, rank '
            f'{torch_dist.get_rank()} of {torch_dist.get_world_size()}']
