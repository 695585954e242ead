# Copyright (c) mmtune contributors. All rights reserved.
"""The maths layer: torch only, no mmengine/mmcv/mmdet."""

from .conv_bn import (
    bn_inv_std,
    bn_scale,
    conv_forward_with,
    fold_bias,
    fold_conv_bn,
    fold_modules,
)
from .fold_group import FoldGroupPlan, fold_conv_bn_group

__all__ = [
    'bn_inv_std',
    'bn_scale',
    'fold_conv_bn',
    'fold_modules',
    'fold_bias',
    'conv_forward_with',
    'FoldGroupPlan',
    'fold_conv_bn_group',
]
