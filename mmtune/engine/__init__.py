# Copyright (c) mmtune contributors. All rights reserved.
"""mmengine / mmcv integration: hooks, config keys, the ConvModule path."""

from .config import apply_mmtune_cfg
from .hooks import FastConvBNEvalHook, PreciseBNHook

__all__ = ['apply_mmtune_cfg', 'FastConvBNEvalHook', 'PreciseBNHook']
