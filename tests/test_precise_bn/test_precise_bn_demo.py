# Copyright (c) mmtune contributors. All rights reserved.
"""Precise BN on the demo detector: in a Runner, and through
``tools/train.py`` with the ``precise_bn`` config key.

The demo RetinaNet keeps its backbone BNs frozen (``norm_eval=True``); the
tests give its FPN BatchNorms, which train. Images are halved and training
lasts one or two iterations to keep the tests short on a CPU.
"""

import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmdet')

from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import mmtune.engine.hooks.precise_bn_hook as hook_module  # noqa: E402
from mmtune.datasets import (  # noqa: E402
    DEMO_DATA_ENV,
    default_demo_root,
    prepare_demo_data,
)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(
    REPO, 'configs', 'demo', 'faster-rcnn_r18_fpn_80iter_demo-coco.py'
)
# Smaller images, and BN in the FPN (ConvModule norm layers, which train).
OPTIONS = {
    'model.neck.norm_cfg': {'type': 'BN'},
    'train_dataloader.dataset.pipeline.2.scale': (160, 120),
}


@pytest.fixture
def demo_env(monkeypatch):
    monkeypatch.setenv(DEMO_DATA_ENV, default_demo_root())


def _bn_buffers(model, prefix):
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.startswith(prefix) and 'running_' in k
    }


def test_demo_detector_in_runner(demo_env, tmp_path, monkeypatch):
    """Two iterations, precise BN after each from one batch of the aspect
    ratio batch sampler (no ``batch_size``); the checkpoint of the last
    iteration carries the statistics of the last update; the frozen
    backbone BNs are untouched."""
    cfg = Config.fromfile(CONFIG)
    cfg.merge_from_dict({**OPTIONS, 'train_cfg.max_iters': 2})
    cfg.custom_hooks = [
        {'type': 'mmtune.PreciseBNHook', 'num_samples': 1, 'interval': 1}
    ]
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.work_dir = str(tmp_path)
    cfg.log_level = 'WARNING'
    prepare_demo_data(cfg)
    runner = Runner.from_cfg(cfg)
    backbone_before = _bn_buffers(runner.model, 'backbone.')

    updates = []
    real = hook_module.update_bn_stats

    def spy(model, *args, **kwargs):
        summary = real(model, *args, **kwargs)
        updates.append((summary, _bn_buffers(model, 'neck.')))
        return summary

    monkeypatch.setattr(hook_module, 'update_bn_stats', spy)
    model = runner.train()

    neck_bns = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d) and n.startswith('neck.')
    ]
    assert len(neck_bns) == 8 and len(updates) == 2
    for summary, _ in updates:
        assert summary['num_layers'] == len(neck_bns)
        assert (summary['num_iters'], summary['num_samples']) == (1, 2)
        assert summary['not_updated'] == []
    ckpt = torch.load(
        osp.join(str(tmp_path), 'iter_2.pth'),
        map_location='cpu',
        weights_only=False,
    )['state_dict']
    for k, v in updates[-1][1].items():
        assert torch.equal(ckpt[k], v), k
    assert any(
        not torch.equal(updates[0][1][k], updates[1][1][k])
        for k in updates[0][1]
    )
    for k, v in _bn_buffers(model, 'backbone.').items():
        assert torch.equal(v, backbone_before[k]), k


def test_train_tool_with_config_key(demo_env, tmp_path):
    """``precise_bn`` set from the command line becomes the hook (8 FPN
    BNs, one batch of 2 images)."""
    env = dict(os.environ, OMP_NUM_THREADS='2')
    env['PYTHONPATH'] = os.pathsep.join(
        [REPO] + [p for p in [env.get('PYTHONPATH')] if p]
    )
    cmd = [
        sys.executable,
        osp.join(REPO, 'tools', 'train.py'),
        CONFIG,
        '--work-dir',
        str(tmp_path),
        '--cfg-options',
        'train_cfg.max_iters=1',
        'val_cfg=None',
        'val_dataloader=None',
        'val_evaluator=None',
        'model.neck.norm_cfg.type=BN',
        'train_dataloader.dataset.pipeline.2.scale=(160,120)',
        'precise_bn.num_samples=2',
        'precise_bn.interval=1',
    ]
    result = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert (
        'precise BN: recomputed the statistics of 8 BatchNorm layers '
        'from 2 samples (1 iteration on 1 process)'
    ) in out
    assert osp.isfile(osp.join(str(tmp_path), 'iter_1.pth'))
