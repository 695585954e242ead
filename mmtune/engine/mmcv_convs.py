# Copyright (c) mmtune contributors. All rights reserved.
"""mmcv's conv classes that tune mode folds exactly
(:func:`~mmtune.rewrite.register_foldable_conv`).

- ``Conv2d``, ``Conv3d``, ``ConvTranspose2d`` (``'deconv'``) and
  ``ConvTranspose3d`` of ``mmcv.cnn.bricks.wrappers``: their forwards differ
  from torch's only for empty inputs on torch < 1.4.
- ``Conv2dAdaptivePadding``: pads the input ("same" padding) first.
- ``ConvWS2d`` and ``ConvAWS2d``: standardise the weight first.

Each transform below computes what the class's forward computes, with the
same operations.
"""

import math

import torch.nn.functional as F
from mmcv.cnn.bricks import wrappers
from mmcv.cnn.bricks.conv2d_adaptive_padding import Conv2dAdaptivePadding
from mmcv.cnn.bricks.conv_ws import ConvAWS2d, ConvWS2d
from mmengine.utils.dl_utils import TORCH_VERSION
from mmengine.utils.version_utils import digit_version
from torch import Tensor, nn

from mmtune.rewrite.guards import register_foldable_conv


def _adaptive_padding(conv: nn.Module, x: Tensor) -> Tensor:
    """The padding of ``Conv2dAdaptivePadding.forward``."""
    img_h, img_w = x.size()[-2:]
    kernel_h, kernel_w = conv.weight.size()[-2:]
    stride_h, stride_w = conv.stride
    output_h = math.ceil(img_h / stride_h)
    output_w = math.ceil(img_w / stride_w)
    pad_h = max(
        (output_h - 1) * conv.stride[0]
        + (kernel_h - 1) * conv.dilation[0]
        + 1
        - img_h,
        0,
    )
    pad_w = max(
        (output_w - 1) * conv.stride[1]
        + (kernel_w - 1) * conv.dilation[1]
        + 1
        - img_w,
        0,
    )
    if pad_h > 0 or pad_w > 0:
        x = F.pad(
            x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]
        )
    return x


def _standardised_weight(conv: nn.Module) -> Tensor:
    """The weight of ``mmcv.cnn.bricks.conv_ws.conv_ws_2d``."""
    weight = conv.weight
    c_in = weight.size(0)
    weight_flat = weight.view(c_in, -1)
    mean = weight_flat.mean(dim=1, keepdim=True).view(c_in, 1, 1, 1)
    std = weight_flat.std(dim=1, keepdim=True).view(c_in, 1, 1, 1)
    return (weight - mean) / (std + conv.eps)


def _aws_weight(conv: nn.Module) -> Tensor:
    return conv._get_weight(conv.weight)


if digit_version(TORCH_VERSION) >= digit_version('1.4'):
    for cls in (
        wrappers.Conv2d,
        wrappers.Conv3d,
        wrappers.ConvTranspose2d,
        wrappers.ConvTranspose3d,
    ):
        register_foldable_conv(cls)
register_foldable_conv(Conv2dAdaptivePadding, input=_adaptive_padding)
register_foldable_conv(ConvWS2d, weight=_standardised_weight)
register_foldable_conv(ConvAWS2d, weight=_aws_weight)
