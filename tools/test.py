# Copyright (c) mmtune contributors. All rights reserved.
"""Test (and evaluate) a checkpoint: mmdet's ``tools/test.py`` plus mmtune.

On top of mmdet 3.3's tool it

- imports mmtune (registers its hooks) and applies mmtune's config keys
  with :func:`mmtune.engine.config.apply_mmtune_cfg`;
- generates the demo dataset when the config has ``demo_data``;
- folds every BN into its conv after the checkpoint is loaded with
  ``--fuse-conv-bn`` (:func:`mmtune.fuse_conv_bn`);
- runs distributed on machines without CUDA (``--launcher pytorch`` with
  the gloo backend), which mmengine alone does not.
"""

import argparse
import os
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.evaluator import DumpResults
from mmengine.hooks import EMAHook, Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import mmtune
from mmtune.datasets import prepare_demo_data
from mmtune.engine.config import apply_mmtune_cfg
from mmtune.engine.launch import (
    allow_full_checkpoint_load,
    close_distributed,
    setup_cpu_distributed,
)


def parse_args():
    parser = argparse.ArgumentParser(description='Test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help='the directory to save the file containing evaluation metrics',
    )
    parser.add_argument(
        '--out',
        type=str,
        help='dump predictions to a pickle file for offline evaluation',
    )
    parser.add_argument(
        '--show', action='store_true', help='show prediction results'
    )
    parser.add_argument(
        '--show-dir',
        help='directory where painted images will be saved. '
        'If specified, it will be automatically saved '
        'to the work_dir/timestamp/show_dir',
    )
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s)'
    )
    parser.add_argument(
        '--fuse-conv-bn',
        action='store_true',
        help='fold every BN into its conv after loading the checkpoint '
        '(mmtune.fuse_conv_bn): faster inference, same results',
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. If the value to '
        'be overwritten is a list, it should be like key="[a,b]" or key=a,b '
        'It also allows nested list/tuple values, e.g. key="[(a,b),(c,d)]" '
        'Note that the quotation marks are necessary and that no white space '
        'is allowed.',
    )
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher',
    )
    # torch.distributed.launch of PyTorch >= 2.0 passes `--local-rank`.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


class FuseConvBNHook(Hook):
    """Fold BN into conv once the runner holds the weights to test.

    The runner loads ``load_from`` after ``before_run``, and EMAHook swaps
    its averaged weights in at ``before_test_epoch`` (NORMAL priority): so
    this folds at ``before_test_epoch`` with the lowest priority, and the
    folded model holds the averaged weights.
    """

    priority = 'LOWEST'

    def before_test_epoch(self, runner) -> None:
        model = runner.model
        if is_model_wrapper(model):
            model = model.module
        model.eval()  # the fold uses the running statistics
        report = mmtune.fuse_conv_bn(model)
        runner.logger.info(f'--fuse-conv-bn: {report}')
        # EMAHook would swap its weights back after the test, parameter by
        # parameter, into a model that no longer has those parameters. The
        # test is the run's last step: drop it (mmengine has no public way).
        ema_hooks = [h for h in runner.hooks if isinstance(h, EMAHook)]
        if ema_hooks:
            runner._hooks = [h for h in runner.hooks if h not in ema_hooks]


def trigger_visualization_hook(cfg: Config, args) -> None:
    """Turn on the config's visualization hook (as mmdet's tool does)."""
    if 'visualization' not in cfg.default_hooks:
        raise RuntimeError(
            '--show and --show-dir need a visualization hook in '
            'default_hooks, e.g. '
            "visualization=dict(type='DetVisualizationHook')"
        )
    visualization_hook = cfg.default_hooks.visualization
    visualization_hook.draw = True
    if args.show:
        visualization_hook.show = True
        visualization_hook.wait_time = args.wait_time
    if args.show_dir:
        visualization_hook.test_out_dir = args.show_dir


def build_dump_metric(cfg: Config, out: str):
    """The metric that pickles the predictions to ``out``."""
    if not out.endswith(('.pkl', '.pickle')):
        raise ValueError(f'--out must be a .pkl or .pickle file, got {out!r}')
    if cfg.get('default_scope') == 'mmdet':
        # mmdet's encodes masks as RLE, as its analysis tools expect.
        from mmdet.evaluation import DumpDetResults

        return DumpDetResults(out_file_path=out)
    return DumpResults(out_file_path=out)


def main():
    args = parse_args()
    allow_full_checkpoint_load()

    # load config
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    apply_mmtune_cfg(cfg)

    # work_dir is determined in this priority: CLI > segment in file > filename
    if args.work_dir is not None:
        # update configs according to CLI args if args.work_dir is not None
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        # use config filename as default work_dir if cfg.work_dir is None
        cfg.work_dir = osp.join(
            './work_dirs', osp.splitext(osp.basename(args.config))[0]
        )

    cfg.load_from = args.checkpoint

    if args.show or args.show_dir:
        trigger_visualization_hook(cfg, args)

    prepare_demo_data(cfg)
    setup_cpu_distributed(cfg)

    # build the runner from config
    if 'runner_type' not in cfg:
        # build the default runner
        runner = Runner.from_cfg(cfg)
    else:
        # build customized runner from the registry
        # if 'runner_type' is set in the cfg
        runner = RUNNERS.build(cfg)

    if args.fuse_conv_bn:
        runner.register_hook(FuseConvBNHook())

    # add `DumpResults` dummy metric
    if args.out is not None:
        runner.test_evaluator.metrics.append(build_dump_metric(cfg, args.out))

    # start testing
    runner.test()
    del runner
    close_distributed()


if __name__ == '__main__':
    main()
