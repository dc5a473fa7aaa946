"""Train a segmentor (MMSegmentation 1.x ``tools/train.py`` flags).

    python tools/train.py configs/fpn_poolformer_s12_ade20k.py
    bash tools/dist_train.sh configs/fpn_poolformer_s12_ade20k.py 8

See docs/training.md.
"""
import argparse
import logging
import os

import poolformer_seg  # noqa: F401  (must precede mmseg imports; registers)
import torch
from mmengine.config import Config, DictAction
from mmengine.runner import Runner
from poolformer_seg.engine import (adapt_to_cpu_distributed,
                                   add_debug_argument,
                                   init_cpu_process_group, load_tool_config,
                                   run_tool)

from mmseg.registry import RUNNERS

AMP_TYPES = ('AmpOnCudaOptimWrapper', 'AmpOptimWrapper')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a segmentor')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume', action='store_true', default=False,
        help='resume from the latest checkpoint in the work_dir '
        '(or from load_from, if the config sets it)')
    parser.add_argument(
        '--amp', action='store_true', default=False,
        help='require mixed-precision training (needs CUDA); the configs of '
        'this project already use it wherever CUDA is available')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value pairs, e.g. '
        'train_cfg.max_iters=1000 model.backbone.init_cfg=None; lists as '
        'key="[a,b]"; no white space')
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or
    # --local_rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def enable_amp(cfg: Config) -> str:
    """Apply ``--amp``; returns the log line."""
    if not torch.cuda.is_available():
        raise SystemExit('--amp needs a CUDA device (mixed precision here is '
                         'CUDA autocast); without it, train without --amp')
    wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if wrapper in AMP_TYPES:
        return f'AMP: already enabled by the config ({wrapper})'
    if wrapper != 'OptimWrapper':
        raise SystemExit(f'--amp works with optim_wrapper type OptimWrapper, '
                         f'got {wrapper}')
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.loss_scale = 'dynamic'
    return 'AMP: OptimWrapper -> AmpOptimWrapper (fp16, dynamic loss scale)'


def build_config(args) -> Config:
    cfg = load_tool_config(args)
    cfg.resume = args.resume
    return cfg


def main(argv=None):
    args = parse_args(argv)
    cfg = build_config(args)
    notes = adapt_to_cpu_distributed(cfg)
    notes += init_cpu_process_group(cfg)
    if args.amp:
        notes.append(enable_amp(cfg))
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg \
        else RUNNERS.build(cfg)
    for note in notes:
        runner.logger.log(logging.INFO, note)
    runner.train()


if __name__ == '__main__':
    run_tool(main)
