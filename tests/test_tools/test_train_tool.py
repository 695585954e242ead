# Copyright (c) mmtune contributors. All rights reserved.
"""End-to-end runs of tools/train.py and tools/test.py on the demo config.

Real subprocesses on a tiny demo dataset (8 training, 4 validation images)
and a 4-iteration schedule: they check the plumbing (config, demo data,
checkpoint, evaluation, BN folding), not the accuracy.
"""

import os
import os.path as osp
import pickle
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

pytest.importorskip('mmdet')

import mmtune  # noqa: E402
from mmtune.testing import run_python  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(
    REPO, 'configs', 'demo', 'faster-rcnn_r18_fpn_80iter_demo-coco.py'
)
NUM_VAL = 4
SMALL = [
    'demo_data.num_train=8',
    f'demo_data.num_val={NUM_VAL}',
    # Let the barely trained model's boxes through, so that COCO has
    # results to evaluate.
    'model.test_cfg.rcnn.score_thr=0.0',
]


def _run(args, env, timeout=300):
    """Run a tool, fail with its output if it fails, return its output."""
    return run_python(args, env=env, cwd=REPO, timeout=timeout)


def _bbox_map(log):
    """The last COCO bbox mAP in a log."""
    found = re.findall(r'coco/bbox_mAP: (-?[\d.]+)', log)
    assert found, log[-3000:]
    return float(found[-1])


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    env = dict(os.environ)
    env['MMTUNE_DEMO_DATA'] = str(tmp_path_factory.mktemp('data') / 'coco')
    return env


@pytest.fixture(scope='module')
def trained(tmp_path_factory, env):
    """Train 4 iterations, validating at the end; return the work dir."""
    work_dir = str(tmp_path_factory.mktemp('train'))
    _run(
        [
            'tools/train.py',
            CONFIG,
            '--work-dir',
            work_dir,
            '--cfg-options',
            'train_cfg.max_iters=4',
            'train_cfg.val_interval=4',
            *SMALL,
        ],
        env,
    )
    return work_dir


def test_train(trained, env):
    assert osp.isfile(osp.join(trained, 'iter_4.pth'))
    with open(osp.join(trained, 'last_checkpoint')) as f:
        assert f.read().strip() == osp.join(trained, 'iter_4.pth')
    logs = [
        osp.join(dirpath, name)
        for dirpath, _, names in os.walk(trained)
        for name in names
        if name.endswith('.log')
    ]
    assert len(logs) == 1
    with open(logs[0]) as f:
        log = f.read()
    assert 0 <= _bbox_map(log) <= 1
    # The config asked for the demo data: train.py generated it.
    assert osp.isfile(
        osp.join(env['MMTUNE_DEMO_DATA'], 'annotations', 'instances_val.json')
    )


def test_resume(trained, env, tmp_path):
    """``--resume`` with no path resumes from the work dir's latest."""
    work_dir = str(tmp_path / 'work')
    shutil.copytree(trained, work_dir)
    log = _run(
        [
            'tools/train.py',
            CONFIG,
            '--work-dir',
            work_dir,
            '--resume',
            '--cfg-options',
            'train_cfg.max_iters=6',
            'train_cfg.val_interval=6',
            *SMALL,
        ],
        env,
    )
    assert 'resumed epoch: 0, iter: 4' in log
    assert 'Saving checkpoint at 6 iterations' in log
    assert osp.isfile(osp.join(work_dir, 'iter_6.pth'))


@pytest.fixture(scope='module')
def tested(trained, env, tmp_path_factory):
    """Test the checkpoint, dumping the predictions; return log and dump."""
    work_dir = tmp_path_factory.mktemp('test')
    out = str(work_dir / 'results.pkl')
    log = _run(
        [
            'tools/test.py',
            CONFIG,
            osp.join(trained, 'iter_4.pth'),
            '--work-dir',
            str(work_dir),
            '--out',
            out,
            '--cfg-options',
            *SMALL,
        ],
        env,
    )
    return log, out


def _top_scores(dump, k=5):
    with open(dump, 'rb') as f:
        results = pickle.load(f)
    return [
        r['pred_instances']['scores'].sort(descending=True)[0][:k]
        for r in sorted(results, key=lambda r: r['img_id'])
    ]


def test_test(tested):
    log, out = tested
    assert 0 <= _bbox_map(log) <= 1
    with open(out, 'rb') as f:
        results = pickle.load(f)
    assert len(results) == NUM_VAL
    assert len(results[0]['pred_instances']['bboxes']) > 0


def test_test_fuse_conv_bn(trained, tested, env, tmp_path):
    """``--fuse-conv-bn`` folds BN after the weights are in place.

    The config adds an EMAHook, which swaps its weights in before the test
    epoch and back after it: the fold must come after the first swap and
    the run must survive the second. The checkpoint has no EMA weights, so
    the EMA model starts as a copy of the checkpoint's: the predictions
    must be those of the plain test.
    """
    try:
        mmtune.fuse_conv_bn(
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        )
    except NotImplementedError:
        pytest.skip('mmtune.fuse_conv_bn is not implemented yet')
    config = tmp_path / 'with_ema.py'
    config.write_text(
        f"_base_ = [{CONFIG!r}]\ncustom_hooks = [dict(type='EMAHook')]\n"
    )
    out = str(tmp_path / 'results.pkl')
    log = _run(
        [
            'tools/test.py',
            str(config),
            osp.join(trained, 'iter_4.pth'),
            '--work-dir',
            str(tmp_path),
            '--out',
            out,
            '--fuse-conv-bn',
            '--cfg-options',
            *SMALL,
        ],
        env,
    )
    assert '--fuse-conv-bn:' in log
    # The same predictions up to rounding.
    plain_log, plain_out = tested
    for fused, plain in zip(_top_scores(out), _top_scores(plain_out)):
        torch.testing.assert_close(fused, plain, atol=1e-3, rtol=0)
    assert _bbox_map(log) == pytest.approx(_bbox_map(plain_log), abs=0.01)


def test_dist_train_on_cpu(env, tmp_path):
    """tools/dist_train.sh runs 2 processes with gloo when there is no
    CUDA (with CUDA it is mmdet's usual multi-GPU run), with tune mode on."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    env = dict(env, PYTHON=sys.executable, PORT=str(port))
    proc = subprocess.run(
        [
            'bash',
            'tools/dist_train.sh',
            CONFIG,
            '2',
            '--work-dir',
            str(tmp_path),
            '--cfg-options',
            'train_cfg.max_iters=2',
            'train_cfg.val_interval=2',
            'fast_conv_bn_eval=True',
            *SMALL,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert 'Distributed training: True' in proc.stdout
    # tune mode on, under DDP, on both ranks' model (logged by rank 0)
    assert '20 Conv+BN pairs converted, 0 skipped' in proc.stdout
    # 4 validation images, 2 per batch, split between 2 processes.
    assert 'Iter(val) [1/1]' in proc.stdout
    assert osp.isfile(osp.join(tmp_path, 'iter_2.pth'))
    _bbox_map(proc.stdout)
