# Copyright (c) mmtune contributors. All rights reserved.
"""What is alive at a training step's peak, per mode, on a GPU.

    python tools/analysis_tools/memory_at_peak_fast_conv_bn_eval.py CONFIG \\
        [--modes mmengine tune] [--amp none|fp16|bf16] [--reps 2] \\
        [--batch-size N] [--img-size H W]

Builds each mode's model as the benchmark tool does (same seed, random BN
statistics, the same batch), warms it up for 3 steps, and records one more
step with the CUDA allocator's history
(``torch.cuda.memory._record_memory_history``). Per mode it prints:

- the step peak of allocated bytes (what the benchmark tool reports) and of
  requested bytes (tensors only, without the allocator's rounding);
- the peak of the step's own allocations replayed from the trace, and the
  sizes of the allocations alive at that moment, so two modes can be
  compared allocation by allocation.

Then, per repetition, the difference of the last mode to the first by
allocation size (MiB, and how many allocations of that size each has).
Allocated bytes also count what the allocator rounds up or leaves unsplit in
a block; that depends on the order of earlier allocations and varies between
repetitions of one mode, which is why the tensors are counted too.
See docs/benchmark.md, "Peak memory against mmengine".
"""

import argparse
import collections
import os.path as osp
import sys
from typing import Dict, Tuple

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import benchmark_fast_conv_bn_eval as bench  # noqa: E402

MiB = 1024.0**2


def _alive_at_trace_peak(trace) -> Tuple[int, Dict[int, int]]:
    """Replay the allocation trace of one step: the peak of the step's own
    allocations and how many allocations of each size are alive then."""
    current = peak = 0
    peak_at = -1
    for i, event in enumerate(trace):
        if event['action'] == 'alloc':
            current += event['size']
        elif event['action'] == 'free_completed':
            current -= event['size']
        if current > peak:
            peak, peak_at = current, i
    alive = {}
    for event in trace[: peak_at + 1]:
        if event['action'] == 'alloc':
            alive[event['addr']] = event['size']
        elif event['action'] == 'free_completed':
            alive.pop(event['addr'], None)
    return peak, collections.Counter(alive.values())


def record_step(mode: str, cfg, args, batch) -> dict:
    """One recorded training step of ``mode`` after 3 warm-up steps."""
    run = bench.ModeRun(mode)
    bench.setup_mode(run, cfg, args, batch)
    for _ in range(3):
        bench.train_step(run, args.seed)
    torch.cuda.synchronize()
    stats = torch.cuda.memory_stats()
    allocated_before = stats['allocated_bytes.all.current']
    requested_before = stats['requested_bytes.all.current']
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    bench.train_step(run, args.seed)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    stats = torch.cuda.memory_stats()
    trace = snapshot['device_traces'][torch.cuda.current_device()]
    trace_peak, sizes = _alive_at_trace_peak(trace)
    result = dict(
        mode=mode,
        allocated=(stats['allocated_bytes.all.peak'] - allocated_before),
        requested=(stats['requested_bytes.all.peak'] - requested_before),
        trace_peak=trace_peak,
        sizes=sizes,
    )
    del run
    torch.cuda.empty_cache()
    return result


def size_diff(a: dict, b: dict, rows: int = 20) -> str:
    """Allocations alive at the trace peak, ``b`` minus ``a``, by size."""
    sizes = set(a['sizes']) | set(b['sizes'])

    def delta(size):
        return size * (b['sizes'][size] - a['sizes'][size])

    lines = [
        f'| size (bytes) | {b["mode"]} - {a["mode"]} (MiB) | '
        f'count {b["mode"]} | count {a["mode"]} |',
        '| ---: | ---: | ---: | ---: |',
    ]
    for size in sorted(sizes, key=lambda s: -abs(delta(s)))[:rows]:
        if delta(size):
            lines.append(
                f'| {size} | {delta(size) / MiB:+.3f} | '
                f'{b["sizes"][size]} | {a["sizes"][size]} |'
            )
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='config file')
    parser.add_argument(
        '--modes', nargs='+', choices=bench.MODES, default=['mmengine', 'tune']
    )
    parser.add_argument(
        '--amp', choices=['none', 'fp16', 'bf16'], default='none'
    )
    parser.add_argument('--reps', type=int, default=2)
    parser.add_argument('--batch-size', type=int)
    parser.add_argument('--img-size', nargs=2, type=int, metavar=('H', 'W'))
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f'--reps must be >= 1, got {args.reps}')
    if not torch.cuda.is_available():
        parser.error('needs a CUDA device: it reads the CUDA allocator')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bench_args = ['--amp', args.amp, '--seed', str(args.seed)]
    if args.batch_size:
        bench_args += ['--batch-size', str(args.batch_size)]
    if args.img_size:
        bench_args += ['--img-size', *map(str, args.img_size)]
    bargs = bench.parse_args([args.config] + bench_args)
    cfg = bench.load_config(args.config)
    probe = bench.build_model(cfg, bargs.seed)
    batch, source = bench.load_batch(
        cfg,
        probe,
        bargs.batch_size,
        bargs.synthetic,
        bargs.img_size,
        bargs.seed,
    )
    del probe
    bench._device_warm_up('cuda')
    print(f'config: {args.config}, precision: {args.amp}, batch: {source}')
    print(
        '| rep | mode | step peak allocated (MiB) | step peak requested '
        '(MiB) | trace peak (MiB) |'
    )
    print('| ---: | --- | ---: | ---: | ---: |')
    diffs = []
    for rep in range(args.reps):
        results = [record_step(m, cfg, bargs, batch) for m in args.modes]
        for r in results:
            print(
                f'| {rep} | {r["mode"]} | {r["allocated"] / MiB:.2f} | '
                f'{r["requested"] / MiB:.2f} | {r["trace_peak"] / MiB:.2f} |',
                flush=True,
            )
        if len(results) > 1:
            diffs.append((rep, size_diff(results[0], results[-1])))
    for rep, table in diffs:
        print(f'\nAlive at the trace peak, by size (rep {rep}):\n')
        print(table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
