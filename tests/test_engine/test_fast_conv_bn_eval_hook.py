# Copyright (c) mmtune contributors. All rights reserved.
"""FastConvBNEvalHook and the config keys in real Runner runs on the demo
detector."""

import copy
import os.path as osp
import subprocess
import sys

import pytest
import torch
from conftest import DEMO_CONFIG, REPO, demo_cfg, run_training
from mmengine.config import Config

import mmtune.engine.hooks.fast_conv_bn_eval_hook as hook_mod
from mmtune.engine import FastConvBNEvalHook, apply_mmtune_cfg


def _close(a, b, rtol=1e-4):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rtol * max(abs(y), 1e-6), (a, b)


def _max_param_diff(a, b):
    """Largest relative difference between two models' parameters."""
    worst = 0.0
    for p, q in zip(a.parameters(), b.parameters()):
        scale = max(p.detach().abs().max().item(), 1e-12)
        worst = max(worst, (p - q).detach().abs().max().item() / scale)
    return worst


def test_same_losses_as_without(tmp_path):
    off_runner, off = run_training(demo_cfg(tmp_path / 'off', max_iters=1))
    runner, on = run_training(
        demo_cfg(tmp_path / 'on', max_iters=1, fast_conv_bn_eval=True)
    )
    # the same loss, and after one SGD step the same weights up to float32
    # rounding
    _close(on, off, rtol=1e-6)
    assert _max_param_diff(off_runner.model, runner.model) < 1e-5
    model = runner.model
    assert 'forward' in model.backbone.conv1.__dict__
    # frozen_stages=1: the stem and stage 1 stay frozen in tune mode too
    assert model.backbone.conv1.weight.grad is None
    assert not model.backbone.layer1[0].conv1.weight.requires_grad
    # Over more steps float32 rounding can flip discrete choices (proposal
    # sampling, NMS), so later losses are only close.
    _, off = run_training(demo_cfg(tmp_path / 'off4', max_iters=4))
    _, on = run_training(
        demo_cfg(tmp_path / 'on4', max_iters=4, fast_conv_bn_eval=True)
    )
    _close(on[:1], off[:1], rtol=1e-6)
    _close(on, off, rtol=2e-2)


def test_gradient_accumulation(tmp_path):
    opts = {'optim_wrapper.accumulative_counts': 2}
    _, off = run_training(demo_cfg(tmp_path / 'off', max_iters=4, **opts))
    _, on = run_training(
        demo_cfg(tmp_path / 'on', max_iters=4, fast_conv_bn_eval=True, **opts)
    )
    # two accumulated iterations make one step: the first two losses are
    # computed with the same weights (float32 rounding of 20 folded layers
    # moves a loss by up to ~1e-5 relative)
    _close(on[:2], off[:2], rtol=2e-5)
    _close(on, off, rtol=2e-2)


@pytest.fixture
def calls(monkeypatch):
    """Record every rewrite the hook makes and the model state it saw."""
    seen = []
    original = hook_mod.turn_on_fast_conv_bn_eval

    def spy(model, modules=None, batch='auto'):
        seen.append(model.backbone.conv1.weight.detach().clone())
        return original(model, modules, batch=batch)

    monkeypatch.setattr(hook_mod, 'turn_on_fast_conv_bn_eval', spy)
    return seen


def test_acts_after_init_and_checkpoint_loading(tmp_path, calls):
    # a checkpoint whose weights differ from any initialisation
    cfg = demo_cfg(tmp_path / 'first', max_iters=1)
    runner, _ = run_training(cfg)
    state = runner.model.state_dict()
    state['backbone.conv1.weight'] = torch.full_like(
        state['backbone.conv1.weight'], 0.125
    )
    ckpt = str(tmp_path / 'marked.pth')
    torch.save({'state_dict': state, 'meta': {}}, ckpt)
    assert calls == []

    cfg = demo_cfg(
        tmp_path / 'second',
        max_iters=2,
        fast_conv_bn_eval=True,
        load_from=ckpt,
    )
    runner, _ = run_training(cfg)
    # one rewrite, and it saw the loaded weights: acting before loading (or
    # before init) would have seen other values
    assert len(calls) == 1
    assert torch.all(calls[0] == 0.125)
    # validation and test after training do not rewrite again
    runner.val()
    runner.test()
    assert len(calls) == 1
    conv = runner.model.backbone.conv1
    assert conv.forward.__self__.conv is conv  # not wrapped twice


def test_validation_only_run(tmp_path, calls):
    from mmengine.runner import Runner

    cfg = demo_cfg(tmp_path, fast_conv_bn_eval=True)
    apply_mmtune_cfg(cfg)
    runner = Runner.from_cfg(cfg)
    runner.val()
    assert len(calls) == 1
    assert 'forward' in runner.model.backbone.conv1.__dict__


