# Copyright (c) mmtune contributors. All rights reserved.
"""Benchmark tune mode on eleven workloads, several times each, in one table.

    python tools/analysis_tools/benchmark_workloads.py \\
        [--repeats 3] [--steps 15] [--warmup 3] [--only NAME ...] \\
        [--modes eval tune fold-floor mmengine] [--device cuda|cpu] \\
        [--out-dir DIR] [--timeout S] [--resume] [--list] \\
        [EXTRA ARGS of benchmark_fast_conv_bn_eval.py ...]

Runs ``tools/analysis_tools/benchmark_fast_conv_bn_eval.py`` in a fresh
process once per workload and repetition (repetition after repetition, each
going through all workloads, so that drift hits every workload alike) and
aggregates the runs' ``benchmark.json``: for every mode its step peak
memory (on the CPU: the bytes saved for backward) and its median step time
as ratios to eval mode in the same run, ``median (min-max)`` over the
repetitions, and the saving of tune mode's absolute peak memory against eval
mode's in percent, next to the saving the tune-mode paper reports
(arXiv 2305.11624) for the detectors.

The workloads (``--list`` prints them; ``--only`` picks some by name):
Faster R-CNN R50-FPN at batch 2 and 8, RetinaNet R50-FPN, Mask R-CNN
R50-FPN, Faster R-CNN R101-FPN, X101-64x4d-FPN, RegNetX-3.2GF-FPN and
HRNetV2p-W32 at batch 2 in fp32, Mask R-CNN R101-FPN at batch 16 in fp16,
and the ResNet-50 classifier at batch 64 in fp32 and bf16; configs in
``configs/benchmark``.

Arguments the runner does not know go to every run of the benchmark tool,
after the runner's own (so they override them), e.g. ``--batch-size 2
--img-size 64 64`` or ``--cudnn-benchmark``.

Writes ``workloads.md`` (the table) and ``workloads.json`` (the aggregated
numbers and every run's status) to ``--out-dir`` after every run, and each
run's output under ``OUT_DIR/<workload>/rep<k>/`` (the tool's
``benchmark.md/.json/.png``, ``stdout.log``, ``stderr.log``, ``run.json``).
A run that fails is shown in the table with the last lines of its stderr and
the others go on. ``--resume`` keeps the runs that already succeeded in
``--out-dir`` (to split the work over several commands, or to re-make the
table). ``--merge A/workloads.json B/workloads.json ...`` runs nothing: it
writes one table of the workloads of several such files (parts run on
machines whose run directories did not come back), a later file's workload
replacing an earlier one's. Exit status 1 if a run or a mode failed.

Below the table, where tune and fold-floor both ran: tune mode against
deploy-mode cost, per run (tune / fold-floor step peak and median step,
tune / eval median step), median (min-max) over the runs.
"""

import argparse
import json
import os
import os.path as osp
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOL = osp.join(
    REPO, 'tools', 'analysis_tools', 'benchmark_fast_conv_bn_eval.py'
)
CONFIGS = osp.join(REPO, 'configs', 'benchmark')
DEFAULT_MODES = ('eval', 'tune', 'fold-floor', 'mmengine')
BASELINE = 'eval'

