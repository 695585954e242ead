# Copyright (c) mmtune contributors. All rights reserved.
"""tools/analysis_tools/benchmark_workloads.py: the aggregation on made-up
``benchmark.json`` records, one real run on the CPU (the classifier
workload, made a ResNet-18 on 2 images of 32x32, twice), and the eleven
workloads' configs build their models.
"""

import importlib.util
import json
import os.path as osp

import pytest

pytest.importorskip('mmdet')

from mmtune.testing import SMALL_CLASSIFIER_ARGS, run_python  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
RUNNER = osp.join(REPO, 'tools', 'analysis_tools', 'benchmark_workloads.py')
MODES = ['eval', 'tune', 'fold-floor', 'mmengine']


def _load_runner():
    spec = importlib.util.spec_from_file_location(
        'benchmark_workloads', RUNNER
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bw = _load_runner()


def record(**modes):
    """A benchmark.json as the tool writes it on CUDA: ``mode=(step peak
    MiB, absolute peak MiB, median step ms)`` or ``mode='error text'``."""
    results = []
    for mode, value in modes.items():
        mode = mode.replace('_', '-')
        if isinstance(value, str):
            results.append(
                dict(mode=mode, error=value, memory={}, median_step_ms=None)
            )
            continue
        step_peak, absolute, ms = value
        results.append(
            dict(
                mode=mode,
                error=None,
                memory=dict(
                    step_peak_mib=step_peak, absolute_peak_mib=absolute
                ),
                median_step_ms=ms,
            )
        )
    return dict(
        results=results,
        environment=dict(
            device_name='Some GPU', batch_shape=[2, 3, 800, 1344], torch='2.x'
        ),
    )


def ok(rep, rec):
    return dict(rep=rep, record=rec, returncode=0, stderr_tail='')


WORKLOAD = dict(
    name='frcnn_r50_b2',
    title='Faster R-CNN R50-FPN, b2, fp32',
    config='faster-rcnn_r50_fpn_finetune_coco.py',
    amp='none',
    paper=22.15,
)


def test_run_ratios():
    numbers = bw.run_ratios(
        record(
            eval=(1000.0, 1200.0, 100.0),
            tune=(700.0, 900.0, 110.0),
            mmengine='failed: RuntimeError: boom',
        )
    )
    assert numbers['memory_key'] == 'step_peak_mib'
    assert numbers['saving_key'] == 'absolute_peak_mib'
    tune = numbers['modes']['tune']
    assert tune['memory_ratio'] == pytest.approx(0.7)
    assert tune['time_ratio'] == pytest.approx(1.1)
    assert numbers['modes']['eval']['memory_ratio'] == pytest.approx(1.0)
    assert numbers['tune_saving_pct'] == pytest.approx(25.0)  # 1 - 900/1200
    failed = numbers['modes']['mmengine']
    assert failed['error'] == 'failed: RuntimeError: boom'
    assert failed['memory_ratio'] is None and failed['time_ratio'] is None
    # on the CPU: saved for backward, also for the saving
    cpu = dict(
        results=[
            dict(
                mode='eval',
                error=None,
                memory=dict(saved_for_backward_mib=200.0),
                median_step_ms=50.0,
            ),
            dict(
                mode='tune',
                error=None,
                memory=dict(saved_for_backward_mib=150.0),
                median_step_ms=60.0,
            ),
        ]
    )
    numbers = bw.run_ratios(cpu)
    assert numbers['memory_key'] == numbers['saving_key']
    assert numbers['modes']['tune']['memory_ratio'] == pytest.approx(0.75)
    assert numbers['tune_saving_pct'] == pytest.approx(25.0)


def test_summarize_and_format():
    assert bw.summarize([None, None]) is None
    s = bw.summarize([0.9, None, 0.7, 0.8])
    assert (s['median'], s['min'], s['max'], s['n']) == (0.8, 0.7, 0.9, 3)
    assert bw.format_spread(s) == '0.80 (0.70-0.90)'
    assert bw.format_spread(bw.summarize([0.5])) == '0.50'
    assert bw.format_spread(None) == ''
    neg = bw.summarize([-2.0, -1.0])
    assert bw.format_spread(neg, '{:.1f}', '%') == '-1.5% (-2.0 to -1.0)'


def test_aggregate_medians_and_spreads():
    runs = [
        ok(1, record(eval=(1000, 1200, 100), tune=(700, 900, 120))),
        ok(2, record(eval=(1000, 1200, 200), tune=(720, 960, 200))),
        ok(3, record(eval=(1000, 1200, 100), tune=(710, 840, 90))),
    ]
    agg = bw.aggregate_workload(WORKLOAD, runs, ['eval', 'tune'])
    assert agg['ok_runs'] == 3 and agg['failed_runs'] == 0
    assert agg['batch_shape'] == [2, 3, 800, 1344]
    tune = agg['modes']['tune']
    assert tune['memory_ratio']['median'] == pytest.approx(0.71)
    assert tune['memory_ratio']['min'] == pytest.approx(0.70)
    assert tune['memory_ratio']['max'] == pytest.approx(0.72)
    # time ratios 1.2, 1.0, 0.9: per run, then the median
    assert tune['time_ratio']['median'] == pytest.approx(1.0)
    assert tune['time_ratio']['min'] == pytest.approx(0.9)
    assert tune['time_ratio']['max'] == pytest.approx(1.2)
    # savings 25, 20, 30 %
    saving = agg['tune_saving_pct']
    assert (saving['median'], saving['min'], saving['max']) == pytest.approx(
        (25.0, 20.0, 30.0)
    )
    assert agg['modes']['eval']['median_step_ms']['median'] == 100
    table = bw.markdown_table([agg], ['eval', 'tune'])
    lines = table.splitlines()
    assert lines[0].startswith('| workload | batch | eval memory (MiB) |')
    assert len(lines) == 3
    row = lines[2]
    assert row.startswith('| Faster R-CNN R50-FPN, b2, fp32 | 2x3x800x1344 |')
    assert '| 0.71 (0.70-0.72) | 1.00 (0.90-1.20) |' in row
    assert '| 25.0% (20.0-30.0) | 22.15% |' in row
    assert not bw.any_failure([agg])
    assert bw.failures_section([agg]) == ''


def test_aggregate_shows_failures():
    traceback = 'Traceback (most recent call last):\n  ...\nValueError: bad|x'
    runs = [
        ok(1, record(eval=(1000, 1200, 100), tune='failed: ValueError: x')),
        dict(rep=2, record=None, returncode=1, stderr_tail=traceback),
    ]
    agg = bw.aggregate_workload(WORKLOAD, runs, ['eval', 'tune'])
    assert agg['failed_runs'] == 1 and agg['ok_runs'] == 1
    assert agg['mode_errors'] == {'tune': ['failed: ValueError: x']}
    assert agg['runs'][1]['error'].startswith('exit status 1:')
    assert bw.any_failure([agg])
    row = bw.markdown_table([agg], ['eval', 'tune']).splitlines()[2]
    assert '(1 of 2 runs failed)' in row
    assert '| failed | failed |' in row  # the tune mode, in its only run
    section = bw.failures_section([agg])
    assert 'ValueError: bad|x' in section  # in full, in a code block
    assert 'frcnn_r50_b2, mode tune: failed: ValueError: x' in section

    # a workload whose every run failed: one row with the error's end
    other = dict(WORKLOAD, name='x', title='X', paper=None)
    failed = bw.aggregate_workload(
        other,
        [dict(rep=1, record=None, returncode=2, stderr_tail=traceback)],
        MODES,
    )
    table = bw.markdown_table([agg, failed], MODES)
    row = table.splitlines()[3]
    assert row.startswith(
        '| X (1 of 1 runs failed) |  | failed: exit status 2'
    )
    assert 'ValueError: bad\\|x' in row  # one line, the pipe escaped
    assert row.endswith('| - |')
    assert row.count(' | ') == table.splitlines()[0].count(' | ')


def test_floor_table_pairs_runs():
    runs = [
        ok(
            1,
            record(
                eval=(1000, 1, 100),
                tune=(700, 1, 120),
                fold_floor=(700, 1, 100),
            ),
        ),
        ok(
            2,
            record(
                eval=(1000, 1, 100),
                tune=(707, 1, 90),
                fold_floor=(700, 1, 100),
            ),
        ),
        ok(
            3,
            record(
                eval=(1000, 1, 100),
                tune=(700, 1, 100),
                fold_floor=(700, 1, 50),
            ),
        ),
    ]
    modes = ['eval', 'tune', 'fold-floor']
    agg = bw.aggregate_workload(WORKLOAD, runs, modes)
    (row,) = bw.floor_table([agg], modes).splitlines()[2:]
    # per run: memory 1, 1.01, 1; time 1.2, 0.9, 2.0 (not 1.0 / 1.0,
    # the medians' ratio); against eval 1.2, 0.9, 1.0
    assert row == (
        '| frcnn_r50_b2 | 1.0000 (1.0000-1.0100) | 1.20 (0.90-2.00) '
        '| 1.00 (0.90-1.20) |'
    )
    assert bw.floor_table([agg], ['eval', 'tune']) == ''
    # a run without fold-floor: the runs cannot be paired
    runs[1] = ok(2, record(eval=(1000, 1, 100), tune=(707, 1, 90)))
    agg = bw.aggregate_workload(WORKLOAD, runs, modes)
    (row,) = bw.floor_table([agg], modes).splitlines()[2:]
    assert row == '| frcnn_r50_b2 | n/a | n/a | 1.00 (0.90-1.20) |'


def _write_part(path, names, steps=10, torch_version='2.x'):
    aggregates = [
        bw.aggregate_workload(
            dict(WORKLOAD, name=name, title=name),
            [ok(1, record(eval=(1000, 1, 100), tune=(700, 1, 110)))],
            ['eval', 'tune'],
        )
        for name in names
    ]
    settings = dict(
        command=f'part {path.name}',
        repeats=1,
        steps=steps,
        warmup=3,
        modes=['eval', 'tune'],
        device='cuda',
        extra=[],
    )
    env = dict(torch=torch_version, device_name='Some GPU', batch_shape=[1])
    path.write_text(
        json.dumps(
            dict(settings=settings, environment=env, workloads=aggregates)
        )
    )
    return str(path)


def test_merge_parts(tmp_path, capsys):
    first = _write_part(tmp_path / 'a.json', ['rn50_cls_b64_fp32', 'x'])
    second = _write_part(
        tmp_path / 'b.json', ['frcnn_r50_b2', 'rn50_cls_b64_fp32']
    )
    out = tmp_path / 'merged'
    assert bw.main(['--merge', first, second, '--out-dir', str(out)]) == 0
    data = json.loads((out / 'workloads.json').read_text())
    # the order of WORKLOADS, unknown names last, a workload once
    names = [a['name'] for a in data['workloads']]
    assert names == ['frcnn_r50_b2', 'rn50_cls_b64_fp32', 'x']
    assert data['settings']['parts'] == ['part a.json', 'part b.json']
    text = (out / 'workloads.md').read_text()
    assert 'Command: `part a.json`, merged, `part b.json`' in text
    # parts made with other settings or on another stack: refused, named
    for bad in (
        _write_part(tmp_path / 'c.json', ['x'], steps=5),
        _write_part(tmp_path / 'd.json', ['x'], torch_version='2.y'),
    ):
        assert bw.main(['--merge', first, bad, '--out-dir', str(out)]) == 2
        err = capsys.readouterr().err
        assert bad in err and ('steps is 5' in err or "'2.y'" in err), err


def test_cli_end_to_end_cpu(tmp_path):
    out = tmp_path / 'out'
    text = run_python(
        [
            RUNNER,
            '--only',
            'rn50_cls_b64_fp32',
            '--repeats',
            '2',
            '--steps',
            '1',
            '--warmup',
            '1',
            '--device',
            'cpu',
            '--out-dir',
            str(out),
            # passed through to benchmark_fast_conv_bn_eval.py
            '--batch-size',
            '2',
            # a ResNet-18 on 10 classes: a quicker build and step
            *SMALL_CLASSIFIER_ARGS,
        ],
        cwd=REPO,
        timeout=240,
    )
    assert '[rep 2/2] rn50_cls_b64_fp32: ok' in text
    text = (out / 'workloads.md').read_text()
    table, floor = text.split('Tune mode against deploy-mode cost')
    floor_rows = [line for line in floor.splitlines() if line.startswith('|')]
    assert floor_rows[0].startswith('| workload | tune / fold-floor step')
    assert floor_rows[2].startswith('| rn50_cls_b64_fp32 | ')
    assert 'n/a' not in floor_rows[2]
    rows = [line for line in table.splitlines() if line.startswith('| ')]
    assert rows[1].startswith('| --- |')
    del rows[1]
    assert rows[0].startswith('| workload | batch |')
    assert 'fold-floor memory' in rows[0] and 'mmengine time' in rows[0]
    assert len(rows) == 2
    assert rows[1].startswith('| ResNet-50 cls 224, b64, fp32 | 2x3x32x32 |')
    assert 'failed' not in rows[1]
    data = json.loads((out / 'workloads.json').read_text())
    (agg,) = data['workloads']
    assert agg['name'] == 'rn50_cls_b64_fp32' and agg['ok_runs'] == 2
    assert agg['modes']['tune']['time_ratio']['n'] == 2
    for rep in (1, 2):
        run_dir = out / 'rn50_cls_b64_fp32' / f'rep{rep}'
        assert (run_dir / 'benchmark.json').is_file()
        assert (
            json.loads((run_dir / 'run.json').read_text())['returncode'] == 0
        )


@pytest.mark.parametrize(
    'workload', bw.WORKLOADS, ids=[w['name'] for w in bw.WORKLOADS]
)
def test_workload_config_builds(workload):
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from torch.nn.modules.batchnorm import _BatchNorm

    import mmtune  # noqa: F401  (the configs' custom_imports)

    register_all_modules()
    path = osp.join(bw.CONFIGS, workload['config'])
    cfg = Config.fromfile(path)
    backbone = cfg.model.backbone
    assert backbone.init_cfg is None and backbone.norm_eval is True
    batch = int(workload['title'].split(', b')[1].split(',')[0])
    assert cfg.train_dataloader.batch_size == batch
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).train()
    bns = [m for m in model.backbone.modules() if isinstance(m, _BatchNorm)]
    assert bns and not any(bn.training for bn in bns)
