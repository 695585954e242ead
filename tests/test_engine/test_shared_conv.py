# Copyright (c) mmtune contributors. All rights reserved.
"""A conv shared by the ``ConvModule`` of every level of a head, each level
with its own BN (mmdet's ``RetinaSepBNHead``, RTMDet's ``share_conv``):
each level folds its own BN into the shared conv, exactly as eval mode
computes (float64, random BN statistics, all gradients), with fold counts
per pair."""

import copy
import pickle

import pytest
import torch
from mmcv.cnn import ConvModule
from torch import nn

from mmtune import turn_off_fast_conv_bn_eval, turn_on_fast_conv_bn_eval
from mmtune.rewrite.tune_mode import SharedConv, conv_runtimes, tune_pairs
from mmtune.testing import (
    compare_models,
    count_batch_norm_calls,
    find_conv_bn_pairs_at_runtime,
    randomize_bn,
    randomize_model,
)

mmdet = pytest.importorskip('mmdet')
from mmdet.models.dense_heads import RetinaSepBNHead  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

register_all_modules()

LEVELS = (8, 4, 2)


class _Head(nn.Module):
    """The head's ``forward`` on a list of levels, outputs flattened."""

    def __init__(self, **kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.head = RetinaSepBNHead(
            num_classes=3,
            num_ins=len(LEVELS),
            in_channels=8,
            feat_channels=8,
            stacked_convs=2,
            norm_cfg=dict(type='BN'),
            anchor_generator=dict(
                type='AnchorGenerator',
                octave_base_scale=4,
                scales_per_octave=3,
                ratios=[0.5, 1.0, 2.0],
                strides=[8, 16, 32],
            ),
            init_cfg=None,
            **kwargs,
        )

    def forward(self, x):
        feats = [
            nn.functional.interpolate(x, size=(s, s), mode='bilinear')
            for s in LEVELS
        ]
        cls, reg = self.head(feats)
        return (*cls, *reg)


def _models(batch):
    ref = randomize_model(_Head())
    tuned = copy.deepcopy(ref)
    report = turn_on_fast_conv_bn_eval(tuned, batch=batch)
    return ref, tuned, report


def _x():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 8, 8, 8, generator=gen).double()


def _assert_folded_every_call(report, calls=1):
    counts = report.fold_counts()
    assert len(counts) == len(report.converted)
    assert all(
        c.folded == calls and not c.computed for c in counts.values()
    ), report.runtime_summary()


@pytest.mark.parametrize('batch', [False, True], ids=['alone', 'batched'])
def test_each_level_folds_its_own_bn(batch):
    ref, tuned, report = _models(batch)
    # 2 branches x 2 stacked convs x 3 levels, 4 convs shared by 3 levels
    assert len(report.converted) == 12 and not report.skipped, str(report)
    shared = {id(r.conv) for r in tune_pairs(tuned)}
    assert len(shared) == 4
    assert len(conv_runtimes(tuned.head.cls_convs[0][0].conv)) == 3
    report.reset_counts()
    assert compare_models(ref, tuned, [_x()], rtol=1e-10) == []
    _assert_folded_every_call(report)
    with count_batch_norm_calls() as counter:
        tuned(_x())
    assert counter.calls == 0
    # BN in train mode: batch statistics, running statistics updated, as
    # without mmtune; back in eval mode it folds the updated statistics
    ref.train()
    tuned.train()
    assert compare_models(ref, tuned, [_x()], rtol=1e-10) == []
    ref.eval()
    tuned.eval()
    report.reset_counts()
    assert compare_models(ref, tuned, [_x()], rtol=1e-10) == []
    _assert_folded_every_call(report)


def test_the_runtime_oracle_pairs_are_all_converted():
    _, tuned, report = _models(False)
    turn_off_fast_conv_bn_eval(tuned)
    oracle = find_conv_bn_pairs_at_runtime(tuned, _x())
    report = turn_on_fast_conv_bn_eval(tuned)
    assert len(oracle) == 12
    assert set(oracle) <= set(report.converted), str(report)


def test_a_call_no_frame_armed_computes_as_the_conv():
    ref, tuned, report = _models(True)
    conv = tuned.head.cls_convs[1][0].conv
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
        # a ConvModule call with norm=False, and a direct call of the conv
        assert torch.equal(
            tuned.head.cls_convs[1][0](x, activate=False, norm=False),
            expected,
        )
        assert torch.equal(conv(x), expected)
    counts = report.fold_counts()
    first = counts[('head.cls_convs.0.0.conv', 'head.cls_convs.0.0.bn')]
    assert first.folded == 0 and sum(first.computed.values()) == 2
    # the following calls fold again
    report.reset_counts()
    assert compare_models(ref, tuned, [_x()], rtol=1e-10) == []
    _assert_folded_every_call(report)


def test_turning_on_twice_and_off():
    ref, tuned, _ = _models(False)
    again = turn_on_fast_conv_bn_eval(tuned)
    assert again.already_on == len(again.converted) == 12
    assert len(tune_pairs(tuned)) == 12
    restored = turn_off_fast_conv_bn_eval(tuned)
    assert 'forward' not in tuned.head.cls_convs[0][0].conv.__dict__
    assert restored > 0 and tune_pairs(tuned) == []
    assert compare_models(ref, tuned, [_x()], rtol=0) == []