# name, config in configs/benchmark, precision (--amp), what it is, and the
# peak memory saving of tune mode the paper reports (Tune-Mode ConvBN
# Blocks for Efficient Transfer Learning, arXiv 2305.11624), in percent
WORKLOADS: List[Dict[str, Any]] = [
    dict(
        name='frcnn_r50_b2',
        config='faster-rcnn_r50_fpn_finetune_coco.py',
        amp='none',
        title='Faster R-CNN R50-FPN, b2, fp32',
        paper=22.15,
    ),
    dict(
        name='frcnn_r50_b8',
        config='faster-rcnn_r50_fpn_8xb8_finetune_coco.py',
        amp='none',
        title='Faster R-CNN R50-FPN, b8, fp32',
        paper=None,
    ),
    dict(
        name='retina_r50_b2',
        config='retinanet_r50_fpn_finetune_coco.py',
        amp='none',
        title='RetinaNet R50-FPN, b2, fp32',
        paper=23.59,
    ),
    dict(
        name='mask_r50_b2',
        config='mask-rcnn_r50_fpn_finetune_coco.py',
        amp='none',
        title='Mask R-CNN R50-FPN, b2, fp32',
        paper=19.85,
    ),
    dict(
        name='frcnn_r101_b2',
        config='faster-rcnn_r101_fpn_finetune_coco.py',
        amp='none',
        title='Faster R-CNN R101-FPN, b2, fp32',
        paper=27.65,
    ),
    dict(
        name='frcnn_x101_b2',
        config='faster-rcnn_x101-64x4d_fpn_finetune_coco.py',
        amp='none',
        title='Faster R-CNN X101-64x4d-FPN, b2, fp32',
        paper=31.62,
    ),
    dict(
        name='frcnn_regnetx_b2',
        config='faster-rcnn_regnetx-3.2GF_fpn_finetune_coco.py',
        amp='none',
        title='Faster R-CNN RegNetX-3.2GF-FPN, b2, fp32',
        paper=28.06,
    ),
    dict(
        name='frcnn_hrnet_b2',
        config='faster-rcnn_hrnetv2p-w32_finetune_coco.py',
        amp='none',
        title='Faster R-CNN HRNetV2p-W32, b2, fp32',
        paper=35.76,
    ),
    dict(
        name='mask_r101_b16_fp16',
        config='mask-rcnn_r101_fpn_8xb16-amp_finetune_coco.py',
        amp='fp16',
        title='Mask R-CNN R101-FPN, b16, fp16',
        paper=27.08,
    ),
    dict(
        name='rn50_cls_b64_fp32',
        config='resnet50_8xb64_finetune-cls-224.py',
        amp='none',
        title='ResNet-50 cls 224, b64, fp32',
        paper=None,
    ),
    dict(
        name='rn50_cls_b64_bf16',
        config='resnet50_8xb64_finetune-cls-224.py',
        amp='bf16',
        title='ResNet-50 cls 224, b64, bf16',
        paper=None,
    ),
]
WORKLOAD_NAMES = [w['name'] for w in WORKLOADS]


# ---------------------------------------------------------------------------
# aggregation (plain functions on the tool's benchmark.json records)
# ---------------------------------------------------------------------------
def load_record(out_dir: str) -> Optional[dict]:
    """The ``benchmark.json`` of one run, or None if there is none."""
    path = osp.join(out_dir, 'benchmark.json')
    if not osp.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def memory_key(record: dict) -> str:
    """The memory figure the run has for every mode that has one:
    ``step_peak_mib`` on CUDA, ``saved_for_backward_mib`` on the CPU."""
    for key in ('step_peak_mib', 'saved_for_backward_mib'):
        if any(key in (r.get('memory') or {}) for r in record['results']):
            return key
    return 'step_peak_mib'


def saving_key(record: dict) -> str:
    """The memory figure of the absolute saving: ``absolute_peak_mib`` on
    CUDA, else the same as :func:`memory_key`."""
    if any(
        'absolute_peak_mib' in (r.get('memory') or {})
        for r in record['results']
    ):
        return 'absolute_peak_mib'
    return memory_key(record)


def _div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or not b:
        return None
    return a / b


def run_ratios(record: dict, baseline: str = BASELINE) -> dict:
    """The numbers of one run (one ``benchmark.json``).

    Returns:
        dict: ``modes``: per mode ``memory_mib``, ``median_step_ms``,
        ``memory_ratio`` and ``time_ratio`` (to ``baseline`` in the same
        run; None where a figure is missing) and ``error``;
        ``tune_saving_pct``: ``100 * (1 - tune / baseline)`` of the
        absolute peak memory (:func:`saving_key`), or None;
        ``memory_key`` and ``saving_key``.
    """
    mem_key = memory_key(record)
    save_key = saving_key(record)
    by_mode = {r['mode']: r for r in record['results']}
    base = by_mode.get(baseline)
    if base is not None and base.get('error') is not None:
        base = None
    base_memory = (base or {}).get('memory') or {}
    base_mem = base_memory.get(mem_key)
    base_time = (base or {}).get('median_step_ms')
    modes = {}
    for mode, r in by_mode.items():
        memory = r.get('memory') or {}
        ok = r.get('error') is None
        mem = memory.get(mem_key) if ok else None
        ms = r.get('median_step_ms') if ok else None
        modes[mode] = dict(
            memory_mib=mem,
            median_step_ms=ms,
            saving_mib=memory.get(save_key) if ok else None,
            memory_ratio=_div(mem, base_mem),
            time_ratio=_div(ms, base_time),
            error=r.get('error'),
        )
    saving = None
    tune = modes.get('tune')
    if tune is not None and base is not None:
        ratio = _div(tune['saving_mib'], base_memory.get(save_key))
        if ratio is not None:
            saving = 100.0 * (1.0 - ratio)
    return dict(
        modes=modes,
        tune_saving_pct=saving,
        memory_key=mem_key,
        saving_key=save_key,
    )


