# Copyright (c) mmtune contributors. All rights reserved.
from .fast_conv_bn_eval_hook import FastConvBNEvalHook
from .precise_bn_hook import PreciseBNHook, precise_bn_hook_cfg

__all__ = ['FastConvBNEvalHook', 'PreciseBNHook', 'precise_bn_hook_cfg']
