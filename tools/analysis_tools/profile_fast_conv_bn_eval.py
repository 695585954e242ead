# Copyright (c) mmtune contributors. All rights reserved.
"""Where the time of a training step goes, in eval mode and in tune mode.

    python tools/analysis_tools/profile_fast_conv_bn_eval.py CONFIG \\
        [--amp none|fp16|bf16] [--device cuda|cpu] [--steps 3] \\
        [--modes eval tune ...] \\
        [--cfg-options KEY=VALUE ...]

Builds the config's model once per mode (default: eval, tune) as the
benchmark tool does (same seed, random BN statistics, a synthetic batch of
the configured size), warms each up for 5 steps, then runs ``--steps``
steps under ``torch.profiler`` and prints, per mode, the GPU kernel time
and the number of kernels per step and the profiler's table of operators.
See docs/benchmark.md, "Where the time goes".
"""

import argparse
import os.path as osp
import sys
import types

import torch
from mmengine.config import DictAction
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import benchmark_fast_conv_bn_eval as bench  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='config file')
    parser.add_argument(
        '--amp', choices=['none', 'fp16', 'bf16'], default='none'
    )
    parser.add_argument(
        '--device', default='cuda' if torch.cuda.is_available() else 'cpu'
    )
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument(
        '--modes',
        nargs='+',
        choices=bench.MODES,
        default=['eval', 'tune'],
        help='modes to profile, one after the other (default: eval tune)',
    )
    parser.add_argument('--rows', type=int, default=14)
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value',
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f'--steps must be >= 1, got {args.steps}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = args.device.startswith('cuda')
    cfg = bench.load_config(args.config, args.cfg_options)
    options = types.SimpleNamespace(seed=0, device=args.device, amp=args.amp)
    probe = bench.build_model(cfg, 0)
    batch, source = bench.load_batch(cfg, probe, None, True, None, 0)
    del probe
    print(f'config: {args.config}\nbatch: {source}\nprecision: {args.amp}')
    bench._device_warm_up(args.device)
    activities = [ProfilerActivity.CPU]
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    for mode in args.modes:
        run = bench.ModeRun(mode)
        bench.setup_mode(run, cfg, options, batch)
        for _ in range(5):
            bench.train_step(run, 0)
        bench._sync(args.device)
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                bench.train_step(run, 0)
            bench._sync(args.device)
        kernels = [
            e
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
        ]
        gpu_ms = sum(e.device_time for e in kernels) / args.steps / 1e3
        sort_by = 'device_time_total' if cuda else 'self_cpu_time_total'
        print(
            f'\n##### {mode}: GPU kernel time per step {gpu_ms:.1f} ms, '
            f'kernels per step {len(kernels) / args.steps:.0f}'
        )
        print(
            prof.key_averages().table(
                sort_by=sort_by,
                row_limit=args.rows,
                max_name_column_width=60,
            )
        )
        del run
    return 0


if __name__ == '__main__':
    sys.exit(main())
