# Copyright (c) mmtune contributors. All rights reserved.
"""The maths layer: torch only, no mmengine/mmcv/mmdet."""

from .conv_bn import (
    autocast_dtype,
    bn_fold_supported,
    bn_inv_std,
    conv_forward_with,
    fold_conv_bn,
    fold_conv_bn_by_bn,
)

__all__ = [
    'autocast_dtype',
    'bn_fold_supported',
    'bn_inv_std',
    'conv_forward_with',
    'fold_conv_bn',
    'fold_conv_bn_by_bn',
]
