# Copyright (c) mmtune contributors. All rights reserved.
"""Real mmengine Runners on the demo detector (RetinaNet R18-FPN, synthetic
COCO data), small enough for a CPU."""

import itertools
import os
import os.path as osp

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO_CONFIG = osp.join(
    REPO, 'configs', 'demo', 'faster-rcnn_r18_fpn_80iter_demo-coco.py'
)
_names = itertools.count()


def demo_cfg(work_dir, max_iters=4, **options):
    """The demo config for a short run: no validation, no checkpoints
    unless asked, deterministic data order and augmentation."""
    from mmengine.config import Config

    from mmtune.datasets import prepare_demo_data

    cfg = Config.fromfile(DEMO_CONFIG)
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f'test_{os.getpid()}_{next(_names)}'
    cfg.train_cfg.max_iters = max_iters
    cfg.train_cfg.val_interval = 10**6
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint = dict(
        type='CheckpointHook', by_epoch=False, interval=-1
    )
    cfg.param_scheduler = []
    for step in cfg.train_dataloader.dataset.pipeline:
        if step['type'] == 'RandomFlip':
            step['prob'] = 0.0
    cfg.val_dataloader.dataset.indices = 2
    cfg.test_dataloader.dataset.indices = 2
    cfg.merge_from_dict(options)
    prepare_demo_data(cfg)
    return cfg


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    # the demo config's data_root is relative to the repository root
    monkeypatch.chdir(REPO)
    # as the tools do: torch >= 2.6 refuses mmengine checkpoints by default
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')


def _hook_base():
    from mmengine.hooks import Hook

    return Hook


class LossRecorder(_hook_base()):
    """A hook that keeps every training loss."""

    priority = 'LOWEST'

    def __init__(self):
        self.losses = []

    def after_train_iter(
        self, runner, batch_idx, data_batch=None, outputs=None
    ):
        self.losses.append(float(outputs['loss']))


class ReseedPerIter(_hook_base()):
    """Seed torch by the iteration number, so that random proposal sampling
    is the same whether a run was resumed or not (mmengine checkpoints do
    not carry the RNG state)."""

    priority = 'HIGHEST'

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        import torch

        torch.manual_seed(1000 + runner.iter)


def run_training(cfg, recorder=None):
    """Build a Runner from ``cfg`` (through mmtune's config keys), train,
    and return ``(runner, losses)``."""
    from mmengine.runner import Runner

    from mmtune.engine import apply_mmtune_cfg

    apply_mmtune_cfg(cfg)
    runner = Runner.from_cfg(cfg)
    recorder = recorder or LossRecorder()
    runner.register_hook(recorder, priority='LOWEST')
    runner.register_hook(ReseedPerIter(), priority='HIGHEST')
    runner.train()
    return runner, recorder.losses
