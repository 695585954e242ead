# Copyright (c) mmtune contributors. All rights reserved.
"""How many Conv->BN pairs tune mode converts in mmdet backbones and
detectors, against the pairs a run-time check finds.

    python tools/analysis_tools/conv_bn_coverage.py

Prints a markdown table: pairs a forward pass really computes (a BN that
receives exactly a conv's output), pairs converted, pairs skipped (with
the first reason), and the time ``turn_on_fast_conv_bn_eval`` took.
"""

import argparse
import copy

import torch

from mmtune import turn_on_fast_conv_bn_eval
from mmtune.testing import MMDET_BACKBONES, find_conv_bn_pairs_at_runtime

DETECTORS = {
    'Faster R-CNN R50-FPN': 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
    'RetinaNet R50-FPN': 'retinanet/retinanet_r50_fpn_1x_coco.py',
    'Mask R-CNN R50-FPN': 'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
}


def _models():
    from mmdet.registry import MODELS
    from mmengine.hub import get_config

    for name, cfg in MMDET_BACKBONES.items():
        yield name, MODELS.build(cfg), {}
    for name, path in DETECTORS.items():
        cfg = get_config(f'mmdet::{path}')
        cfg.model.backbone.init_cfg = None
        model = MODELS.build(cfg.model)
        # two-stage detectors need data samples past the backbone and neck
        yield name, model, {'forward': model.extract_feat}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--size',
        type=int,
        default=64,
        help='input height and width (default 64)',
    )
    args = parser.parse_args(argv)
    from mmdet.utils import register_all_modules

    register_all_modules()
    print(
        '| model | pairs at run time | converted | missed | skipped '
        '| turn-on time (s) | first skip reason |'
    )
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for name, model, kwargs in _models():
        model.eval()
        x = torch.randn(1, 3, args.size, args.size)
        runtime = find_conv_bn_pairs_at_runtime(model, x, **kwargs)
        report = turn_on_fast_conv_bn_eval(copy.deepcopy(model))
        missed = len(set(runtime) - set(report.converted))
        reason = report.skipped[0].reason if report.skipped else ''
        print(
            f'| {name} | {len(runtime)} | {len(report.converted)} | '
            f'{missed} | {len(report.skipped)} | {report.seconds:.2f} '
            f'| {reason} |'
        )


if __name__ == '__main__':
    main()
