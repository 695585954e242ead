# Copyright (c) mmtune contributors. All rights reserved.
"""The maths layer: torch only, no mmengine/mmcv/mmdet."""

from .conv_bn import (
    ConvBNFold,
    bn_inv_std,
    bn_scale,
    conv_forward_with,
    fold_bias,
    fold_conv_bn,
    fold_modules,
    scale_weight,
)
from .conv_folded import (
    autocast_dtype,
    conv_forward_folded,
    is_compiling,
    observe_saved_tensors,
)
from .fold_group import (
    FoldGroupPlan,
    fold_bn_group,
    fold_conv_bn_group,
)

__all__ = [
    'bn_inv_std',
    'bn_scale',
    'fold_conv_bn',
    'fold_modules',
    'fold_bias',
    'conv_forward_with',
    'ConvBNFold',
    'conv_forward_folded',
    'observe_saved_tensors',
    'is_compiling',
    'autocast_dtype',
    'FoldGroupPlan',
    'fold_conv_bn_group',
    'fold_bn_group',
    'scale_weight',
]