def test_resume_matches_uninterrupted(tmp_path):
    _, full = run_training(
        demo_cfg(tmp_path / 'full', max_iters=4, fast_conv_bn_eval=True)
    )
    ckpt_hook = dict(type='CheckpointHook', by_epoch=False, interval=2)
    _, first = run_training(
        demo_cfg(
            tmp_path / 'part',
            max_iters=2,
            fast_conv_bn_eval=True,
            default_hooks=dict(checkpoint=ckpt_hook),
        )
    )
    ckpt = tmp_path / 'part' / 'iter_2.pth'
    assert ckpt.exists()
    _, rest = run_training(
        demo_cfg(
            tmp_path / 'part',
            max_iters=4,
            fast_conv_bn_eval=True,
            resume=True,
            load_from=str(ckpt),
        )
    )
    _close(first + rest, full, rtol=1e-5)


def test_ema_hook(tmp_path):
    """EMAHook swaps the EMA weights in through ``.data`` around every
    validation; with frozen_stages the frozen pairs fold too. Validation
    in tune mode must equal the same run without it, and after the swaps
    back the model must compute eval mode's values."""
    from mmtune import turn_off_fast_conv_bn_eval

    metrics, runners = {}, {}
    for on in (False, True):
        runner, losses = run_training(
            demo_cfg(
                tmp_path / str(on),
                max_iters=2,
                fast_conv_bn_eval=on,
                custom_hooks=[dict(type='EMAHook', momentum=0.1)],
            )
        )
        assert len(losses) == 2
        metrics[on] = runner.val()  # runs on the EMA weights
        runners[on] = runner
    assert metrics[True] == pytest.approx(metrics[False], abs=1e-3)
    model = runners[True].model
    report = [h for h in runners[True].hooks if hasattr(h, 'report')][0]
    assert report.report.never_folded() == []
    plain = copy.deepcopy(model)
    assert turn_off_fast_conv_bn_eval(plain) > 0
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    report.report.reset_counts()
    with torch.no_grad():
        for p, q in zip(model.extract_feat(x), plain.extract_feat(x)):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    counts = report.report.fold_counts().values()
    assert all(c.folded == 1 and not c.computed for c in counts)


def test_hook_reads_the_config_keys(tmp_path):
    from mmengine.runner import Runner

    hook = dict(type='mmtune.FastConvBNEvalHook')
    for options, converted in (
        (dict(fast_conv_bn_eval=False), None),
        (dict(fast_conv_bn_eval_modules=['neck']), 0),
        (dict(fast_conv_bn_eval_modules='backbone'), 20),
    ):
        cfg = demo_cfg(tmp_path / str(converted), max_iters=1, **options)
        cfg.custom_hooks = [hook]
        runner = Runner.from_cfg(cfg)  # no apply_mmtune_cfg: as mmdet's
        runner.train()
        (tune,) = [h for h in runner.hooks if hasattr(h, 'report')]
        if converted is None:
            assert tune.report is None
        else:
            assert len(tune.report.converted) == converted
    cfg = demo_cfg(tmp_path / 'clash', fast_conv_bn_eval_modules='backbone')
    cfg.custom_hooks = [dict(hook, modules=['neck'])]
    with pytest.raises(ValueError, match='name different modules'):
        Runner.from_cfg(cfg).train()


def test_mmengine_option_is_taken_over(tmp_path, calls):
    cfg = demo_cfg(tmp_path, max_iters=1, efficient_conv_bn_eval=['backbone'])
    runner, _ = run_training(cfg)
    assert len(calls) == 1
    assert 'efficient_conv_bn_eval' not in runner.cfg
    # mmengine would have replaced backbone.forward by a traced graph
    assert 'forward' not in runner.model.backbone.__dict__
    assert 'forward' in runner.model.backbone.conv1.__dict__


# Each bad value, and what its error must say: the key it came from and the
# value quoted.
BAD_CONFIG_VALUES = [
    (
        dict(fast_conv_bn_eval='yes'),
        TypeError,
        "the config key fast_conv_bn_eval must be True or False, got 'yes'",
    ),
    (
        dict(fast_conv_bn_eval_modules=3),
        TypeError,
        r'the config key fast_conv_bn_eval_modules must be .*, got 3 ',
    ),
    (
        dict(fast_conv_bn_eval_modules=['backbone', '']),
        TypeError,
        r"fast_conv_bn_eval_modules must be .*, got \['backbone', ''\]",
    ),
    (
        dict(efficient_conv_bn_eval=['backbone', 7]),
        TypeError,
        r"mmengine's config key efficient_conv_bn_eval must be .*, "
        r"got \['backbone', 7\]",
    ),
    (
        dict(precise_bn=dict(num_samples=-1)),
        ValueError,
        'the config key precise_bn.num_samples must be a positive int, '
        'but got -1',
    ),
    (
        dict(precise_bn=dict(interval=1.5)),
        TypeError,
        'the config key precise_bn.interval must be a positive int, '
        'but got 1.5',
    ),
]


