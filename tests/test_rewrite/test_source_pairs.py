# Copyright (c) mmtune contributors. All rights reserved.
"""Frames torch.fx cannot trace: pairs proved from the forward's source
fold, exactly, and nothing that source cannot prove does."""

import copy

import pytest
import torch
from torch import nn

from mmtune import turn_on_fast_conv_bn_eval
from mmtune.rewrite.source_pairs import find_source_pairs
from mmtune.testing import compare_models, count_batch_norm_calls, randomize_bn


class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 1, bias=False)
        self.bn2_name = 'bn_two'
        self.add_module(self.bn2_name, nn.BatchNorm2d(6))

    @property
    def bn2(self):
        return getattr(self, self.bn2_name)


class Untraceable(_Base):
    """Both forms, a property BN, and ``len`` of a tensor, which fx cannot
    trace."""

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        batch, channels = len(x), x.shape[1]
        x = torch.relu(x)
        y = self.bn2(self.conv2(x))
        return y.reshape(batch, channels, -1).mean(-1)


class ConvNamedTwice(_Base):
    def forward(self, x):
        assert len(x)  # fx cannot trace len() of a tensor
        x = self.bn(self.conv(x))
        z = self.conv2(x)
        return self.bn2(self.conv2(x)) + z


class OutputKept(_Base):
    def forward(self, x):
        assert len(x)  # fx cannot trace len() of a tensor
        y = self.conv(x)
        z = self.bn(y)
        w = self.conv2(z)
        w = self.bn2(w) + w  # the second statement is not just the BN
        return z + y + w


class Looped(_Base):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([self.conv])

    def forward(self, x):
        assert len(x)  # fx cannot trace len() of a tensor
        for layer in self.layers:
            x = layer(x)
        return self.bn(self.conv(x[:, :3]))


class Dynamic(_Base):
    def forward(self, x):
        assert len(x)  # fx cannot trace len() of a tensor
        x = self.bn(self.conv(x))
        return getattr(self, 'bn_two')(self.conv2(x))  # noqa: B009


class Helper(_Base):
    def forward(self, x):
        assert len(x)  # fx cannot trace len() of a tensor
        return self._helper(x)

    def _helper(self, x):
        return self.bn2(self.conv2(self.bn(self.conv(x))))


@pytest.mark.parametrize(
    'cls, pairs',
    [
        (Untraceable, [('conv', 'bn'), ('conv2', 'bn_two')]),
        (ConvNamedTwice, [('conv', 'bn')]),
        (OutputKept, []),
        (Looped, []),
        (Helper, []),
    ],
)
def test_what_the_source_proves(cls, pairs):
    found = find_source_pairs(cls())
    assert sorted(found.pairs) == sorted(pairs)
    assert found.code is cls.forward.__code__


def test_dynamic_access_proves_nothing():
    assert find_source_pairs(Dynamic()) is None


def test_a_forward_without_source_proves_nothing():
    namespace = {}
    exec('def forward(self, x):\n    return self.bn(self.conv(x))', namespace)
    cls = type('NoSource', (_Base,), {'forward': namespace['forward']})
    assert find_source_pairs(cls()) is None


def _turned_on(cls, seed=0):
    torch.manual_seed(seed)
    ref = cls().double()
    randomize_bn(ref, seed)
    ref.eval()
    tuned = copy.deepcopy(ref)
    report = turn_on_fast_conv_bn_eval(tuned)
    return ref, tuned, report


def _x():
    return torch.randn(2, 3, 8, 8, dtype=torch.float64)


def test_an_untraceable_frame_folds_exactly_at_every_call():
    ref, tuned, report = _turned_on(Untraceable)
    assert len(report.converted) == 2, str(report)
    assert report.skipped == []
    for step in range(2):  # train/eval switches and an update between
        for model in (ref, tuned):
            model.train(step == 0)
            model.bn.eval()
            model.bn_two.eval()
        assert compare_models(ref, tuned, [_x()], rtol=1e-12) == []
        with count_batch_norm_calls() as counter:
            tuned(_x())
        assert counter.calls == 0
        with torch.no_grad():
            for model in (ref, tuned):
                model.conv.weight.mul_(1.1)
                model.bn_two.running_var.add_(0.3)
    assert report.never_folded() == []
    counts = report.fold_counts().values()
    assert all(c.folded and not c.computed for c in counts)


def test_a_pair_the_source_does_not_prove_is_skipped_with_the_reason():
    ref, tuned, report = _turned_on(ConvNamedTwice)
    assert len(report.converted) == 1  # conv -> bn
    skipped = {s.modules: s.reason for s in report.skipped}
    (reason,) = skipped.values()
    assert 'bn_two' in next(iter(skipped))[0]
    assert 'could not be traced' in reason
    assert 'its source does not prove the pair' in reason
    assert compare_models(ref, tuned, [_x()], rtol=1e-12) == []


def test_a_helper_called_from_an_untraceable_forward_does_not_fold():
    ref, tuned, report = _turned_on(Helper)
    assert report.converted == []
    assert compare_models(ref, tuned, [_x()], rtol=1e-12) == []


def test_mmdet_resnest_folds_every_pair():
    """mmdet's ResNeSt-50: its split-attention convs unpack ``x.shape[:2]``
    (39 of 71 pairs found by tracing alone)."""
    from mmdet.models.backbones import ResNeSt

    torch.manual_seed(0)
    ref = ResNeSt(depth=50, norm_eval=True, init_cfg=None).double()
    randomize_bn(ref, 0)
    ref.train()
    tuned = copy.deepcopy(ref)
    report = turn_on_fast_conv_bn_eval(tuned)
    assert len(report.converted) == 71 and report.skipped == [], str(report)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert compare_models(ref, tuned, [x], rtol=1e-10) == []
    assert report.never_folded() == []
