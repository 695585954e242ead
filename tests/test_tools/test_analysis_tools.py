# Copyright (c) mmtune contributors. All rights reserved.
"""The benchmark and check tools of tools/analysis_tools on a CPU.

Small on purpose: the demo detector on a 4-image demo dataset of 96x64
images, the benchmark with 2 timed steps per mode; a ResNet-18 classifier
on 32x32 images for the check that must fail.
"""

import importlib.util
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmdet')

import mmtune.rewrite.tune_mode as tune_mode  # noqa: E402
from mmtune.testing import SMALL_CLASSIFIER_ARGS  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOLS = osp.join(REPO, 'tools', 'analysis_tools')
DEMO = osp.join(
    REPO, 'configs', 'demo', 'faster-rcnn_r18_fpn_80iter_demo-coco.py'
)
CLS = osp.join(
    REPO, 'configs', 'benchmark', 'resnet50_8xb64_finetune-cls-224.py'
)
# a 4-image demo dataset of 96x64 images, loaded at that size
SMALL_DEMO = [
    '--cfg-options',
    'demo_data.num_train=4',
    'demo_data.num_val=1',
    'demo_data.img_size=(96,64)',
    'train_dataloader.dataset.pipeline.2.scale=(96,64)',
]
SMALL_CLS = SMALL_CLASSIFIER_ARGS


@pytest.fixture(scope='module')
def demo_env(tmp_path_factory):
    """The demo dataset goes to a temporary folder."""
    root = str(tmp_path_factory.mktemp('data') / 'demo_coco')
    old = os.environ.get('MMTUNE_DEMO_DATA')
    os.environ['MMTUNE_DEMO_DATA'] = root
    yield dict(os.environ)
    if old is None:
        del os.environ['MMTUNE_DEMO_DATA']
    else:
        os.environ['MMTUNE_DEMO_DATA'] = old


