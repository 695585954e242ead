# Copyright (c) mmtune contributors. All rights reserved.
"""mmpretrain classifiers from mmpretrain's own configs: tune mode equals
eval mode in float64 and folds every pair at every call. mmpretrain's
model package imports without torchvision through stand-ins
(``mmtune.testing.import_without_torchvision``)."""

import importlib.util
import os
import sys

import pytest

pytest.importorskip('mmpretrain')

from codebase_checks import check_whole_model  # noqa: E402

from mmtune.testing import run_python  # noqa: E402


@pytest.mark.parametrize(
    'name',
    [
        'MobileNetV3-small',
        'ShuffleNetV2 1x',
        'RepVGG-A0',  # three branches (3x3, 1x1, identity BN) summed
        'RegNetX-400MF',
        'EfficientNet-B0',
        'MobileOne-S0',
        'LeViT-128S',  # its Linear+BatchNorm1d layers are no conv pairs
    ],
)
def test_classifier_whole_model(name):
    check_whole_model('mmpretrain', name)


def test_classifier_batched():
    check_whole_model('mmpretrain', 'RegNetX-400MF', batch=True)


@pytest.mark.skipif(
    importlib.util.find_spec('torchvision') is not None,
    reason='torchvision is installed',
)
def test_stand_ins_do_not_outlive_the_import():
    code = (
        'import sys\n'
        'from mmtune.testing import import_without_torchvision\n'
        "_, stood_in = import_without_torchvision('mmpretrain.models')\n"
        'print(stood_in)\n'
        "print([k for k in sys.modules if k.startswith('torchvision')])\n"
        'from mmpretrain.models.utils import box_utils\n'
        'try:\n'
        '    box_utils.boxes.box_iou(None, None)\n'
        'except ImportError as exc:\n'
        '    print(exc)\n'
        'try:\n'
        '    import torchvision\n'
        'except ModuleNotFoundError:\n'
        "    print('no torchvision')\n"
    )
    out = run_python(['-c', code], env=dict(os.environ), timeout=120)
    lines = out.strip().splitlines()[-4:]
    assert 'torchvision.ops.boxes' in lines[0], out
    assert lines[1:] == [
        '[]',
        'torchvision.ops.boxes.box_iou: torchvision is not installed',
        'no torchvision',
    ], out
    assert 'torchvision' not in sys.modules
