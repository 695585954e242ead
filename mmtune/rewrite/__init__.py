# Copyright (c) mmtune contributors. All rights reserved.
"""The rewriting layer (torch + fx): find Conv->BN pairs, run them in tune
mode, or fold them for deployment."""

from .deploy import fuse_conv_bn
from .guards import FoldableConv, register_foldable_conv
from .handlers import FrameHandler, HandledFrame, register_frame_handler
from .report import ConvBNReport, SkipRecord
from .tune_mode import turn_off_fast_conv_bn_eval, turn_on_fast_conv_bn_eval

__all__ = [
    'turn_on_fast_conv_bn_eval',
    'turn_off_fast_conv_bn_eval',
    'fuse_conv_bn',
    'ConvBNReport',
    'SkipRecord',
    'FrameHandler',
    'HandledFrame',
    'register_frame_handler',
    'register_foldable_conv',
    'FoldableConv',
]
