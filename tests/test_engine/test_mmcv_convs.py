# Copyright (c) mmtune contributors. All rights reserved.
"""mmcv's conv classes fold exactly (adaptive padding, weight
standardisation, the ``deconv`` and other wrappers), alone and inside a
``ConvModule``; a user's own conv class is declared foldable; deploy mode
skips what it cannot store."""

import copy

import pytest
import torch
from mmcv.cnn import ConvModule
from mmcv.cnn.bricks import (
    Conv2dAdaptivePadding,
    ConvAWS2d,
    ConvWS2d,
    wrappers,
)
from torch import nn

from mmtune import fuse_conv_bn, turn_on_fast_conv_bn_eval
from mmtune.rewrite import register_foldable_conv
from mmtune.testing import (
    compare_models,
    count_batch_norm_calls,
    randomize_model,
)

CONVS = {
    'adaptive_padding': lambda: Conv2dAdaptivePadding(3, 4, 3, stride=2),
    'ws': lambda: ConvWS2d(3, 4, 3, padding=1),
    'aws': lambda: ConvAWS2d(3, 4, 3, padding=1),
    'wrapper_conv2d': lambda: wrappers.Conv2d(3, 4, 3, padding=1),
    'deconv': lambda: wrappers.ConvTranspose2d(3, 4, 3, stride=2),
}


class Pair(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.tanh(self.bn(self.conv(x)))


def _prepare(model):
    torch.manual_seed(0)
    for name, buf in model.named_buffers():
        if name.endswith(('weight_gamma', 'weight_beta')):
            with torch.no_grad():
                buf.uniform_(0.5, 1.5)
    return randomize_model(model)


def _x():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 7, 9, generator=gen).double()


def _check(model, batch, expect=1):
    ref = copy.deepcopy(model)
    report = turn_on_fast_conv_bn_eval(model, batch=batch)
    assert len(report.converted) == expect, str(report)
    assert compare_models(ref, model, [_x()], rtol=1e-10) == []
    counts = report.fold_counts().values()
    assert all(c.folded and not c.computed for c in counts)
    with count_batch_norm_calls() as counter:
        model(_x())
    assert counter.calls == 0
    return report


@pytest.mark.parametrize('batch', [False, True])
@pytest.mark.parametrize('name', list(CONVS))
def test_mmcv_convs_fold_exactly(name, batch):
    _check(_prepare(Pair(CONVS[name]())), batch)


@pytest.mark.parametrize('conv_type', ['ConvWS', 'ConvAWS', 'Conv2d'])
def test_in_a_conv_module(conv_type):
    model = nn.Sequential(
        ConvModule(
            3,
            4,
            3,
            padding=1,
            conv_cfg=dict(type=conv_type),
            norm_cfg=dict(type='BN'),
        ),
        ConvModule(
            4,
            4,
            3,
            padding=1,
            conv_cfg=dict(type=conv_type),
            norm_cfg=dict(type='BN'),
        ),
    )
    _check(_prepare(model), batch=False, expect=2)


def test_a_user_conv_declared_foldable():
    class Scaled(nn.Conv2d):
        """Convolves with twice its weight."""

        def forward(self, x):
            return self._conv_forward(x, self.weight * 2, self.bias)

    model = _prepare(Pair(Scaled(3, 4, 3)))
    report = turn_on_fast_conv_bn_eval(copy.deepcopy(model))
    assert not report.converted
    assert 'register_foldable_conv' in report.skipped[0].reason
    register_foldable_conv(Scaled, weight=lambda conv: conv.weight * 2)
    _check(model, batch=False)
    with pytest.raises(TypeError, match='got <class'):
        register_foldable_conv(nn.Linear)


def test_deploy_folds_padding_and_skips_a_computed_weight():
    for name, folded in (('adaptive_padding', True), ('ws', False)):
        model = _prepare(Pair(CONVS[name]()))
        with torch.no_grad():
            expected = model(_x())
            report = fuse_conv_bn(model)
            assert bool(report.converted) == folded, str(report)
            torch.testing.assert_close(model(_x()), expected)
        if not folded:
            assert 'computes its weight in its forward' in str(report)
