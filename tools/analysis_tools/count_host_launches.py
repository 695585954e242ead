# Copyright (c) mmtune contributors. All rights reserved.
"""Kernel launches and aten calls per training step, eval / tune / floor.

    python tools/analysis_tools/count_host_launches.py [--device cuda]

On the narrow ResNet-50 of ``benchmark_host_overhead.py`` (where a step's
time is the host's), ``torch.profiler`` records 5 steps of each mode and
this prints, per step, the events whose name holds ``LaunchKernel`` (CUDA
kernel launches: 0 on a CPU) and the ``aten::`` calls, tune mode's
operator table, and the host time of one batch fold alone. See
docs/benchmark.md, "Where the time goes".
"""

import argparse
import os.path as osp
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import benchmark_host_overhead as bho  # noqa: E402

from mmtune.rewrite.tune_mode import tune_pairs  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--device', default='cuda' if torch.cuda.is_available() else 'cpu'
    )
    args = parser.parse_args(argv)
    device = args.device
    x = torch.randn(2, 3, 32, 32, device=device)
    models = {
        mode: bho.build(mode, 2, device)
        for mode in ('eval', 'tune', 'fold-floor')
    }
    for model in models.values():
        for _ in range(20):
            bho.step(model, x)
    for name, model in models.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                bho.step(model, x)
        averages = prof.key_averages()
        launches = sum(e.count for e in averages if 'LaunchKernel' in e.key)
        aten = sum(e.count for e in averages if e.key.startswith('aten::'))
        print(
            f'{name}: kernel launches per step {launches / 5:.0f}, '
            f'aten calls {aten / 5:.0f}'
        )
        if name == 'tune':
            print(
                averages.table(
                    sort_by='self_cpu_time_total',
                    row_limit=20,
                    max_name_column_width=45,
                )
            )
    batch = tune_pairs(models['tune'])[0].batch
    weight = next(models['tune'].parameters())
    key = (weight.device, None, True)
    times = []
    for _ in range(200):
        bho._sync(x)
        start = time.perf_counter()
        batch._fold(key)
        times.append(time.perf_counter() - start)
    fold_us = statistics.median(times) * 1e6
    print(f'one fold of the batch, host time: {fold_us:.0f} us')
    return 0


if __name__ == '__main__':
    sys.exit(main())
