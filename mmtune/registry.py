# Copyright (c) mmtune contributors. All rights reserved.
"""mmtune's registries (the engine layer; needs mmengine).

``HOOKS`` has the scope ``'mmtune'`` and mmengine's root registry as parent,
so ``dict(type='mmtune.FastConvBNEvalHook')`` always builds mmtune's hook
whatever the config's ``default_scope`` is (mmdet, mmpretrain, mmseg).
Every hook is also registered in mmengine's root registry under its plain
name, which child scopes fall back to when they have no hook of that name.
"""

from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

HOOKS = Registry(
    'hook',
    parent=MMENGINE_HOOKS,
    scope='mmtune',
    locations=['mmtune.engine.hooks'],
)
MODELS = Registry(
    'model',
    parent=MMENGINE_MODELS,
    scope='mmtune',
    locations=['mmtune.models'],
)


def register_hook(cls):
    """Register a hook class in mmtune's scope and in mmengine's root."""
    HOOKS.register_module(module=cls)
    if MMENGINE_HOOKS.get(cls.__name__) is None:
        MMENGINE_HOOKS.register_module(module=cls)
    return cls


__all__ = ['HOOKS', 'MODELS', 'register_hook']
