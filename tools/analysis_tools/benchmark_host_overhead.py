# Copyright (c) mmtune contributors. All rights reserved.
"""The CPU-side cost of a training step in eval and tune mode, alone.

    python tools/analysis_tools/benchmark_host_overhead.py \\
        [--width 2] [--steps 200] [--device cpu|cuda]

A GPU training step of a detector at batch 2 mostly waits for the CPU to
launch its operations, so what tune mode costs the CPU decides its speed
there. This tool measures exactly that: an mmdet ResNet-50 backbone
(``frozen_stages=1``, ``norm_eval=True``, random BN statistics) with
``--width`` channels in the stem (64 in the real model), so narrow that the
kernels take no time, trained forward and backward on a 2x3x32x32 batch,
median step time per mode, modes interleaved:

- ``eval``: nothing rewritten;
- ``tune``: tune mode with batched folding (``batch=True``, on every
  device);
- ``tune-alone``: tune mode, each pair folding on its own;
- ``fold-floor``: every pair folded once (deploy mode) and the folded
  convs trained: no per-step folding at all, the floor of any tune mode.

Prints a markdown table with the ratios to eval mode. See
docs/benchmark.md, "Where the time goes".
"""

import argparse
import statistics
import sys
import time

import torch

MODES = ('eval', 'tune', 'tune-alone', 'fold-floor')


def build(mode: str, width: int, device: str) -> torch.nn.Module:
    from mmdet.models.backbones import ResNet

    from mmtune import fuse_conv_bn, turn_on_fast_conv_bn_eval

    torch.manual_seed(0)
    model = ResNet(
        depth=50,
        base_channels=width,
        stem_channels=width,
        frozen_stages=1,
        norm_eval=True,
        out_indices=(0, 1, 2, 3),
        init_cfg=None,
    )
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    model.to(device).train()
    if mode == 'tune':
        turn_on_fast_conv_bn_eval(model, batch=True)
    elif mode == 'tune-alone':
        turn_on_fast_conv_bn_eval(model, batch=False)
    elif mode == 'fold-floor':
        fuse_conv_bn(model)
        model.train()
    return model


def step(model: torch.nn.Module, x: torch.Tensor) -> None:
    loss = sum(out.sum() for out in model(x))
    loss.backward()
    for p in model.parameters():
        p.grad = None
    if x.is_cuda:
        torch.cuda.synchronize()


def measure(width: int, steps: int, device: str, warmup: int = 10) -> dict:
    """Median step time (ms) of each mode."""
    x = torch.randn(2, 3, 32, 32, device=device)
    models = {mode: build(mode, width, device) for mode in MODES}
    for model in models.values():
        for _ in range(warmup):
            step(model, x)
    times = {mode: [] for mode in MODES}
    for _ in range(steps):
        for mode, model in models.items():
            start = time.perf_counter()
            step(model, x)
            times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(t) * 1e3 for mode, t in times.items()}


def markdown(medians: dict) -> str:
    base = medians['eval']
    lines = [
        '| mode | median step (ms) | ratio to eval |',
        '| --- | ---: | ---: |',
    ]
    for mode, ms in medians.items():
        lines.append(f'| {mode} | {ms:.3f} | {ms / base:.2f} |')
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--width', type=int, default=2)
    parser.add_argument('--steps', type=int, default=200)
    parser.add_argument(
        '--device', default='cuda' if torch.cuda.is_available() else 'cpu'
    )
    args = parser.parse_args(argv)
    if args.width < 1:
        parser.error(f'--width must be >= 1, got {args.width}')
    if args.steps < 1:
        parser.error(f'--steps must be >= 1, got {args.steps}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    medians = measure(args.width, args.steps, args.device)
    print(
        f'ResNet-50 backbone, width {args.width}, batch 2x3x32x32, '
        f'{args.steps} steps per mode on {args.device}'
    )
    print(markdown(medians))
    return 0


if __name__ == '__main__':
    sys.exit(main())