@pytest.fixture(scope='module')
def check_tool():
    """The check tool imported as a module (its main() returns the status)."""
    path = osp.join(TOOLS, 'check_fast_conv_bn_eval.py')
    spec = importlib.util.spec_from_file_location('check_tool', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_demo_cpu(tmp_path, demo_env):
    out = tmp_path / 'out'
    proc = subprocess.run(
        [
            sys.executable,
            osp.join(TOOLS, 'benchmark_fast_conv_bn_eval.py'),
            DEMO,
            '--steps',
            '2',
            '--warmup',
            '1',
            '--round-steps',
            '1',
            '--batch-size',
            '1',
            '--device',
            'cpu',
            '--out-dir',
            str(out),
            *SMALL_DEMO,
        ],
        cwd=REPO,
        env=demo_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    log = proc.stdout
    assert 'batch: CocoDataset (train dataloader)' in log
    for key in ('torch:', 'device_name:', 'precision: fp32'):
        assert key in log
    assert '| mode | saved for backward (MiB) | ratio to eval |' in log

    record = json.loads((out / 'benchmark.json').read_text())
    assert record['environment']['batch_shape'] == [1, 3, 64, 96]
    results = {r['mode']: r for r in record['results']}
    assert list(results) == ['eval', 'tune', 'mmengine']
    for mode, result in results.items():
        assert result['error'] is None, (mode, result['error'])
        assert len(result['step_ms']) == 2
        assert result['memory']['saved_for_backward_mib'] > 0
    assert results['eval']['pairs_converted'] == 0
    # ResNet-18: 20 Conv+BN pairs; mmengine's rewrite covers the backbone
    assert results['tune']['pairs_converted'] == 20
    assert results['mmengine']['pairs_converted'] == 20

    table = (out / 'benchmark.md').read_text()
    assert '| tune |' in table and 'Command: `python' in table
    png = (out / 'benchmark.png').read_bytes()
    assert png.startswith(b'\x89PNG') and len(png) > 1000


def test_check_passes_on_demo(check_tool, demo_env, capsys):
    status = check_tool.main([DEMO, '--batch-size', '1', *SMALL_DEMO])
    log = capsys.readouterr().out
    assert status == 0, log[-5000:]
    assert 'batch: CocoDataset (train dataloader)' in log
    assert '20 Conv+BN pairs converted, 0 skipped' in log
    assert 'run-time check: 20 Conv->BN pairs computed, 20 of them ' in log
    assert log.count(': match') == 3
    assert 'OK: tune mode matches eval mode' in log
    assert '20 of 20 converted pairs folded at every call' in log


def test_check_fails_on_a_wrong_fold(check_tool, monkeypatch, capsys):
    fold = tune_mode.fold_modules

    def wrong_fold(*args, **kwargs):
        folded = fold(*args, **kwargs)
        return folded._replace(bias=folded.bias + 1e-3)

    monkeypatch.setattr(tune_mode, 'fold_modules', wrong_fold)
    status = check_tool.main([CLS, '--batch-size', '2', *SMALL_CLS])
    log = capsys.readouterr().out
    assert status == 1, log[-5000:]
    assert "mode='tensor': output 0: relative error" in log
    assert "mode='loss': loss: relative error" in log
    assert 'FAILED' in log


def test_check_fails_when_a_converted_pair_never_folds(
    check_tool, monkeypatch, capsys
):
    monkeypatch.setattr(tune_mode, 'chain_matches', lambda *args: False)
    status = check_tool.main([CLS, '--batch-size', '2', *SMALL_CLS])
    log = capsys.readouterr().out
    assert status == 1, log[-5000:]
    assert ': match' in log and 'MISMATCH' not in log  # values are right
    assert 'converted pairs never folded in these passes' in log
    assert 'called from outside the forward that the analysis traced' in log


def test_check_batched_folding_on_the_cpu(check_tool, demo_env, capsys):
    """``--batch on``: the GPU's batched path, checked on a CPU."""
    status = check_tool.main(
        [DEMO, '--batch-size', '1', '--batch', 'on', *SMALL_DEMO]
    )
    log = capsys.readouterr().out
    assert status == 0, log[-5000:]
    assert log.count(': match') == 3
    assert '20 of 20 converted pairs folded at every call' in log


def test_a_loss_that_is_zero_up_to_round_off_is_not_a_mismatch(check_tool):
    """A per-level loss of -1e-10 (no positives at that level) next to a
    sum of 112: off by 3e-16, that is 3e-6 of itself and nothing of the
    pass; a real difference still is a mismatch."""

    def t(value):
        return torch.tensor(value, dtype=torch.float64)

    ref = ({'sum': t(112.6), 'level4': t(-1.0924e-10)}, {})
    close = ({'sum': ref[0]['sum'], 'level4': t(-1.0924e-10 - 2.8e-16)}, {})
    assert (
        check_tool.relative_error(close[0]['level4'], ref[0]['level4']) > 1e-6
    )
    assert check_tool.compare_passes(ref, close, 1e-6)[0] == []
    far = ({'sum': ref[0]['sum'], 'level4': t(3e-3)}, {})
    (problem,), _ = check_tool.compare_passes(ref, far, 1e-6)
    assert problem.startswith('level4: relative error')


def test_check_classifier_and_bad_arguments(check_tool, capsys):
    status = check_tool.main([CLS, '--dtype', 'float32', *SMALL_CLS])
    log = capsys.readouterr().out
    assert status == 0, log[-5000:]
    assert 'synthetic 32x32 (asked for)' in log
    assert 'rtol: 0.001' in log
    assert check_tool.main([CLS, '--rtol', '-1']) == 2
    assert check_tool.main([CLS, '--dtype', 'float16']) == 2
    assert check_tool.main(['no/such/config.py']) == 2


def _run_tool(script, *args):
    """Run a tool in a subprocess; its stdout, after checking it exits 0."""
    proc = subprocess.run(
        [sys.executable, osp.join(TOOLS, script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_profile_tool_cpu():
    out = _run_tool(
        'profile_fast_conv_bn_eval.py',
        CLS,
        '--device',
        'cpu',
        '--steps',
        '1',
        '--rows',
        '3',
        '--modes',
        'eval',
        'tune',
        'fold-floor',
        '--cfg-options',
        'synthetic_input.img_size=(32,32)',
        *SMALL_CLS[4:],
    )
    for mode in ('eval', 'tune', 'fold-floor'):
        assert f'##### {mode}: GPU kernel time per step' in out


def test_host_overhead_tool_cpu():
    out = _run_tool(
        'benchmark_host_overhead.py',
        '--steps',
        '2',
        '--device',
        'cpu',
        '--breakdown',
    )
    for mode in ('eval', 'tune', 'tune-alone', 'fold-floor'):
        assert f'| {mode} |' in out
    for mode in ('tune-unchecked', 'tune-kept', 'tune-prefolded'):
        assert f'| {mode} |' in out
    assert '| eval | ' in out and ' | 1.00 |' in out
    assert '| the fold, forward and backward (tune-kept - ' in out
    assert '| per-call Python: checks, conv wrapper, BN pass-through' in out


def test_host_overhead_prefolded_leaves_train_where_the_fold_would():
    """tune-prefolded stands for tune mode without its fold: its leaves
    train only where the fold's outputs do (not the frozen stages), and
    lose their gradients after each step, as parameters do."""
    path = osp.join(TOOLS, 'benchmark_host_overhead.py')
    spec = importlib.util.spec_from_file_location('host_tool', path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    model = tool.build('tune-prefolded', 2, 'cpu')
    x = torch.randn(2, 3, 32, 32)
    with tool._variant('tune-prefolded'):
        for _ in range(2):
            tool.step(model, x)
    leaves = list(tool._PREFOLDED.values())
    assert len(leaves) == 53
    frozen = [f for f in leaves if not f.weight.requires_grad]
    assert len(frozen) == 11  # the stem and layer1: frozen_stages=1
    assert all(not f.bias.requires_grad for f in frozen)
    assert all(f.weight.grad is None and f.bias.grad is None for f in leaves)


def test_count_host_launches_tool_cpu():
    out = _run_tool('count_host_launches.py', '--device', 'cpu')
    for mode in ('eval', 'tune', 'fold-floor'):
        assert f'{mode}: kernel launches per step 0, aten calls ' in out
    assert 'one fold of the batch, host time: ' in out


def test_memory_timeline_tool_cpu():
    out = _run_tool(
        'memory_timeline_fast_conv_bn_eval.py',
        '--batch-size',
        '1',
        '--img-size',
        '32',
    )
    rows = {
        line.split(' | ')[0].lstrip('| '): line
        for line in out.splitlines()
        if line.startswith('| ')
    }
    for mode in ('eval', 'fold-floor', 'pair by pair'):
        assert mode in rows, out
    # batched for real: the backbone, the module the step calls, is on
    assert 'batched (2 batch folds)' in rows, out


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(
        name, osp.join(TOOLS, f'{name}.py')
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_at_peak_replays_a_trace():
    """The peak of a step's own allocations and what is alive then, from
    an allocator trace (frees of earlier allocations lower the count)."""
    tool = _load_tool('memory_at_peak_fast_conv_bn_eval')
    trace = [
        dict(action='alloc', addr=1, size=100),
        dict(action='alloc', addr=2, size=50),
        dict(action='free_requested', addr=1, size=100),
        dict(action='free_completed', addr=1, size=100),
        dict(action='free_completed', addr=9, size=30),  # from before
        dict(action='alloc', addr=3, size=50),
        dict(action='alloc', addr=4, size=70),
        dict(action='free_completed', addr=3, size=50),
    ]
    peak, sizes = tool._alive_at_trace_peak(trace)
    assert peak == 150  # 100 + 50, before 50 + 50 + 70 - 30 = 140
    assert sizes == {100: 1, 50: 1}
    a = dict(mode='mmengine', sizes=sizes)
    b = dict(mode='tune', sizes={100: 1, 50: 3})
    table = tool.size_diff(a, b)
    assert '| 50 | +0.000 | 3 | 1 |' in table


@pytest.mark.skipif(
    __import__('torch').cuda.is_available(), reason='checks the CPU error'
)
def test_memory_at_peak_needs_cuda():
    proc = subprocess.run(
        [
            sys.executable,
            osp.join(TOOLS, 'memory_at_peak_fast_conv_bn_eval.py'),
            DEMO,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert 'needs a CUDA device' in proc.stderr
