# Copyright (c) mmtune contributors. All rights reserved.
"""mmtune through the tools users already run: mmdet's own installed
``tools/train.py`` with mmtune's base config, and mmengine's
``FlexibleRunner`` with a DDP strategy on gloo (in subprocesses with a
timeout)."""

import os
import os.path as osp
import re
import socket

import pytest

pytest.importorskip('mmdet')

from mmtune.testing import run_python  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO = osp.join(
    REPO, 'configs', 'demo', 'faster-rcnn_r18_fpn_80iter_demo-coco.py'
)
BASE_TUNE = osp.join(REPO, 'configs', '_base_', 'fast_conv_bn_eval.py')
SHORT = """
train_cfg = dict(max_iters=2, val_interval=1000)
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(interval=-1, save_last=False),
)
param_scheduler = []
"""


def _mmdet_train_py():
    import mmdet

    path = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'train.py')
    if not osp.isfile(path):
        pytest.skip(f'mmdet ships no {path}')
    return path


def _user_model_config(tmp_path):
    """The demo config as a user's config would be: mmdet bases and no
    custom_imports of its own (absolute base paths)."""
    text = open(DEMO).read()
    text = text.replace(
        "'../_base_/", repr(osp.join(REPO, 'configs', '_base_', ''))[:-1]
    )
    text = re.sub(r'custom_imports = .*\n', '', text)
    path = tmp_path / 'model.py'
    path.write_text(text)
    return str(path)


def _losses(log):
    found = re.findall(
        r'Iter\(train\) \[\s*(\d+)/\d+\].*? loss: ([\d.]+)', log
    )
    return [float(v) for _, v in found]


def _run(args, env):
    return run_python(args, env=env, cwd=REPO)


def test_mmdet_own_train_tool_with_the_base_config(tmp_path):
    from mmengine.config import Config

    from mmtune.datasets import prepare_demo_data

    env = dict(os.environ, MMTUNE_DEMO_DATA=str(tmp_path / 'coco'))
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    model = _user_model_config(tmp_path)
    data = {'demo_data.num_train': 8, 'demo_data.num_val': 4}
    old = os.environ.get('MMTUNE_DEMO_DATA')
    os.environ['MMTUNE_DEMO_DATA'] = env['MMTUNE_DEMO_DATA']
    try:
        cfg = Config.fromfile(model)
        cfg.merge_from_dict(data)
        prepare_demo_data(cfg)  # mmdet's tool does not generate it
    finally:
        if old is None:
            os.environ.pop('MMTUNE_DEMO_DATA')
        else:
            os.environ['MMTUNE_DEMO_DATA'] = old
    tuned = tmp_path / 'tuned.py'
    tuned.write_text(f'_base_ = [{model!r}, {BASE_TUNE!r}]\n' + SHORT)
    # keys set, but no hook: mmdet's tool trains without tune mode, and
    # mmtune says so
    plain = tmp_path / 'plain.py'
    plain.write_text(
        f'_base_ = [{model!r}]\n'
        "custom_imports = dict(imports=['mmtune'])\n"
        'fast_conv_bn_eval = True\n' + SHORT
    )
    options = ['--cfg-options', *(f'{k}={v}' for k, v in data.items())]
    train = _mmdet_train_py()
    logs = {}
    for name, cfg_path in (('tuned', tuned), ('plain', plain)):
        logs[name] = _run(
            [
                train,
                str(cfg_path),
                '--work-dir',
                str(tmp_path / name),
                *options,
            ],
            env,
        )
    assert re.search(
        r'mmtune tune mode \(fast_conv_bn_eval\): 20 Conv\+BN pairs '
        r'converted, 0 skipped',
        logs['tuned'],
    ), logs['tuned'][-3000:]
    assert (
        'mmtune tune mode: 20 of 20 converted pairs folded at every call'
        in logs['tuned']
    )
    assert 'Conv+BN pairs converted' not in logs['plain']
    assert 'list no mmtune hook that reads it' in logs['plain']
    tuned_losses, plain_losses = _losses(logs['tuned']), _losses(logs['plain'])
    assert len(tuned_losses) == len(plain_losses) == 2, logs['tuned'][-2000:]
    # the same first loss (the log prints 4 decimals); later ones close
    assert tuned_losses[0] == pytest.approx(plain_losses[0], abs=2e-4)
    assert tuned_losses[1] == pytest.approx(plain_losses[1], rel=2e-2)


