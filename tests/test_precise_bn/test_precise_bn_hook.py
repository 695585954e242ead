# Copyright (c) mmtune contributors. All rights reserved.
"""``PreciseBNHook`` in real Runners and the ``precise_bn`` config key."""

import os.path as osp
import uuid

import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.runner import Runner, get_priority
from torch import nn
from torch.utils.data import Dataset

import mmtune.engine.hooks.precise_bn_hook as hook_module
from mmtune.engine.hooks import PreciseBNHook, precise_bn_hook_cfg

NUM_DATA = 16
BATCH_SIZE = 4


class _ToyDataset(Dataset):
    """Images with channel means far from 0 and a regression target."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        shift = torch.tensor([3.0, -2.0, 8.0]).view(1, 3, 1, 1)
        self.images = torch.randn(NUM_DATA, 3, 4, 4, generator=gen) + shift
        self.targets = torch.randn(NUM_DATA, 1, generator=gen)

    def __len__(self):
        return NUM_DATA

    def __getitem__(self, i):
        return {'inputs': self.images[i], 'data_samples': self.targets[i]}


class _ToyModel(BaseModel):
    """conv -> BN (trains) -> frozen BN (``norm_eval`` style) -> head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.frozen_bn = nn.BatchNorm2d(4)
        self.frozen_bn.running_mean.fill_(0.25)
        self.frozen_bn.running_var.fill_(4.0)
        self.head = nn.Linear(4, 1)

    def train(self, mode=True):
        super().train(mode)
        self.frozen_bn.eval()
        return self

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.head(
            self.frozen_bn(self.bn(self.conv(inputs))).mean((2, 3))
        )
        if mode == 'loss':
            return {'loss': ((out - data_samples) ** 2).mean()}
        return out


def _expected(state_dict, num_used):
    """Pooled statistics of the BN input (conv output) over the first
    ``num_used`` samples, with the weights of ``state_dict``."""
    model = _ToyModel()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        feats = model.conv(_ToyDataset().images[:num_used])
    flat = feats.double().transpose(0, 1).reshape(4, -1)
    return flat.mean(1), flat.var(1, unbiased=True)


def _check(state_dict, num_used):
    mean, var = _expected(state_dict, num_used)
    torch.testing.assert_close(
        state_dict['bn.running_mean'].double(), mean, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        state_dict['bn.running_var'].double(), var, rtol=1e-5, atol=1e-6
    )
    assert torch.all(state_dict['frozen_bn.running_mean'] == 0.25)
    assert torch.all(state_dict['frozen_bn.running_var'] == 4.0)


def _runner(
    tmp_path, train_cfg, checkpoint, num_samples, interval, extra_hooks=()
):
    return Runner(
        model=_ToyModel(),
        work_dir=str(tmp_path),
        experiment_name=f'precise_bn_{uuid.uuid4().hex}',
        train_dataloader={
            'dataset': _ToyDataset(),
            'sampler': {'type': 'DefaultSampler', 'shuffle': False},
            'batch_size': BATCH_SIZE,
            'collate_fn': {'type': 'default_collate'},
            'num_workers': 0,
        },
        optim_wrapper={'optimizer': {'type': 'SGD', 'lr': 0.05}},
        train_cfg=train_cfg,
        default_hooks={'checkpoint': checkpoint, 'logger': None},
        custom_hooks=[
            precise_bn_hook_cfg(
                {'num_samples': num_samples, 'interval': interval}
            ),
            *extra_hooks,
        ],
        log_level='WARNING',
        randomness={'seed': 0},
    )


def _spy(monkeypatch, runner):
    """Record (epoch, iter) of every update, still running the real one."""
    calls = []
    real = hook_module.update_bn_stats

    def spy(*args, **kwargs):
        calls.append((runner.epoch, runner.iter))
        return real(*args, **kwargs)

    monkeypatch.setattr(hook_module, 'update_bn_stats', spy)
    return calls


def _load(path):
    # A checkpoint this test just wrote (it holds mmengine objects).
    return torch.load(path, map_location='cpu', weights_only=False)[
        'state_dict'
    ]


def test_epoch_based_runner(tmp_path, monkeypatch):
    """Every 2 epochs and at the last; every saved checkpoint carries the
    statistics of its own weights (6 samples -> 2 batches of 4)."""
    runner = _runner(
        tmp_path,
        {'by_epoch': True, 'max_epochs': 3},
        {'type': 'CheckpointHook', 'interval': 2},
        num_samples=6,
        interval=2,
    )
    calls = _spy(monkeypatch, runner)
    model = runner.train()
    per_epoch = NUM_DATA // BATCH_SIZE
    assert calls == [(1, 2 * per_epoch), (2, 3 * per_epoch)]
    _check(model.state_dict(), 8)
    for epoch in (2, 3):
        _check(_load(osp.join(str(tmp_path), f'epoch_{epoch}.pth')), 8)


