# Copyright (c) mmtune contributors. All rights reserved.
"""Tune mode through mmcv's ``ConvModule``: per-call ``norm``/``activate``,
hooks on its conv, its conv replaced after turn-on, all exact against eval
mode (float64, random BN statistics, all gradients), with the fold counts
saying what happened."""

import copy

import pytest
import torch
from mmcv.cnn import ConvModule
from mmcv.cnn.bricks import Conv2dAdaptivePadding, ConvWS2d
from torch import nn

from mmtune import turn_on_fast_conv_bn_eval
from mmtune.testing import (
    compare_models,
    count_batch_norm_calls,
    randomize_model,
)


class Net(nn.Module):
    def __init__(self, **call):
        super().__init__()
        self.a = ConvModule(3, 4, 3, padding=1, norm_cfg=dict(type='BN'))
        self.b = ConvModule(4, 4, 3, padding=1, norm_cfg=dict(type='BN'))
        self.call = call

    def forward(self, x):
        return self.b(self.a(x), **self.call)


def _models(batch=False, **call):
    torch.manual_seed(0)
    ref = randomize_model(Net(**call))
    tuned = copy.deepcopy(ref)
    report = turn_on_fast_conv_bn_eval(tuned, batch=batch)
    assert len(report.converted) == 2, str(report)
    return ref, tuned, report


def _x():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 6, 6, generator=gen).double()


def _compare(ref, tuned, report):
    report.reset_counts()
    assert compare_models(ref, tuned, [_x()], rtol=1e-10) == []
    return report.fold_counts()


@pytest.mark.parametrize('batch', [False, True])
def test_folds_and_counts(batch):
    ref, tuned, report = _models(batch)
    counts = _compare(ref, tuned, report)
    assert all(c.folded == 1 and not c.computed for c in counts.values())
    with count_batch_norm_calls() as counter:
        tuned(_x())
    assert counter.calls == 0


def test_norm_false_is_not_folded():
    ref, tuned, report = _models(norm=False)
    counts = _compare(ref, tuned, report)
    assert counts[('b.conv', 'b.bn')].folded == 0
    (reason,) = counts[('b.conv', 'b.bn')].computed
    assert 'norm=False' in reason
    assert counts[('a.conv', 'a.bn')].folded == 1


@pytest.mark.parametrize('when', ['before', 'after'])
def test_pre_hook_on_the_conv_runs_and_the_pair_folds(when):
    """A forward pre-hook on ``module.conv`` (old-style weight norm works
    this way) runs, before or after turn-on, and the fold reads the weight
    it computes."""

    def scale(module, args):
        return (args[0] * 1.5,)

    if when == 'before':
        torch.manual_seed(0)
        ref, tuned = Net(), Net()
        for m in (ref, tuned):
            randomize_model(m)
            torch.nn.utils.weight_norm(m.a.conv)
            m.b.conv.register_forward_pre_hook(scale)
        report = turn_on_fast_conv_bn_eval(tuned, batch=False)
        assert len(report.converted) == 2, str(report)
    else:
        ref, tuned, report = _models()
        for m in (ref, tuned):
            m.b.conv.register_forward_pre_hook(scale)
    counts = _compare(ref, tuned, report)
    assert all(c.folded == 1 and not c.computed for c in counts.values())


@pytest.mark.parametrize('batch', [False, True])
@pytest.mark.parametrize('cls', [Conv2dAdaptivePadding, ConvWS2d])
def test_conv_replaced_after_turn_on_computes_itself(cls, batch):
    ref, tuned, report = _models(batch)
    torch.manual_seed(3)
    new = cls(4, 4, 3, padding=1).double()
    for m in (ref, tuned):
        m.b.conv = copy.deepcopy(new)
    counts = _compare(ref, tuned, report)
    assert counts[('b.conv', 'b.bn')].calls == 0  # the old conv is gone
    assert counts[('a.conv', 'a.bn')].folded == 1


def test_forward_hook_on_the_conv_stops_folding():
    ref, tuned, report = _models()
    for m in (ref, tuned):
        m.b.conv.register_forward_hook(lambda mod, i, out: out * 2)
    counts = _compare(ref, tuned, report)
    assert counts[('b.conv', 'b.bn')].computed == {
        'the conv has forward hooks': 1
    }
