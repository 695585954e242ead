# Copyright (c) mmtune contributors. All rights reserved.
"""Turn mmtune's config keys into hooks (used by ``tools/train.py`` and
``tools/test.py``).

Keys:

- ``fast_conv_bn_eval`` (bool, default False): tune mode for Conv+eval-BN.
- ``fast_conv_bn_eval_modules`` (name or list of names, default the whole
  model): where tune mode applies; setting it alone turns tune mode on.
- ``precise_bn`` (dict(num_samples=..., interval=...), True or None).
- mmengine's own ``efficient_conv_bn_eval`` (list of names) is taken over:
  mmtune applies the rewrite, once, itself.
"""

from typing import Optional

from mmengine.config import Config
from mmengine.logging import print_log

from .hooks.fast_conv_bn_eval_hook import (
    CFG_MODULES_KEY,
    MMENGINE_MODULES_KEY,
    check_enabled_key,
    check_modules_arg,
)
from .hooks.precise_bn_hook import precise_bn_hook_cfg

_TUNE_HOOK_TYPES = ('mmtune.FastConvBNEvalHook', 'FastConvBNEvalHook')
_PRECISE_HOOK_TYPES = ('mmtune.PreciseBNHook', 'PreciseBNHook')


def _has_hook(cfg: Config, types) -> bool:
    return any(
        isinstance(h, dict) and h.get('type') in types
        for h in cfg.get('custom_hooks', None) or []
    )


def fast_conv_bn_eval_hook_cfg(cfg: Config) -> Optional[dict]:
    """The tune-mode hook config that ``cfg``'s keys ask for, or None.

    Raises:
        TypeError: a key has the wrong type (the message names the key and
            quotes the value).
    """
    enabled = check_enabled_key(cfg.get('fast_conv_bn_eval', None))
    modules = check_modules_arg(
        cfg.get('fast_conv_bn_eval_modules', None), CFG_MODULES_KEY
    )
    mmengine_modules = check_modules_arg(
        cfg.get('efficient_conv_bn_eval', None), MMENGINE_MODULES_KEY
    )
    if enabled is False:
        if modules is not None:
            print_log(
                'fast_conv_bn_eval=False: fast_conv_bn_eval_modules='
                f'{modules!r} is ignored',
                logger='current',
            )
        return None
    if enabled is None and modules is None and mmengine_modules is None:
        return None
    if enabled is None and modules is None:
        # Only mmengine's key: cover what it names.
        modules = mmengine_modules
    return {'type': 'mmtune.FastConvBNEvalHook', 'modules': modules}


def apply_mmtune_cfg(cfg: Config) -> Config:
    """Validate mmtune's config keys and add the hooks they ask for.

    Bad values raise before any training starts; a hook already listed in
    ``custom_hooks`` is not added twice.

    Args:
        cfg (Config): The full config; modified in place.

    Returns:
        Config: ``cfg``.
    """
    hooks = list(cfg.get('custom_hooks', None) or [])
    tune = fast_conv_bn_eval_hook_cfg(cfg)
    if tune is not None and not _has_hook(cfg, _TUNE_HOOK_TYPES):
        hooks.append(tune)
    precise = precise_bn_hook_cfg(cfg.get('precise_bn', None))
    if precise is not None and not _has_hook(cfg, _PRECISE_HOOK_TYPES):
        hooks.append(precise)
    cfg.custom_hooks = hooks
    return cfg


def unread_keys_warning(cfg) -> Optional[str]:
    """The warning for a config that sets mmtune's keys but lists no
    mmtune hook in ``custom_hooks`` (only mmtune's own tools add the hooks
    from the keys), or None."""
    unread = []
    enabled = cfg.get('fast_conv_bn_eval', None)
    modules = cfg.get('fast_conv_bn_eval_modules', None)
    if (enabled or modules is not None) and not _has_hook(
        cfg, _TUNE_HOOK_TYPES
    ):
        unread.append('fast_conv_bn_eval')
    if cfg.get('precise_bn', None) and not _has_hook(cfg, _PRECISE_HOOK_TYPES):
        unread.append('precise_bn')
    if not unread:
        return None
    return (
        f'mmtune: the config sets {" and ".join(unread)} but its '
        "custom_hooks list no mmtune hook that reads it; only mmtune's own "
        'tools/train.py and tools/test.py add the hooks from these keys. '
        "With another codebase's tools, add mmtune's "
        'configs/_base_/fast_conv_bn_eval.py to _base_, or '
        "dict(type='mmtune.FastConvBNEvalHook') (and "
        "dict(type='mmtune.PreciseBNHook', ...)) to custom_hooks."
    )


def check_config_being_loaded() -> None:
    """Warn (see :func:`unread_keys_warning`) when mmtune is imported by
    the ``custom_imports`` of a config that mmengine is loading: the one
    moment mmtune runs before another codebase's ``tools/train.py`` builds
    a Runner. Reads the config from mmengine's ``Config.fromfile`` frame;
    does nothing if there is none."""
    import sys

    fromfile = getattr(Config.fromfile, '__code__', None)
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not fromfile:
        frame = frame.f_back
    if frame is None:
        return
    cfg_dict = frame.f_locals.get('cfg_dict')
    if not isinstance(cfg_dict, dict):
        return
    message = unread_keys_warning(cfg_dict)
    if message is not None:
        import logging

        print_log(message, logger='current', level=logging.WARNING)
