# Copyright (c) mmtune contributors. All rights reserved.
"""mmpretrain classifiers from mmpretrain's own configs: tune mode equals
eval mode in float64 and folds every pair at every call. mmpretrain's
model package imports without torchvision through stand-ins
(``mmtune.testing.import_without_torchvision``)."""

import copy
import importlib.util
import os
import sys

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

pytest.importorskip('mmpretrain')

from codebase_checks import (  # noqa: E402
    Heads,
    check_whole_model,
    compare_with_floor,
)

from mmtune import turn_on_fast_conv_bn_eval  # noqa: E402
from mmtune.rewrite.tune_mode import CALLER  # noqa: E402
from mmtune.testing import (  # noqa: E402
    CODEBASE_MODELS,
    build_codebase_model,
    count_batch_norm_calls,
    max_relative_error,
    randomize_bn,
    run_python,
)


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
        'HRNet-W18',  # an untraceable stem, proved from its source
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


def test_densenet_121_folds_its_dense_layers():
    """DenseNet-121: each of its 58 ``DenseLayer``s hands conv1's output to
    norm2 through ``bottleneck_fn`` in a forward torch.fx cannot trace
    (``assert isinstance(x, list)``); the source proves the pair
    (``mmtune.rewrite.source_pairs``): 59 of 59 pairs converted and folded
    at every call, float64 exact with gradients."""
    report, pairs = check_whole_model('mmpretrain', 'DenseNet-121')
    assert len(pairs) == 59
    assert len(report.converted) == 59
    dense = [p for p in report.converted if p[0].endswith('.conv1')]
    assert len(dense) == 58
    assert all(p[1] == p[0][: -len('conv1')] + 'norm2' for p in dense)


def _norm_eval(*models):
    for model in models:
        model.train()
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.eval()


@pytest.mark.parametrize('memory_efficient', [False, True])
def test_densenet_121_with_frozen_bns_in_train_mode(memory_efficient):
    """Train/eval switches with every BN frozen in eval mode. With
    ``memory_efficient`` and inputs that require grad, ``bottleneck_fn``
    runs through ``torch.utils.checkpoint``: not the chain the source
    proved, so the 58 DenseLayer pairs compute as eval mode there, counted,
    and still exact; without grad they fold."""
    config, _, _ = CODEBASE_MODELS['mmpretrain']['DenseNet-121']
    model = build_codebase_model(
        'mmpretrain',
        config,
        {'model.backbone.memory_efficient': memory_efficient},
    )
    randomize_bn(model)
    ref = Heads('mmpretrain', model.double().eval())
    tuned = copy.deepcopy(ref)
    report = turn_on_fast_conv_bn_eval(tuned.model)
    assert len(report.converted) == 59, str(report)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for step in range(3):
        if step == 1:
            _norm_eval(ref, tuned)
        else:
            ref.eval()
            tuned.eval()
        assert compare_with_floor(ref, tuned, [x]) == []
    counts = report.fold_counts()
    dense = [p for p in counts if p[0].endswith('.conv1')]
    assert len(dense) == 58
    for pair, count in counts.items():
        if memory_efficient and pair in dense:
            # forward and checkpoint's recomputation, at each of 3 steps
            assert count.folded == 0 and count.computed == {CALLER: 6}
        else:
            assert count.folded == 3 and not count.computed, pair
    with torch.no_grad():  # no input requires grad: the plain branch
        with count_batch_norm_calls() as counter:
            out = tuned(x)
        assert max_relative_error(out, ref(x)) < 1e-12
    assert counter.calls == 121 - 59  # 121 BNs, 59 folded
    for pair, count in report.fold_counts().items():
        expected = 1 if memory_efficient and pair in dense else 4
        assert count.folded == expected, pair
