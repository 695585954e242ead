# Copyright (c) mmtune contributors. All rights reserved.
"""mmpose pose estimators from mmpose's own configs: tune mode equals eval
mode in float64 and folds every pair at every call."""

import pytest

pytest.importorskip('mmpose')

from codebase_checks import check_whole_model  # noqa: E402


def test_simplebaseline_res50_deconv_head():
    """ResNet-50 and a heatmap head of ConvTranspose2d+BN layers."""
    report, pairs = check_whole_model(
        'mmpose', 'SimpleBaseline ResNet-50 (td-hm_res50)'
    )
    deconvs = [conv for conv, _ in pairs if conv.startswith('head.')]
    assert len(deconvs) == 3, sorted(pairs)


@pytest.mark.parametrize('batch', [False, True], ids=['alone', 'batched'])
def test_mobilenetv2_heatmap(batch):
    check_whole_model('mmpose', 'MobileNetV2 heatmap', batch=batch)


def test_litehrnet_18():
    check_whole_model('mmpose', 'LiteHRNet-18 heatmap')


def test_rtmpose_t_mmdet_backbone():
    """RTMPose: mmdet's CSPNeXt backbone (``_scope_='mmdet'``, SyncBN) and
    the RTMCC head (no BN)."""
    _, pairs = check_whole_model('mmpose', 'RTMPose-t (CSPNeXt, mmdet scope)')
    assert all(conv.startswith('backbone.') for conv, _ in pairs)