def summarize(values: Sequence[Optional[float]]) -> Optional[dict]:
    """``median``, ``min``, ``max``, ``n`` and ``values`` of the values that
    are not None, or None if none is."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return dict(
        median=statistics.median(vals),
        min=min(vals),
        max=max(vals),
        n=len(vals),
        values=vals,
    )


def aggregate_workload(
    workload: dict, runs: Sequence[dict], modes: Sequence[str]
) -> dict:
    """Aggregate the repetitions of one workload.

    Args:
        workload: An entry of :data:`WORKLOADS` (``name``, ``title``,
            ``paper`` ...).
        runs: One dict per repetition: ``rep`` (int), ``record`` (the
            ``benchmark.json`` dict, or None), ``returncode`` and
            ``stderr_tail`` (str, the end of the run's stderr).
        modes: The modes asked for, the baseline first.

    Returns:
        dict: The workload's keys, ``runs`` (the status of each repetition:
        ``ok``, ``returncode``, ``error``), ``failed_runs``, ``mode_errors``
        (``{mode: [error, ...]}``), ``modes`` (``{mode: {memory_ratio,
        time_ratio, memory_mib, median_step_ms}}``, each a
        :func:`summarize` dict or None), ``tune_saving_pct`` and
        ``memory_key``/``saving_key``.
    """
    statuses = []
    per_run = []
    for run in runs:
        record = run.get('record')
        ok = run.get('returncode') == 0 and record is not None
        error = None
        if not ok:
            if run.get('returncode') == 0:
                error = 'no benchmark.json'
            else:
                error = f'exit status {run.get("returncode")}'
            if record is not None:  # the tool's status 1: no mode ran
                failed = [
                    f'{r["mode"]} {r["error"]}'
                    for r in record.get('results', [])
                    if r.get('error') is not None
                ]
                if failed:
                    error += ' (' + '; '.join(failed) + ')'
            tail = (run.get('stderr_tail') or '').strip()
            if tail:
                error += ':\n' + tail
        statuses.append(
            dict(
                rep=run.get('rep'),
                ok=ok,
                returncode=run.get('returncode'),
                out_dir=run.get('out_dir'),
            )
        )
        if error is not None:
            statuses[-1]['error'] = error
        if ok:
            per_run.append(run_ratios(record, modes[0] if modes else BASELINE))
    mode_errors: Dict[str, List[str]] = {}
    mode_summary = {}
    for mode in modes:
        entries = [r['modes'][mode] for r in per_run if mode in r['modes']]
        errors = [e['error'] for e in entries if e['error'] is not None]
        if errors:
            mode_errors[mode] = errors
        mode_summary[mode] = {
            key: summarize([e[key] for e in entries])
            for key in (
                'memory_ratio',
                'time_ratio',
                'memory_mib',
                'median_step_ms',
            )
        }
    keys = per_run[0] if per_run else {}
    env = next(
        (
            r['record'].get('environment') or {}
            for r in runs
            if r.get('returncode') == 0 and r.get('record') is not None
        ),
        {},
    )
    return dict(
        name=workload['name'],
        title=workload.get('title', workload['name']),
        config=workload.get('config'),
        amp=workload.get('amp'),
        paper_saving_pct=workload.get('paper'),
        batch_shape=env.get('batch_shape'),
        precision=env.get('precision'),
        runs=statuses,
        failed_runs=sum(not s['ok'] for s in statuses),
        ok_runs=len(per_run),
        mode_errors=mode_errors,
        modes=mode_summary,
        tune_saving_pct=summarize([r['tune_saving_pct'] for r in per_run]),
        memory_key=keys.get('memory_key'),
        saving_key=keys.get('saving_key'),
    )


def format_spread(
    summary: Optional[dict], fmt: str = '{:.2f}', suffix: str = ''
) -> str:
    """``median (min-max)`` (just the value for a single one), or ''."""
    if summary is None:
        return ''
    text = fmt.format(summary['median']) + suffix
    if summary['n'] > 1:
        low = fmt.format(summary['min'])
        high = fmt.format(summary['max'])
        dash = ' to ' if summary['min'] < 0 else '-'  # not '-6.0--4.0'
        text += f' ({low}{dash}{high})'
    return text


def _cell(text: str) -> str:
    """Text fit for a markdown table cell: one line, no pipes."""
    return ' / '.join(
        line.strip() for line in str(text).splitlines() if line.strip()
    ).replace('|', '\\|')


def markdown_table(aggregates: Sequence[dict], modes: Sequence[str]) -> str:
    """One row per workload: the baseline's memory and step time, each
    other mode's ratios to it, tune mode's absolute saving, the paper's."""
    base = modes[0] if modes else BASELINE
    others = [m for m in modes if m != base]
    head = ['workload', 'batch', f'{base} memory (MiB)', f'{base} step (ms)']
    for mode in others:
        head += [f'{mode} memory', f'{mode} time']
    head += ['tune saving (abs. peak)', 'paper saving']
    lines = [
        '| ' + ' | '.join(head) + ' |',
        '|' + '|'.join([' --- '] + [' ---: '] * (len(head) - 1)) + '|',
    ]
    for agg in aggregates:
        name = agg['title']
        total = len(agg['runs'])
        if agg['failed_runs']:
            name += f' ({agg["failed_runs"]} of {total} runs failed)'
        paper = agg.get('paper_saving_pct')
        paper_cell = '-' if paper is None else f'{paper:.2f}%'
        if not agg['ok_runs']:
            errors = [r['error'] for r in agg['runs'] if not r['ok']]
            cells = [name, '', _cell('failed: ' + _short(errors))]
            cells += [''] * (len(head) - 4) + [paper_cell]
            lines.append('| ' + ' | '.join(cells) + ' |')
            continue
        base_summary = agg['modes'].get(base, {})
        shape = agg.get('batch_shape')
        cells = [
            name,
            'x'.join(map(str, shape)) if shape else '',
            format_spread(base_summary.get('memory_mib'), '{:.0f}'),
            format_spread(base_summary.get('median_step_ms'), '{:.1f}'),
        ]
        for mode in others:
            summary = agg['modes'].get(mode, {})
            failed = mode in agg['mode_errors']
            mem = format_spread(summary.get('memory_ratio'))
            tm = format_spread(summary.get('time_ratio'))
            if failed and not tm:
                mem, tm = 'failed', 'failed'
            elif failed:
                tm += ' (failed in some runs)'
            cells += [mem or 'n/a', tm or 'n/a']
        cells.append(
            format_spread(agg['tune_saving_pct'], '{:.1f}', '%') or 'n/a'
        )
        cells.append(paper_cell)
        lines.append('| ' + ' | '.join(_cell(c) for c in cells) + ' |')
    return '\n'.join(lines)