@pytest.mark.parametrize('how', ['deepcopy', 'pickle'])
def test_copies_fold_with_their_own_modules(how):
    ref, tuned, _ = _models(True)
    if how == 'deepcopy':
        copied = copy.deepcopy(tuned)
    else:
        copied = pickle.loads(pickle.dumps(tuned))
    conv = copied.head.cls_convs[2][1].conv
    owner = conv.__dict__['forward'].__self__
    assert isinstance(owner, SharedConv) and owner.conv is conv
    assert all(p.conv is conv for p in owner.pairs)
    pairs = tune_pairs(copied)
    assert len(pairs) == 12
    for pair in pairs:
        pair.reset_counts()
    assert compare_models(ref, copied, [_x()], rtol=1e-10) == []
    assert all(p.counts() == (1, {}) for p in pairs)


class _SharedOutside(nn.Module):
    """A ConvModule's conv also called by a traced frame."""

    def __init__(self):
        super().__init__()
        self.a = ConvModule(4, 4, 3, padding=1, norm_cfg=dict(type='BN'))
        self.b = ConvModule(4, 4, 3, padding=1, norm_cfg=dict(type='BN'))
        self.b.conv = self.a.conv
        self.conv = self.a.conv
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.b(self.a(x)) + self.bn(self.conv(x))


def test_a_conv_shared_with_a_traced_frame_is_not_converted():
    torch.manual_seed(0)
    ref = _SharedOutside()
    randomize_bn(ref)
    ref = ref.double().eval()
    tuned = copy.deepcopy(ref)
    report = turn_on_fast_conv_bn_eval(tuned, batch=True)
    assert not any('a.conv' in c or c == 'conv' for c, _ in report.converted)
    assert any('several places' in s.reason for s in report.skipped)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert compare_models(ref, tuned, [x], rtol=1e-10) == []


@pytest.mark.parametrize('batch', [False, True], ids=['alone', 'batched'])
def test_rtmdet_tiny_whole_detector(batch):
    from mmengine.hub import get_config

    cfg = get_config('mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py')
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    randomize_bn(model)
    # RTMDet trains its BN: here they are in eval mode, as fine-tuning with
    # frozen BN would have them
    model = model.double().eval()

    class Tensor(nn.Module):
        def __init__(self, det):
            super().__init__()
            self.det = det

        def forward(self, x):
            return self.det(x, mode='tensor')

    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    oracle = find_conv_bn_pairs_at_runtime(model, x, mode='tensor')
    ref = copy.deepcopy(model)
    report = turn_on_fast_conv_bn_eval(model, batch=batch)
    assert len(oracle) == 76
    assert set(oracle) <= set(report.converted), str(report)
    report.reset_counts()
    assert compare_models(Tensor(ref), Tensor(model), [x], rtol=1e-9) == []
    _assert_folded_every_call(report)


def _replace_level_1_bn(model):
    module = model.head.cls_convs[1][0]
    bn = nn.BatchNorm2d(8).double().eval()
    randomize_bn(bn)
    setattr(module, module.norm_name, bn)


def _replace_level_1_conv(model):
    module = model.head.cls_convs[1][0]
    torch.manual_seed(3)
    module.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False).double()


def _hook_on_the_shared_conv(model, seen):
    conv = model.head.cls_convs[0][0].conv
    conv.register_forward_hook(lambda m, i, o: seen.append(o.detach()))


def _write_level_2_stats(model):
    bn = model.head.cls_convs[2][0].bn
    with torch.no_grad():
        bn.running_var.data.mul_(3.0)
        bn.running_mean.data.add_(0.5)
        bn.weight.data.copy_(torch.linspace(-1.5, 1.5, bn.num_features))


@pytest.mark.parametrize('batch', [False, True], ids=['alone', 'batched'])
@pytest.mark.parametrize(
    'change', ['replace_bn', 'replace_conv', 'hook', 'data_writes']
)
def test_changes_after_turn_on(batch, change):
    """What a user does to one level after turn-on: the outputs and all
    gradients stay eval mode's; the pairs it touches compute as the modules
    do (counted), the others still fold."""
    ref, tuned, report = _models(batch)
    seen_ref, seen_tuned = [], []
    for model, seen in ((ref, seen_ref), (tuned, seen_tuned)):
        if change == 'replace_bn':
            _replace_level_1_bn(model)
        elif change == 'replace_conv':
            _replace_level_1_conv(model)
        elif change == 'hook':
            _hook_on_the_shared_conv(model, seen)
        else:
            _write_level_2_stats(model)
    report.reset_counts()
    assert compare_models(ref, tuned, [_x()], rtol=1e-10) == []
    counts = report.fold_counts()
    # the first stacked conv, shared by the three levels
    level = ('head.cls_convs.{}.0.conv', 'head.cls_convs.{}.0.bn')
    touched = {
        'replace_bn': [1],
        'replace_conv': [1],
        'hook': [0, 1, 2],  # the hook sees every level's conv output
        'data_writes': [],  # the fold reads the new values
    }[change]
    for i in range(3):
        names = tuple(name.format(i) for name in level)
        c = counts[names]
        if i not in touched:
            assert c.folded >= 1 and not c.computed, (i, c)
        elif change == 'replace_conv':
            # the new conv runs its own forward and the BN computes as
            # eval mode: the pair is not called, and the report says so
            assert c.folded == 0 and not c.computed, (i, c)
            assert report.runtime_summary().startswith(
                'mmtune tune mode: 11 of 12 converted pairs folded at every '
                'call; 1 were not called'
            ), report.runtime_summary()
        else:
            assert c.folded == 0 and sum(c.computed.values()) >= 1, (i, c)
    if change == 'hook':
        assert len(seen_ref) == len(seen_tuned) == len(LEVELS)
        for a, b in zip(seen_ref, seen_tuned):
            assert torch.equal(a, b)