def test_iter_based_runner(tmp_path, monkeypatch):
    """Every 2 iterations and at the last one, before the checkpoint of the
    same iteration; 1 sample -> one batch."""
    runner = _runner(
        tmp_path,
        {'by_epoch': False, 'max_iters': 5},
        {'type': 'CheckpointHook', 'interval': 2, 'by_epoch': False},
        num_samples=1,
        interval=2,
    )
    calls = _spy(monkeypatch, runner)
    model = runner.train()
    assert [it for _, it in calls] == [1, 3, 4]
    _check(model.state_dict(), 4)
    for it in (2, 4, 5):
        _check(_load(osp.join(str(tmp_path), f'iter_{it}.pth')), 4)


class _StopAfterFirstEpoch(Hook):
    priority = 'LOWEST'

    def after_train_epoch(self, runner):
        runner.train_loop.stop_training = True


def test_training_stopped_early(tmp_path, monkeypatch):
    """Training stops before any interval: the update runs once, at the end
    of training, and leaves the model's modes as they were."""
    MMENGINE_HOOKS.register_module(module=_StopAfterFirstEpoch, force=True)
    runner = _runner(
        tmp_path,
        {'by_epoch': True, 'max_epochs': 4},
        {'type': 'CheckpointHook', 'interval': 10},
        num_samples=100,
        interval=3,
        extra_hooks=[{'type': '_StopAfterFirstEpoch'}],
    )
    calls = _spy(monkeypatch, runner)
    model = runner.train()
    assert len(calls) == 1
    _check(model.state_dict(), NUM_DATA)
    assert model.training and not model.frozen_bn.training

    # From eval mode (as after validation): the training BNs are put back in
    # training mode for the update, and the modes restored afterwards.
    (hook,) = [h for h in runner.hooks if isinstance(h, PreciseBNHook)]
    hook._updated_at = None
    model.eval()
    model.bn.running_mean.fill_(0)
    hook.after_train(runner)
    assert len(calls) == 2
    _check(model.state_dict(), NUM_DATA)
    assert not any(m.training for m in model.modules())


def test_build_and_priority():
    for cfg in [{'type': 'mmtune.PreciseBNHook'}, {'type': 'PreciseBNHook'}]:
        hook = MMENGINE_HOOKS.build(cfg)
        assert isinstance(hook, PreciseBNHook)
        assert (hook.num_samples, hook.interval) == (8192, 1)
    # Before EMAHook copies buffers and CheckpointHook saves.
    assert get_priority(PreciseBNHook.priority) < get_priority('NORMAL')
    assert get_priority(PreciseBNHook.priority) < get_priority('VERY_LOW')


@pytest.mark.parametrize(
    'kwargs,error,match',
    [
        ({'num_samples': 0}, ValueError, 'num_samples.*0'),
        ({'num_samples': -8}, ValueError, 'num_samples.*-8'),
        ({'num_samples': 10.0}, TypeError, 'num_samples.*10.0'),
        ({'interval': 0}, ValueError, 'interval.*0'),
        ({'interval': True}, TypeError, 'interval.*True'),
        ({'interval': '2'}, TypeError, "interval.*'2'"),
    ],
)
def test_bad_arguments_fail_at_build_time(kwargs, error, match):
    with pytest.raises(error, match=match):
        PreciseBNHook(**kwargs)
    with pytest.raises(error, match=match):
        MMENGINE_HOOKS.build({'type': 'mmtune.PreciseBNHook', **kwargs})
    with pytest.raises(error, match=match):
        precise_bn_hook_cfg(kwargs)


def test_config_key():
    default = {
        'type': 'mmtune.PreciseBNHook',
        'num_samples': 8192,
        'interval': 1,
    }
    assert precise_bn_hook_cfg(True) == default
    assert precise_bn_hook_cfg({}) == default
    assert precise_bn_hook_cfg(None) is None
    assert precise_bn_hook_cfg(False) is None
    assert precise_bn_hook_cfg(ConfigDict(num_samples=64)) == {
        **default,
        'num_samples': 64,
    }
    assert precise_bn_hook_cfg({'interval': 3, 'num_samples': 5}) == {
        **default,
        'num_samples': 5,
        'interval': 3,
    }
    with pytest.raises(ValueError, match="unknown keys \\['samples'\\]"):
        precise_bn_hook_cfg({'samples': 64})
    for bad in [1, 'yes', [64]]:
        with pytest.raises(TypeError, match='`precise_bn` must be a dict'):
            precise_bn_hook_cfg(bad)