def _per_run(agg: dict, mode: str, key: str) -> Optional[List[float]]:
    """``key``'s value of ``mode`` in every successful run, in run order, or
    None where a run lacks it (then runs cannot be paired)."""
    summary = (agg['modes'].get(mode) or {}).get(key)
    if summary is None or summary['n'] != agg['ok_runs']:
        return None
    return summary['values']


def _paired_ratio(agg: dict, key: str, mode: str, other: str) -> str:
    """``mode / other`` of ``key`` run by run, as :func:`format_spread`."""
    num, den = _per_run(agg, mode, key), _per_run(agg, other, key)
    if num is None or den is None:
        return 'n/a'
    fmt = '{:.4f}' if key == 'memory_mib' else '{:.2f}'
    return format_spread(summarize(map(_div, num, den)), fmt)


def floor_table(aggregates: Sequence[dict], modes: Sequence[str]) -> str:
    """Tune mode against deploy-mode cost: per workload, tune / fold-floor
    step peak and median step time and tune / baseline median step time,
    each paired run by run ('' unless tune and fold-floor both ran)."""
    base = modes[0] if modes else BASELINE
    if 'tune' not in modes or 'fold-floor' not in modes:
        return ''
    lines = [
        '| workload | tune / fold-floor step peak | tune / fold-floor median '
        f'step | tune / {base} median step |',
        '| --- | ---: | ---: | ---: |',
    ]
    for agg in aggregates:
        if not agg['ok_runs']:
            continue
        cells = [
            agg['name'],
            _paired_ratio(agg, 'memory_mib', 'tune', 'fold-floor'),
            _paired_ratio(agg, 'median_step_ms', 'tune', 'fold-floor'),
            _paired_ratio(agg, 'median_step_ms', 'tune', base),
        ]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def failures_section(aggregates: Sequence[dict]) -> str:
    """The errors of the failed runs and modes, in full, for below the
    table ('' if there are none)."""
    parts = []
    for agg in aggregates:
        for run in agg['runs']:
            if not run['ok']:
                parts += [
                    f'- {agg["name"]}, rep {run["rep"]}:',
                    '',
                    '```',
                    run['error'],
                    '```',
                ]
        for mode, errors in agg['mode_errors'].items():
            for error in dict.fromkeys(errors):
                parts.append(f'- {agg["name"]}, mode {mode}: {error}')
    if not parts:
        return ''
    return '\n'.join(['## Failures', ''] + parts)


