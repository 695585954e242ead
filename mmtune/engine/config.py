# Copyright (c) mmtune contributors. All rights reserved.
"""Turn mmtune's config keys into hooks (used by ``tools/train.py`` and
``tools/test.py``)."""
from mmengine.config import Config


def apply_mmtune_cfg(cfg: Config) -> Config:
    """Validate mmtune's config keys and add the hooks they ask for.

    Keys: ``fast_conv_bn_eval``, ``fast_conv_bn_eval_modules`` and
    ``precise_bn``. Bad values raise before any training starts.

    Args:
        cfg (Config): The full config; modified in place.

    Returns:
        Config: ``cfg``.
    """
    # Filled in by the tune-mode and precise-BN features.
    return cfg
