# Copyright (c) mmtune contributors. All rights reserved.
"""Whole real mmdet models in tune mode: every Conv->eval-BN pair that a
run-time check finds is converted, and outputs and all gradients equal eval
mode (float64: float32 gradients of deep nets differ by ~1e-2 relative
even with nothing rewritten)."""

import copy

import pytest
import torch

from mmtune import fuse_conv_bn, turn_on_fast_conv_bn_eval
from mmtune.testing import (
    MMDET_BACKBONES,
    compare_models,
    find_conv_bn_pairs_at_runtime,
    fold_batches,
    randomize_bn,
)

mmdet = pytest.importorskip('mmdet')
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

register_all_modules()

BACKBONES = MMDET_BACKBONES


def _build(cfg):
    torch.manual_seed(0)
    # other tests may leave another default scope current
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg)
    randomize_bn(model)
    return model.double()


@pytest.mark.parametrize('batch', [False, True], ids=['alone', 'batched'])
@pytest.mark.parametrize('name', list(BACKBONES))
def test_backbone_whole_model(name, batch):
    model = _build(BACKBONES[name])
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    model.train()  # norm_eval keeps every BN in eval mode
    runtime_pairs = find_conv_bn_pairs_at_runtime(model, x)
    assert runtime_pairs
    ref = copy.deepcopy(model)
    report = turn_on_fast_conv_bn_eval(model, batch=batch)
    assert set(runtime_pairs) <= set(report.converted), str(report)
    if name == 'resnet50_dcn':
        assert any(
            'ModulatedDeformConv2dPack' in s.reason for s in report.skipped
        )
    assert compare_models(ref, model, [x], rtol=1e-9) == []
    # EfficientNet's convs are all Conv2dAdaptivePadding: a declared
    # foldable class with an input transform folds pair by pair
    batched = batch and name != 'efficientnet_b0'
    assert [b.folds > 0 for b in fold_batches(model)] == (
        [True] if batched else []
    )
    ref.eval()
    model.eval()
    assert compare_models(ref, model, [x], rtol=1e-9) == []
    _assert_all_folded(report)


def _assert_all_folded(report):
    """Every converted pair folded at every call (train and eval)."""
    counts = report.fold_counts()
    assert len(counts) == len(report.converted)
    assert all(c.folded and not c.computed for c in counts.values()), (
        report.runtime_summary()
    )


def _detector(config):
    from mmengine.hub import get_config

    cfg = get_config(f'mmdet::{config}')
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    randomize_bn(model)
    return model


@pytest.mark.parametrize('batch', [False, True], ids=['alone', 'batched'])
def test_retinanet_r50_fpn_whole_detector(batch):
    model = _detector('retinanet/retinanet_r50_fpn_1x_coco.py').double()
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    model.train()
    runtime_pairs = find_conv_bn_pairs_at_runtime(model, x, mode='tensor')
    ref = copy.deepcopy(model)
    report = turn_on_fast_conv_bn_eval(model, batch=batch)
    assert len(runtime_pairs) == 53
    assert set(runtime_pairs) <= set(report.converted), str(report)

    class Tensor(torch.nn.Module):
        def __init__(self, det):
            super().__init__()
            self.det = det

        def forward(self, x):
            return self.det(x, mode='tensor')

    for mode in (True, False):
        ref.train(mode)
        model.train(mode)
        assert compare_models(Tensor(ref), Tensor(model), [x], rtol=1e-9) == []
    assert [b.folds > 0 for b in fold_batches(model)] == (
        [True] if batch else []
    )
    _assert_all_folded(report)


def test_mask_rcnn_turn_on_cost_and_deploy():
    model = _detector('mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py').eval()
    report = turn_on_fast_conv_bn_eval(model)
    assert len(report.converted) == 53
    assert report.seconds < 2.0, report.summary()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.extract_feat(x)
        fused = fuse_conv_bn(model)
        assert len(fused.converted) == 53
        for a, b in zip(model.extract_feat(x), expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