def _short(errors: Sequence[str], n: int = 3) -> str:
    """The first line and the last ``n`` lines of the last error."""
    if not errors:
        return 'no run'
    lines = [line for line in errors[-1].splitlines() if line.strip()]
    if len(lines) <= n + 1:
        return '\n'.join(lines)
    return '\n'.join([lines[0], '...'] + lines[-n:])


def _tail_lines(text: str, n: int) -> str:
    lines = [line for line in (text or '').splitlines() if line.strip()]
    return '\n'.join(lines[-n:])


def any_failure(aggregates: Sequence[dict]) -> bool:
    return any(a['failed_runs'] or a['mode_errors'] for a in aggregates)


def report_markdown(
    aggregates: Sequence[dict],
    modes: Sequence[str],
    settings: dict,
    environment: Optional[dict] = None,
) -> str:
    """The whole ``workloads.md``: header, table, failures."""
    base = modes[0] if modes else BASELINE
    device = (environment or {}).get('device_name') or settings.get('device')
    mem_keys = {a['memory_key'] for a in aggregates if a['memory_key']}
    cpu = 'saved_for_backward_mib' in mem_keys
    memory = (
        'bytes autograd saves for backward in one training forward (CPU)'
        if cpu
        else 'peak allocated during one step minus what was allocated '
        'before it'
    )
    saving = (
        'of the same figure (no absolute peak on the CPU)'
        if cpu
        else 'of the absolute peak (peak minus what was allocated before '
        "the mode's model came to the GPU: weights, gradients and "
        'optimizer state count)'
    )
    commands = settings.get('parts') or [settings.get('command', '')]
    header = [
        f'# Tune mode on {len(aggregates)} workload(s): {device}',
        '',
        'Command: ' + ', merged, '.join(f'`{c}`' for c in commands),
        '',
        f'Each workload run {settings.get("repeats")} times by '
        f'tools/analysis_tools/benchmark_fast_conv_bn_eval.py, a fresh '
        f'process each time, modes {" ".join(modes)} interleaved within '
        f'the run, {settings.get("steps")} timed steps per mode after '
        f'{settings.get("warmup")} warm-up steps. Memory: {memory}; '
        f'{base} memory and step: the absolute figures. The other modes: '
        f'ratios to {base} in the same run, median (min-max) over the '
        f'runs; time: of the median step. Tune saving: 1 - tune / {base} '
        f'{saving}. Paper saving: the memory saving arXiv 2305.11624 '
        'reports for tune mode on the detector (its measurement may not be '
        'exactly this one).',
        '',
    ]
    if environment:
        keep = ('torch', 'cuda', 'cudnn', 'mmengine', 'mmdet', 'mmtune')
        env = ', '.join(
            f'{k}={environment[k]}' for k in keep if k in environment
        )
        header += [f'Environment: {env}', '']
    parts = header + [markdown_table(aggregates, modes), '']
    floor = floor_table(aggregates, modes)
    if floor:
        parts += [
            'Tune mode against deploy-mode cost, ratios paired run by run, '
            'median (min-max):',
            '',
            floor,
            '',
        ]
    failures = failures_section(aggregates)
    if failures:
        parts += [failures, '']
    return '\n'.join(parts)


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------
def _read_tail(path: str, n: int) -> str:
    try:
        with open(path, errors='replace') as f:
            return _tail_lines(f.read(), n)
    except OSError:
        return ''


