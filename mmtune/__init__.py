# Copyright (c) mmtune contributors. All rights reserved.
"""mmtune: tune mode for Conv+BN and precise BN for OpenMMLab fine-tuning.

Layers, each importing only the ones below it:

- :mod:`mmtune.ops` and :mod:`mmtune.precise_bn`: the maths (torch only):
  folding BN into conv weights; pooled, all-reduced BN statistics.
- :mod:`mmtune.rewrite`: finding Conv->BN pairs in a model and switching
  them to tune mode or folding them for deployment (torch + fx).
- :mod:`mmtune.engine`: mmengine/mmcv integration (hooks, config keys, the
  mmcv ``ConvModule`` path, feeding mmengine models to precise BN).
- ``tools/``: command-line tools.
"""

from importlib.util import find_spec as _find_spec

from .rewrite import (
    ConvBNReport,
    fuse_conv_bn,
    turn_off_fast_conv_bn_eval,
    turn_on_fast_conv_bn_eval,
)
from .version import __version__, version_info

if _find_spec('mmengine') is not None:
    # mmtune's hooks, registered under their plain names too, and, when a
    # config's custom_imports imports mmtune, a word on unread keys
    from .engine.config import check_config_being_loaded

    # update_bn_stats that also feeds mmengine models their way
    from .engine.precise_bn import update_bn_stats

    check_config_being_loaded()
else:
    from .precise_bn import update_bn_stats

__all__ = [
    '__version__',
    'version_info',
    'turn_on_fast_conv_bn_eval',
    'turn_off_fast_conv_bn_eval',
    'fuse_conv_bn',
    'ConvBNReport',
    'update_bn_stats',
]