@pytest.mark.parametrize('options,error,text', BAD_CONFIG_VALUES)
def test_bad_config_values(options, error, text):
    """apply_mmtune_cfg (mmtune's tools) names the key and the value."""
    cfg = Config(dict(options))
    with pytest.raises(error, match=text):
        apply_mmtune_cfg(cfg)


@pytest.mark.parametrize(
    'options,error,text',
    [c for c in BAD_CONFIG_VALUES if 'precise_bn' not in c[0]]
    + [
        # checked even when the config turns tune mode off
        (
            dict(fast_conv_bn_eval=False, fast_conv_bn_eval_modules=3),
            TypeError,
            r'the config key fast_conv_bn_eval_modules must be .*, got 3 ',
        ),
    ],
)
def test_bad_config_values_read_by_the_hook(tmp_path, options, error, text):
    """A Runner built without apply_mmtune_cfg (another codebase's
    tools/train.py): the hook names the key and the value before any
    training step, with or without its own ``modules``."""
    from mmengine.runner import Runner

    for modules in (None, ['backbone']):
        cfg = demo_cfg(tmp_path / str(modules), max_iters=1, **options)
        cfg.custom_hooks = [
            dict(type='mmtune.FastConvBNEvalHook', modules=modules)
        ]
        runner = Runner.from_cfg(cfg)
        with pytest.raises(error, match=text):
            runner.train()
        assert runner.iter == 0


@pytest.mark.parametrize(
    'kwargs,error,text',
    [
        (
            dict(modules=3),
            TypeError,
            r'FastConvBNEvalHook\(modules=\.\.\.\) must be None, a module '
            r'name or a list of module names, got 3 of type int',
        ),
        (
            dict(modules=('neck', None)),
            TypeError,
            r'FastConvBNEvalHook\(modules=\.\.\.\) must be .*, '
            r"got \('neck', None\)",
        ),
        (dict(batch='always'), ValueError, "batch must be .*, got 'always'"),
    ],
)
def test_bad_hook_arguments(tmp_path, kwargs, error, text):
    """The hook's own arguments, in Python and in ``custom_hooks``: the
    error names the argument, not a config key."""
    from mmengine.runner import Runner

    with pytest.raises(error, match=text):
        FastConvBNEvalHook(**kwargs)
    cfg = demo_cfg(tmp_path, max_iters=1)
    cfg.custom_hooks = [dict(type='mmtune.FastConvBNEvalHook', **kwargs)]
    with pytest.raises(error, match=text) as info:
        Runner.from_cfg(cfg)
    assert 'config key' not in str(info.value)


def test_unknown_module_names_fail_before_training(tmp_path):
    cfg = demo_cfg(tmp_path, fast_conv_bn_eval_modules=['backbone', 'bakbone'])
    with pytest.raises(ValueError, match=r"\['bakbone'\]"):
        run_training(cfg)
    assert not list(tmp_path.glob('*.pth'))


def test_hook_is_built_from_any_scope():
    from mmengine.registry import HOOKS, DefaultScope

    for scope in ('mmdet', 'mmengine'):
        with DefaultScope.overwrite_default_scope(scope):
            hook = HOOKS.build(
                dict(type='mmtune.FastConvBNEvalHook', modules='backbone')
            )
            assert isinstance(hook, FastConvBNEvalHook)
            plain = HOOKS.build(dict(type='FastConvBNEvalHook'))
            assert isinstance(plain, FastConvBNEvalHook)
    with pytest.raises(TypeError, match='module name'):
        FastConvBNEvalHook(modules=[1])


def test_train_tool_rejects_bad_value(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            osp.join(REPO, 'tools', 'train.py'),
            DEMO_CONFIG,
            '--work-dir',
            str(tmp_path),
            '--cfg-options',
            'fast_conv_bn_eval=maybe',
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert (
        "the config key fast_conv_bn_eval must be True or False, got 'maybe'"
    ) in proc.stderr


def test_compile_in_config(tmp_path):
    """``compile=...`` in the config: mmengine wraps ``train_step`` in
    ``torch.compile`` before the hook rewrites the model; dynamo traces the
    rewritten forward at the first step. (``aot_eager`` keeps the test
    short on a CPU; inductor on tune mode is covered in test_rewrite.)"""
    compile_cfg = dict(backend='aot_eager')
    _, off = run_training(demo_cfg(tmp_path / 'off', max_iters=2))
    runner, on = run_training(
        demo_cfg(
            tmp_path / 'on',
            max_iters=2,
            fast_conv_bn_eval=True,
            compile=compile_cfg,
        )
    )
    assert 'forward' in runner.model.backbone.conv1.__dict__
    _close(on[:1], off[:1], rtol=2e-5)
    _close(on, off, rtol=2e-2)