def run_dir(out_dir: str, name: str, rep: int) -> str:
    return osp.join(out_dir, name, f'rep{rep}')


def tool_command(workload: dict, args, out: str) -> List[str]:
    return [
        sys.executable,
        TOOL,
        osp.join(CONFIGS, workload['config']),
        '--device',
        args.device,
        '--amp',
        workload['amp'],
        '--modes',
        *args.modes,
        '--steps',
        str(args.steps),
        '--warmup',
        str(args.warmup),
        '--out-dir',
        out,
        *args.extra,
    ]


def run_one(workload: dict, rep: int, args) -> dict:
    """Run the benchmark tool once (or reuse a finished run with
    ``--resume``); returns the run dict :func:`aggregate_workload` takes."""
    out = run_dir(args.out_dir, workload['name'], rep)
    status_path = osp.join(out, 'run.json')
    if args.resume and osp.isfile(status_path):
        with open(status_path) as f:
            status = json.load(f)
        record = load_record(out)
        if status.get('returncode') == 0 and record is not None:
            return dict(
                rep=rep,
                record=record,
                returncode=0,
                stderr_tail='',
                out_dir=out,
                reused=True,
            )
    os.makedirs(out, exist_ok=True)
    for stale in ('benchmark.json', 'run.json'):
        if osp.exists(osp.join(out, stale)):
            os.remove(osp.join(out, stale))
    cmd = tool_command(workload, args, out)
    stdout_path = osp.join(out, 'stdout.log')
    stderr_path = osp.join(out, 'stderr.log')
    start = time.perf_counter()
    with open(stdout_path, 'w') as stdout, open(stderr_path, 'w') as stderr:
        try:
            returncode = subprocess.run(
                cmd, stdout=stdout, stderr=stderr, timeout=args.timeout
            ).returncode
        except subprocess.TimeoutExpired:
            returncode = 124
            stderr.write(
                f'\n[benchmark_workloads] killed after {args.timeout} s\n'
            )
    wall = time.perf_counter() - start
    with open(status_path, 'w') as f:
        json.dump(
            dict(command=shlex.join(cmd), returncode=returncode, wall_s=wall),
            f,
            indent=2,
        )
    tail = _read_tail(stderr_path, args.tail_lines)
    if not tail and returncode != 0:
        tail = _read_tail(stdout_path, args.tail_lines)
    return dict(
        rep=rep,
        record=load_record(out),
        returncode=returncode,
        stderr_tail=tail,
        out_dir=out,
        wall_s=wall,
    )


def _progress(workload: dict, rep: int, args, run: dict) -> str:
    where = f'[rep {rep}/{args.repeats}] {workload["name"]}'
    if run.get('reused'):
        return (
            f'{where}: reused ({run_dir(args.out_dir, workload["name"], rep)})'
        )
    wall = f'{run.get("wall_s", 0):.0f} s'
    if run['returncode'] != 0 or run['record'] is None:
        last = _tail_lines(run['stderr_tail'], 1)
        return f'{where}: FAILED (exit {run["returncode"]}, {wall}): {last}'
    numbers = run_ratios(run['record'], args.modes[0])
    tune = numbers['modes'].get('tune') or {}
    text = f'{where}: ok in {wall}'
    if tune.get('memory_ratio') is not None:
        text += f', tune memory {tune["memory_ratio"]:.2f}'
    if tune.get('time_ratio') is not None:
        text += f', time {tune["time_ratio"]:.2f}'
    errors = [m for m, e in numbers['modes'].items() if e['error']]
    if errors:
        text += f', FAILED modes: {" ".join(errors)}'
    return text


