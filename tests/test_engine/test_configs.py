# Copyright (c) mmtune contributors. All rights reserved.
"""The ready configs load, ask for the hook, and their models convert."""

import glob
import os.path as osp

import pytest
from conftest import REPO
from mmengine.config import Config

from mmtune.engine import apply_mmtune_cfg

CONFIGS = sorted(
    glob.glob(osp.join(REPO, 'configs', 'fast_conv_bn_eval', '*.py'))
)


def test_there_are_three():
    assert len(CONFIGS) == 3


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_turns_tune_mode_on(path):
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from mmtune import turn_on_fast_conv_bn_eval

    cfg = Config.fromfile(path)
    assert cfg.fast_conv_bn_eval is True
    apply_mmtune_cfg(cfg)
    hooks = [
        h for h in cfg.custom_hooks if h['type'] == 'mmtune.FastConvBNEvalHook'
    ]
    # the base config's hook, which reads the keys itself
    assert len(hooks) == 1 and hooks[0].get('modules') is None
    apply_mmtune_cfg(cfg)  # idempotent: still one hook
    assert len(cfg.custom_hooks) == 1
    register_all_modules()
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    report = turn_on_fast_conv_bn_eval(model)
    assert len(report.converted) == 53, str(report)
