"""Adjustments that let a GPU config run distributed on CPU-only machines."""
from typing import List

import torch
from mmengine.config import Config


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