def write_outputs(
    workloads: Sequence[dict], runs: Dict[str, List[dict]], args
) -> str:
    """Aggregate what has run so far and write workloads.md/.json."""
    aggregates = [
        aggregate_workload(w, runs[w['name']], args.modes)
        for w in workloads
        if runs[w['name']]
    ]
    environment = None
    for w in workloads:
        for run in runs[w['name']]:
            if run.get('record') and environment is None:
                environment = run['record'].get('environment')
    settings = dict(
        command=args.command,
        repeats=args.repeats,
        steps=args.steps,
        warmup=args.warmup,
        modes=list(args.modes),
        device=args.device,
        extra=list(args.extra),
    )
    return write_report(args.out_dir, aggregates, settings, environment)


def merge_reports(paths: Sequence[str]) -> tuple:
    """The aggregates, settings and environment of several
    ``workloads.json``: their workloads in :data:`WORKLOADS` order, a later
    file's replacing an earlier one's; the settings of the first file with
    ``parts``, every file's command. Raises ValueError if the files differ
    in repetitions, steps, warm-up, modes, device, extra arguments or
    environment (but the batch shape and precision, which are the
    workload's): their ratios would not be comparable."""
    same = ('repeats', 'steps', 'warmup', 'modes', 'device', 'extra')
    # what a run's environment says of its workload, not of the machine
    per_workload = ('batch_shape', 'precision')
    by_name: Dict[str, dict] = {}
    settings = environment = None
    parts = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        these = data.get('settings') or {}
        if settings is None:
            settings, environment = dict(these), data.get('environment')
        for key in same:
            if these.get(key) != settings.get(key):
                raise ValueError(
                    f'{path}: {key} is {these.get(key)!r}, but '
                    f'{paths[0]} has {settings.get(key)!r}: runs made with '
                    'other settings cannot share one table'
                )
        theirs, ours = (
            {k: v for k, v in (env or {}).items() if k not in per_workload}
            for env in (data.get('environment'), environment)
        )
        if theirs != ours:
            raise ValueError(
                f'{path}: environment {theirs!r} differs from '
                f"{paths[0]}'s {ours!r}"
            )
        parts += these.get('parts') or [these.get('command', '')]
        for agg in data.get('workloads', []):
            by_name[agg['name']] = agg
    order = {name: i for i, name in enumerate(WORKLOAD_NAMES)}
    aggregates = sorted(
        by_name.values(), key=lambda a: order.get(a['name'], len(order))
    )
    settings['parts'] = parts
    return aggregates, settings, environment


def write_report(
    out_dir: str,
    aggregates: Sequence[dict],
    settings: dict,
    environment: Optional[dict],
) -> str:
    """Write ``workloads.md`` and ``workloads.json`` into ``out_dir``;
    return the markdown."""
    modes = settings.get('modes') or list(DEFAULT_MODES)
    markdown = report_markdown(aggregates, modes, settings, environment)
    with open(osp.join(out_dir, 'workloads.md'), 'w') as f:
        f.write(markdown)
    with open(osp.join(out_dir, 'workloads.json'), 'w') as f:
        json.dump(
            dict(
                settings=settings,
                environment=environment,
                workloads=aggregates,
            ),
            f,
            indent=2,
        )
    return markdown


