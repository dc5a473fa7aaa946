"""Test (and evaluate) a segmentor (MMSegmentation 1.x ``tools/test.py`` flags).

    python tools/test.py configs/fpn_poolformer_s12_ade20k.py CHECKPOINT
    python tools/test.py CONFIG CHECKPOINT --tta           # multi-scale + flip
    python tools/test.py CONFIG CHECKPOINT --out preds/   # label PNGs (0..150)

The checkpoint is loaded strictly: a parameter of the model that the file
lacks, or has with another shape, is an error listing the keys
(``--allow-partial-load`` downgrades it to a warning); a damaged file
(checksums), NaN/Inf weights, or a head whose class count differs from the
test dataset's (or the checkpoint's recorded classes) stop it before
evaluation. Upstream PoolFormer
checkpoints (mmseg 1.x, sail-sg) are converted on the fly. Prints the
per-class IoU/Acc table and aAcc / mIoU / mAcc. See docs/training.md.
"""
import argparse
import logging
import os

import poolformer_seg  # noqa: F401  (must precede mmseg imports; registers)
from mmengine.config import Config, DictAction
from mmengine.dist import is_main_process
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.runner import Runner
from poolformer_seg.engine import (adapt_to_cpu_distributed,
                                   add_debug_argument,
                                   init_cpu_process_group, load_tool_config,
                                   run_tool)
from poolformer_seg.utils.loading import (check_class_count,
                                          load_segmentor_checkpoint)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='MMSeg test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help='directory for logs and the metrics json; default '
        './work_dirs/<config name>')
    parser.add_argument(
        '--out', type=str,
        help='directory to save the predicted label maps as PNGs (in the '
        'dataset\'s label space: ADE20K 1..150)')
    parser.add_argument(
        '--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='directory where the painted predictions are saved (in '
        'DIR/vis_data/vis_image; every image unless the config sets '
        'default_hooks.visualization.interval)')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value pairs; lists as '
        'key="[a,b]"; no white space')
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none', help='job launcher')
    parser.add_argument(
        '--tta', action='store_true',
        help='test-time augmentation: the config\'s tta_pipeline '
        '(multi-scale + flip) merged by its tta_model')
    parser.add_argument(
        '--allow-partial-load', action='store_true',
        help='load a checkpoint that lacks some of the model\'s weights or '
        'has other shapes, with a warning (default: error)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def trigger_visualization_hook(cfg, args):
    hooks = cfg.default_hooks
    if 'visualization' not in hooks:
        raise SystemExit('--show/--show-dir need default_hooks.visualization '
                         '(e.g. dict(type=\'SegVisualizationHook\'))')
    hooks.visualization.draw = True
    # mmseg's hook paints every 50th image by default; paint all of them
    # unless the config says otherwise
    hooks.visualization.setdefault('interval', 1)
    if args.show:
        hooks.visualization.show = True
        hooks.visualization.wait_time = args.wait_time
    if args.show_dir:
        cfg.visualizer.save_dir = args.show_dir
    return cfg


def build_config(args) -> Config:
    cfg = load_tool_config(args)
    # Loaded below, strictly, instead of mmengine's lenient load_from.
    cfg.load_from = None
    cfg.resume = False
    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)
    if args.tta:
        for key in ('tta_pipeline', 'tta_model'):
            if key not in cfg:
                raise SystemExit(f'--tta needs `{key}` in the config')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if args.out is not None:
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True
    return cfg


def segmentor_of(model):
    """The segmentor inside DDP and/or a TTA wrapper."""
    if is_model_wrapper(model):
        model = model.module
    if isinstance(model, BaseTTAModel):
        model = model.module
    return model


def main(argv=None):
    args = parse_args(argv)
    cfg = build_config(args)
    notes = adapt_to_cpu_distributed(cfg)
    notes += init_cpu_process_group(cfg)
    runner = Runner.from_cfg(cfg)
    for note in notes:
        runner.logger.log(logging.INFO, note)
    checkpoint = load_segmentor_checkpoint(
        segmentor_of(runner.model), args.checkpoint,
        allow_partial=args.allow_partial_load, logger=runner.logger)
    check_class_count(runner.model, runner.test_dataloader.dataset,
                      checkpoint, args.checkpoint)
    metrics = runner.test()
    if is_main_process():
        summary = '  '.join(f'{key}: {value:.2f}'
                            for key, value in metrics.items())
        print(f'{args.checkpoint}: {summary}', flush=True)


if __name__ == '__main__':
    run_tool(main)
