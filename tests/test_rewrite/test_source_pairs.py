# Copyright (c) mmtune contributors. All rights reserved.
"""Frames torch.fx cannot trace: pairs proved from the forward's source
fold, exactly, and nothing that source cannot prove does."""

import copy
import operator
import warnings

import pytest
import torch
from torch import nn

from mmtune import turn_on_fast_conv_bn_eval
from mmtune.rewrite.source_pairs import find_source_pairs
from mmtune.rewrite.tune_mode import CALLER
from mmtune.testing import (
    compare_models,
    count_batch_norm_calls,
    max_relative_error,
    randomize_bn,
)


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
    assert found.chains == {conv: (cls.forward.__code__,) for conv, _ in pairs}


def test_dynamic_access_proves_nothing():
    assert find_source_pairs(Dynamic()) is None


class Staged(_Base):
    """HRNet's stem: the stages are looked up with an f-string getattr,
    which reaches only ``stage*`` attributes (a config among them)."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6))
        self.stage2 = nn.Conv2d(6, 6, 1)
        self.stage1_cfg = {'num_blocks': (4,), 'block': 'BASIC'}

    def forward(self, x):
        assert len(x)  # fx cannot trace len() of a tensor
        x = self.conv(x)
        x = self.bn(x)
        for i in range(1, 3):
            x = getattr(self, f'stage{i}')(x)
        return self.bn2(self.conv2(x))


class StagedReachesConv(Staged):
    def forward(self, x):
        assert len(x)  # fx cannot trace len() of a tensor
        x = self.bn(self.conv(x))
        suffix = ''
        x = getattr(self, f'conv2{suffix}')(x)  # the pair below's conv2
        return self.bn2(self.conv2(x))


class StagedHoldsConv(Staged):
    def __init__(self):
        super().__init__()
        self.stage_list = [self.conv]  # a plain list holding the conv


class StagedMethod(Staged):
    def stage_helper(self, x):  # a method that getattr could return
        return self.conv(x)


class StagedOwnGetattr(Staged):
    def __getattr__(self, name):
        return super().__getattr__(name)


class StagedByName(Staged):
    def forward(self, x):
        assert len(x)  # fx cannot trace len() of a tensor
        x = self.bn(self.conv(x))
        name = 'stage1'
        return self.bn2(self.conv2(getattr(self, name)(x)))


def test_an_f_string_getattr_reaches_only_its_prefix():
    found = find_source_pairs(Staged())
    assert sorted(found.pairs) == [('conv', 'bn'), ('conv2', 'bn_two')]
    assert {'stage1', 'stage2'} <= set(found.callees)
    # the prefix reaches the pair's conv: that pair is not proved
    assert find_source_pairs(StagedReachesConv()).pairs == [('conv', 'bn')]
    for cls in (StagedHoldsConv, StagedMethod, StagedOwnGetattr, StagedByName):
        assert find_source_pairs(cls()) is None, cls


def test_a_staged_frame_folds_exactly_at_every_call():
    ref, tuned, report = _turned_on(Staged)
    assert sorted(report.converted) == [
        ('conv', 'bn'),
        ('conv2', 'bn_two'),
        ('stage1.0', 'stage1.1'),
    ]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    report.reset_counts()
    assert compare_models(ref, tuned, [x], rtol=1e-10) == []
    assert report.never_folded() == []
    assert all(c.computed == {} for c in report.fold_counts().values())
    with count_batch_norm_calls() as counter:
        tuned(x)
    assert counter.calls == 0  # every pair folded


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


# DenseNet's DenseLayer shape: the conv output reaches the BN through a
# helper method (mmpretrain's ``bottleneck_fn``)


class Dense(nn.Module):
    """mmpretrain's ``DenseLayer``: untraceable (``assert isinstance(x,
    list)``), conv1's output returned by ``bottleneck_fn`` and handed to
    norm2 right after; with ``memory_efficient`` and inputs that require
    grad, ``bottleneck_fn`` runs through ``torch.utils.checkpoint``."""

    def __init__(self, memory_efficient=False):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 8, 1, bias=False)
        self.act = nn.ReLU()
        self.norm2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 2, 3, padding=1, bias=False)
        self.memory_efficient = memory_efficient
        self.side = 0

    def bottleneck_fn(self, xs):
        concated_features = torch.cat(xs, 1)
        bottleneck_output = self.conv1(self.act(self.norm1(concated_features)))
        return bottleneck_output

    def call_checkpoint_bottleneck(self, x):
        def closure(*xs):
            return self.bottleneck_fn(xs)

        return torch.utils.checkpoint.checkpoint(
            closure, *x, use_reentrant=False
        )

    def forward(self, x):
        assert isinstance(x, list)
        if self.memory_efficient and any(t.requires_grad for t in x):
            bottleneck_output = self.call_checkpoint_bottleneck(x)
        else:
            bottleneck_output = self.bottleneck_fn(x)
        return self.conv2(self.act(self.norm2(bottleneck_output)))


class DenseNested(Dense):
    """``self.bn(self.h(...))``, and a helper that returns the conv call."""

    def bottleneck_fn(self, xs):
        return self.conv1(self.act(self.norm1(torch.cat(xs, 1))))

    def forward(self, x):
        assert isinstance(x, list)
        return self.conv2(self.act(self.norm2(self.bottleneck_fn(x))))


class _Side(Dense):
    """A forward that adds ``self.side``, which the helper sets."""

    def forward(self, x):
        assert isinstance(x, list)
        out = self.bottleneck_fn(x)
        y = self.conv2(self.act(self.norm2(out)))
        return y + self.side


class OutputAlsoUsed(Dense):
    def forward(self, x):
        assert isinstance(x, list)
        out = self.bottleneck_fn(x)
        y = self.conv2(self.act(self.norm2(out)))
        return y + out.mean()


class HelperTwice(Dense):
    def forward(self, x):
        assert isinstance(x, list)
        side = self.bottleneck_fn(x).mean()
        out = self.bottleneck_fn(x)
        y = self.conv2(self.act(self.norm2(out)))
        return y + side


class HelperThroughClass(Dense):
    def forward(self, x):
        assert isinstance(x, list)
        side = type(self).bottleneck_fn(self, x).mean()
        out = self.bottleneck_fn(x)
        y = self.conv2(self.act(self.norm2(out)))
        return y + side


class HelperThroughGlobal(Dense):
    def forward(self, x):
        assert isinstance(x, list)
        side = _BOTTLENECK(self, x).mean()
        out = self.bottleneck_fn(x)
        y = self.conv2(self.act(self.norm2(out)))
        return y + side


class OtherReturn(Dense):
    def bottleneck_fn(self, xs):
        out = self.conv1(self.act(self.norm1(torch.cat(xs, 1))))
        if not self.memory_efficient:
            return out * 2
        return out


class ConvNamedInHelper(_Side):
    def bottleneck_fn(self, xs):
        concated_features = torch.cat(xs, 1)
        self.side = self.conv1(concated_features).mean()
        out = self.conv1(self.act(self.norm1(concated_features)))
        return out


class ConvNamedInForward(Dense):
    def forward(self, x):
        assert isinstance(x, list)
        side = self.conv1(torch.cat(x, 1)).mean()
        out = self.bottleneck_fn(x)
        y = self.conv2(self.act(self.norm2(out)))
        return y + side


class BNNamedInHelper(_Side):
    def bottleneck_fn(self, xs):
        concated_features = torch.cat(xs, 1)
        self.side = self.norm2.running_mean.mean()
        out = self.conv1(self.act(self.norm1(concated_features)))
        return out


class CallInBetween(Dense):
    """Another call between the helper and the BN: it could reach the conv
    (here through ``bottleneck_fn``) while tune mode holds its output."""

    def other(self, x):
        return self.bottleneck_fn(x).mean()

    def forward(self, x):
        assert isinstance(x, list)
        out = self.bottleneck_fn(x)
        side = self.other(x)
        y = self.conv2(self.act(self.norm2(out)))
        return y + side


class CallBeforeBN(CallInBetween):
    def forward(self, x):
        assert isinstance(x, list)
        out = self.bottleneck_fn(x)
        return self.conv2(self.act(self.other(x) + self.norm2(out)))


class PropertyBeforeBN(CallInBetween):
    """A property looked up between the helper and the BN runs code."""

    last_x = None

    @property
    def activation(self):
        if self.last_x is not None:
            self.side = self.other(self.last_x)
        return self.act

    def forward(self, x):
        assert isinstance(x, list)
        self.last_x = x
        out = self.bottleneck_fn(x)
        y = self.conv2(self.activation(self.norm2(out)))
        return y + self.side


class BNInLoop(Dense):
    """The BN would get the same helper output twice."""

    def forward(self, x):
        assert isinstance(x, list)
        total = 0
        for step in range(2):
            if step == 0:
                out = self.bottleneck_fn(x)
            y = self.conv2(self.act(self.norm2(out)))
            total = total + y
        return total


class StaticHelper(Dense):
    @staticmethod
    def bottleneck_fn(layer, xs):
        return layer.conv1(layer.act(layer.norm1(torch.cat(xs, 1))))

    def forward(self, x):
        assert isinstance(x, list)
        out = self.bottleneck_fn(self, x)
        return self.conv2(self.act(self.norm2(out)))


class PropertyHelper(Dense):
    @property
    def bottleneck_fn(self):
        return lambda xs: self.conv1(self.act(self.norm1(torch.cat(xs, 1))))


def _same(fn):
    return fn


class DecoratedHelper(Dense):
    @_same
    def bottleneck_fn(self, xs):
        return self.conv1(self.act(self.norm1(torch.cat(xs, 1))))


class DynamicHelper(_Side):
    target = 'conv1'

    def bottleneck_fn(self, xs):
        concated_features = torch.cat(xs, 1)
        self.side = self.get_submodule(self.target)(concated_features).mean()
        out = self.conv1(self.act(self.norm1(concated_features)))
        return out


class StringNamedConv(_Side):
    """A string that names the conv: ``attrgetter`` under another name."""

    def bottleneck_fn(self, xs):
        concated_features = torch.cat(xs, 1)
        self.side = grab('conv1')(self)(concated_features).mean()
        out = self.conv1(self.act(self.norm1(concated_features)))
        return out


grab = operator.attrgetter
_BOTTLENECK = Dense.bottleneck_fn
DENSE_CHAIN = (Dense.bottleneck_fn.__code__, Dense.forward.__code__)
NOT_PAIRS = [
    OutputAlsoUsed,
    HelperTwice,
    HelperThroughClass,
    HelperThroughGlobal,
    OtherReturn,
    ConvNamedInHelper,
    ConvNamedInForward,
    BNNamedInHelper,
    CallInBetween,
    CallBeforeBN,
    PropertyBeforeBN,
    BNInLoop,
    StaticHelper,
    PropertyHelper,
    DecoratedHelper,
    DynamicHelper,
    StringNamedConv,
]


class Wrapped(nn.Module):
    """A traceable parent that calls the layer with a list."""

    def __init__(self, cls, **kwargs):
        super().__init__()
        self.layer = cls(**kwargs)

    def forward(self, x):
        return self.layer([x[:, :3], x[:, 3:]])


@pytest.mark.parametrize('cls', [Dense, DenseNested])
def test_a_helper_that_returns_the_conv_output_proves_the_pair(cls):
    found = find_source_pairs(cls())
    assert found.pairs == [('conv1', 'norm2')]
    chain = (cls.bottleneck_fn.__code__, cls.forward.__code__)
    assert found.chains == {'conv1': chain}
    assert {'conv1', 'norm1', 'norm2'} <= set(found.callees)
    if cls is Dense:
        assert chain == DENSE_CHAIN


@pytest.mark.parametrize('cls', NOT_PAIRS, ids=lambda c: c.__name__)
def test_what_a_helper_does_not_prove(cls):
    found = find_source_pairs(cls())
    assert found is None or found.pairs == []


def _dense_turned_on(cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    ref = Wrapped(cls, **kwargs).double()
    randomize_bn(ref, seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref.eval()
    tuned = copy.deepcopy(ref)
    report = turn_on_fast_conv_bn_eval(tuned)
    return ref, tuned, report


def _dense_x():
    return torch.randn(2, 4, 6, 6, dtype=torch.float64)


def _norm_eval(*models):
    """``train()``, then every BN back to eval mode (``norm_eval``)."""
    for model in models:
        model.train()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()


def _check_steps(ref, tuned, report, batch_norms):
    """Outputs and all gradients against eval mode in train/eval switches
    with frozen BNs, an update between; ``F.batch_norm`` calls per forward
    of the tuned model."""
    for step in range(3):
        if step == 1:
            _norm_eval(ref, tuned)
        else:
            ref.eval()
            tuned.eval()
        assert compare_models(ref, tuned, [_dense_x()], rtol=1e-12) == []
        with torch.no_grad(), count_batch_norm_calls() as counter:
            tuned(_dense_x())
        assert counter.calls == batch_norms
        with torch.no_grad():
            for model in (ref, tuned):
                model.layer.conv1.weight.mul_(1.1)
                model.layer.norm2.running_var.add_(0.3)
                model.layer.norm2.bias.sub_(0.2)


@pytest.mark.parametrize('cls', [Dense, DenseNested])
def test_a_dense_layer_folds_exactly_at_every_call(cls):
    ref, tuned, report = _dense_turned_on(cls)
    pair = ('layer.conv1', 'layer.norm2')
    assert report.converted == [pair], str(report)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no divergence warning
        _check_steps(ref, tuned, report, batch_norms=1)  # norm1 only
    count = report.fold_counts()[pair]
    assert count.folded == 3 * 2 and not count.computed
    assert report.runtime_summary().startswith(
        'mmtune tune mode: 1 of 1 converted pairs folded at every call'
    )


def test_the_checkpoint_branch_computes_as_eval_mode_and_is_counted():
    """``bottleneck_fn`` through a closure and ``torch.utils.checkpoint``:
    not the chain the source proved, so conv1 and norm2 compute as eval
    mode (and again when checkpoint recomputes in backward)."""
    ref, tuned, report = _dense_turned_on(Dense, memory_efficient=True)
    pair = ('layer.conv1', 'layer.norm2')
    assert report.converted == [pair], str(report)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for step in range(2):
            if step:
                _norm_eval(ref, tuned)
            assert compare_models(ref, tuned, [_dense_x()], rtol=1e-12) == []
    count = report.fold_counts()[pair]
    assert count.folded == 0
    assert set(count.computed) == {CALLER}
    assert count.computed[CALLER] == 2 * 2  # forward, recomputed forward
    assert report.never_folded() == [pair]
    # without inputs that require grad, the plain branch folds
    x = _dense_x()
    with torch.no_grad(), count_batch_norm_calls() as counter:
        out = tuned(x)
    assert counter.calls == 1
    assert report.fold_counts()[pair].folded == 1
    with torch.no_grad():
        assert max_relative_error(out, ref(x)) <= 1e-12


@pytest.mark.parametrize('cls', NOT_PAIRS, ids=lambda c: c.__name__)
def test_what_a_helper_does_not_prove_stays_exact(cls):
    ref, tuned, report = _dense_turned_on(cls)
    assert ('layer.conv1', 'layer.norm2') not in report.converted
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for step in range(2):
            if step:
                _norm_eval(ref, tuned)
            assert compare_models(ref, tuned, [_dense_x()], rtol=1e-12) == []