def _tool_modes() -> List[str]:
    """The modes benchmark_fast_conv_bn_eval.py knows (its ``MODES``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location('_benchmark_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.MODES)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Run benchmark_fast_conv_bn_eval.py on eleven workloads '
        'several times and aggregate the ratios to eval mode in one table. '
        'Unknown arguments go to every run of the benchmark tool.',
        allow_abbrev=False,
    )
    parser.add_argument(
        '--repeats',
        type=int,
        default=3,
        help='runs of each workload (default 3)',
    )
    parser.add_argument(
        '--steps', type=int, default=15, help='timed steps per mode'
    )
    parser.add_argument(
        '--warmup', type=int, default=3, help='warm-up steps per mode'
    )
    parser.add_argument(
        '--only',
        nargs='+',
        choices=WORKLOAD_NAMES,
        metavar='NAME',
        help='run only these workloads (--list names them)',
    )
    parser.add_argument(
        '--modes',
        nargs='+',
        default=list(DEFAULT_MODES),
        help=f'modes of each run (default: {" ".join(DEFAULT_MODES)}); '
        f'{BASELINE} is always run, first',
    )
    parser.add_argument(
        '--device',
        default=None,
        help='cuda or cpu (default: cuda if available)',
    )
    parser.add_argument(
        '--out-dir',
        default=osp.join('work_dirs', 'benchmark_workloads'),
        help='where everything goes (default: work_dirs/benchmark_workloads)',
    )
    parser.add_argument(
        '--timeout',
        type=float,
        default=None,
        help='seconds one run may take before it is killed (default: none)',
    )
    parser.add_argument(
        '--resume',
        action='store_true',
        help='reuse the runs that succeeded in --out-dir already',
    )
    parser.add_argument(
        '--tail-lines',
        type=int,
        default=10,
        help='lines of stderr kept of a failed run (default 10)',
    )
    parser.add_argument(
        '--list', action='store_true', help='list the workloads and exit'
    )
    parser.add_argument(
        '--merge',
        nargs='+',
        metavar='JSON',
        help='run nothing: write one table into --out-dir from these '
        'workloads.json files (parts of the work run elsewhere)',
    )
    args, extra = parser.parse_known_args(argv)
    if extra and extra[0] == '--':
        extra = extra[1:]
    args.extra = extra
    if args.repeats < 1:
        parser.error(f'--repeats must be >= 1, got {args.repeats}')
    if args.device is None:
        import torch

        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args.modes = list(dict.fromkeys([BASELINE] + list(args.modes)))
    known = _tool_modes()
    unknown = [m for m in args.modes if m not in known]
    if unknown:
        parser.error(
            f'unknown modes {" ".join(unknown)} (the tool has: '
            f'{" ".join(known)})'
        )
    argv = list(sys.argv[1:] if argv is None else argv)
    args.command = shlex.join(['python', osp.relpath(__file__)] + argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for w in WORKLOADS:
            paper = '-' if w['paper'] is None else f'{w["paper"]:.2f}%'
            print(
                f'{w["name"]:20s} {w["title"]:42s} amp={w["amp"]:5s} '
                f'paper={paper:7s} configs/benchmark/{w["config"]}'
            )
        return 0
    if args.merge:
        try:
            aggregates, settings, environment = merge_reports(args.merge)
        except (OSError, ValueError, KeyError) as exc:
            print(f'--merge: {exc}', file=sys.stderr)
            return 2
        os.makedirs(args.out_dir, exist_ok=True)
        print(write_report(args.out_dir, aggregates, settings, environment))
        return 1 if any_failure(aggregates) else 0
    selected = [
        w for w in WORKLOADS if args.only is None or w['name'] in args.only
    ]
    os.makedirs(args.out_dir, exist_ok=True)
    runs: Dict[str, List[dict]] = {w['name']: [] for w in selected}
    print(
        f'{len(selected)} workload(s) x {args.repeats} repetition(s), modes '
        f'{" ".join(args.modes)}, {args.steps} steps after {args.warmup} '
        f'warm-up, device {args.device}, into {args.out_dir}',
        flush=True,
    )
    start = time.perf_counter()
    for rep in range(1, args.repeats + 1):
        for workload in selected:
            run = run_one(workload, rep, args)
            runs[workload['name']].append(run)
            print(_progress(workload, rep, args, run), flush=True)
            write_outputs(selected, runs, args)
    markdown = write_outputs(selected, runs, args)
    print()
    print(markdown, flush=True)
    print(
        f'written: {args.out_dir}/workloads.md, workloads.json '
        f'({time.perf_counter() - start:.0f} s)'
    )
    aggregates = [
        aggregate_workload(w, runs[w['name']], args.modes) for w in selected
    ]
    return 1 if any_failure(aggregates) else 0


if __name__ == '__main__':
    sys.exit(main())