FLEXIBLE = """
import sys
from mmengine.config import Config
from mmengine.runner import FlexibleRunner
sys.path.insert(0, {tests!r})
from conftest import demo_cfg, LossRecorder
import torch.distributed as dist
import gc

cfg = demo_cfg({work!r}, max_iters=2)
cfg.custom_hooks = [dict(type='mmtune.FastConvBNEvalHook')]
cfg.fast_conv_bn_eval = {enabled}
cfg.launcher = 'pytorch'
# a CPU run: the gloo group first (mmengine's init_dist would set a CUDA
# device), and DDP without device ids
dist.init_process_group('gloo')
cfg.strategy = dict(
    type='DDPStrategy',
    model_wrapper=dict(type='MMDistributedDataParallel', device_ids=None),
)
runner = FlexibleRunner.from_cfg(cfg)
recorder = LossRecorder()
runner.register_hook(recorder, priority='LOWEST')
runner.train()
print('LOSSES', recorder.losses)
model = getattr(runner.model, 'module', runner.model)
print('TUNED', 'forward' in model.backbone.conv1.__dict__)
del runner, model, recorder
gc.collect()
dist.destroy_process_group()
"""


def test_flexible_runner_with_ddp_strategy_on_gloo(tmp_path):
    tests = osp.dirname(osp.abspath(__file__))
    results = {}
    for enabled in (True, False):
        with socket.socket() as sock:
            sock.bind(('127.0.0.1', 0))
            port = sock.getsockname()[1]
        env = dict(
            os.environ,
            RANK='0',
            LOCAL_RANK='0',
            WORLD_SIZE='1',
            MASTER_ADDR='127.0.0.1',
            MASTER_PORT=str(port),
            MMTUNE_DEMO_DATA=str(tmp_path / 'coco'),
            TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD='1',
        )
        script = tmp_path / f'flexible_{enabled}.py'
        script.write_text(
            FLEXIBLE.format(
                tests=tests, work=str(tmp_path / str(enabled)), enabled=enabled
            )
        )
        out = _run([str(script)], env)
        results[enabled] = out
    on, off = results[True], results[False]
    assert 'TUNED True' in on and 'TUNED False' in off
    assert 'converted pairs folded at every call' in on
    assert 'fast_conv_bn_eval=False in the config' in off
    losses = [
        eval(re.search(r'LOSSES (\[.*\])', out).group(1)) for out in (on, off)
    ]
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)
    assert losses[0][1] == pytest.approx(losses[1][1], rel=2e-2)


def test_import_mmtune_makes_the_plain_hook_names_resolvable():
    """In a fresh process, whichever hook is built first and in whichever
    scope: ``import mmtune`` alone registers both hooks."""
    code = (
        'import sys\n'
        'import mmtune\n'
        "print('mmcv' in sys.modules, 'mmdet' in sys.modules)\n"
        'from mmengine.registry import HOOKS, DefaultScope\n'
        'from mmdet.registry import HOOKS as MMDET_HOOKS\n'
        "print(type(HOOKS.build(dict(type='FastConvBNEvalHook'))).__module__)\n"
        "with DefaultScope.overwrite_default_scope('mmdet'):\n"
        '    hook = MMDET_HOOKS.build(dict(type="PreciseBNHook"))\n'
        '    print(type(hook).__module__)\n'
    )
    out = _run(['-c', code], dict(os.environ))
    assert out.split()[-4:] == [
        'False',  # import mmtune imports neither mmcv nor mmdet
        'False',
        'mmtune.engine.hooks.fast_conv_bn_eval_hook',
        'mmtune.engine.hooks.precise_bn_hook',
    ], out
