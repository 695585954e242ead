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

With ``--breakdown``, two variants of ``tune`` that each leave one
component out, to tell what it costs (not for training: they skip what
keeps tune mode exact or lean):

- ``tune-unchecked``: the per-call checks (:meth:`TunePair.refusal`:
  modes, types, hooks, the call chain) skipped;
- ``tune-kept``: the folded weights kept for the backward, as before the
  recompute (:mod:`mmtune.ops.conv_folded`).
- ``tune-prefolded``: ``tune-kept`` without the fold: each pair takes, at
  every step, the fold of its first call, made leaves that train where the
  fold's outputs do (as the floor's convs do), so no fold runs forward or
  backward. What is left
  above ``fold-floor`` is the per-call Python: the checks, the conv
  wrapper and the BN's pass-through.

Prints a markdown table with forward, backward and step times and the
ratios to eval mode, and the differences per converted pair. See
docs/benchmark.md, "Where the time goes".
"""

import argparse
import contextlib
import statistics
import sys
import time
from unittest import mock

import torch

MODES = ('eval', 'tune', 'tune-alone', 'fold-floor')
BREAKDOWN = ('tune-unchecked', 'tune-kept', 'tune-prefolded')


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
    if mode == 'tune' or mode in BREAKDOWN:
        turn_on_fast_conv_bn_eval(model, batch=True)
    elif mode == 'tune-alone':
        turn_on_fast_conv_bn_eval(model, batch=False)
    elif mode == 'fold-floor':
        fuse_conv_bn(model)
        model.train()
    return model


#: ``tune-prefolded``: (batch id, index) -> the fold of the first call
_PREFOLDED: dict = {}


def _prefolded_take(take):
    """``FoldBatch.take`` that gives each pair the fold of its first call,
    as leaves, at every later call (no fold runs)."""

    def prefolded(batch, index):
        key = (id(batch), index)
        if key not in _PREFOLDED:
            fold = take(batch, index)
            if fold is None:
                return None
            # leaves that train where the fold would (not the frozen
            # stages': their convolutions compute no weight gradient)
            _PREFOLDED[key] = fold._replace(
                weight=fold.weight.detach().requires_grad_(
                    fold.weight.requires_grad
                ),
                bias=fold.bias.detach().requires_grad_(
                    fold.bias.requires_grad
                ),
            )
        return _PREFOLDED[key]

    return prefolded


def _variant(mode: str):
    """The patch that makes ``tune`` the variant ``mode`` (for its steps
    only: modes run interleaved in one process)."""
    from mmtune.ops import conv_folded
    from mmtune.rewrite.fold_batch import FoldBatch
    from mmtune.rewrite.tune_mode import TunePair

    if mode == 'tune-unchecked':
        return mock.patch.object(TunePair, 'refusal', lambda self: None)
    if mode in ('tune-kept', 'tune-prefolded'):
        stack = contextlib.ExitStack()
        stack.enter_context(
            mock.patch.object(
                conv_folded, '_refold_hooks_allowed', lambda top: False
            )
        )
        if mode == 'tune-prefolded':
            stack.enter_context(
                mock.patch.object(
                    FoldBatch, 'take', _prefolded_take(FoldBatch.take)
                )
            )
        return stack
    return contextlib.nullcontext()


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize()


def step(model: torch.nn.Module, x: torch.Tensor) -> tuple:
    """One forward and backward; (forward, backward) seconds."""
    start = time.perf_counter()
    loss = sum(out.sum() for out in model(x))
    _sync(x)
    middle = time.perf_counter()
    loss.backward()
    for p in model.parameters():
        p.grad = None
    # tune-prefolded's leaves lose their gradients as the parameters do
    for fold in _PREFOLDED.values():
        fold.weight.grad = fold.bias.grad = None
    _sync(x)
    return middle - start, time.perf_counter() - middle


def measure(
    width: int, steps: int, device: str, modes=MODES, warmup: int = 10
) -> dict:
    """Median forward, backward and step time (ms) of each mode."""
    x = torch.randn(2, 3, 32, 32, device=device)
    models = {mode: build(mode, width, device) for mode in modes}
    for mode, model in models.items():
        with _variant(mode):
            for _ in range(warmup):
                step(model, x)
    times = {mode: [] for mode in modes}
    for _ in range(steps):
        for mode, model in models.items():
            with _variant(mode):
                times[mode].append(step(model, x))
    return {
        mode: tuple(
            statistics.median(values) * 1e3
            for values in (
                [f for f, _ in t],
                [b for _, b in t],
                [f + b for f, b in t],
            )
        )
        for mode, t in times.items()
    }


def markdown(medians: dict, pairs: int = 0) -> str:
    base = medians['eval'][2]
    lines = [
        '| mode | forward (ms) | backward (ms) | step (ms) | ratio to eval |',
        '| --- | ---: | ---: | ---: | ---: |',
    ]
    for mode, (fwd, bwd, total) in medians.items():
        lines.append(
            f'| {mode} | {fwd:.3f} | {bwd:.3f} | {total:.3f} | '
            f'{total / base:.2f} |'
        )
    if pairs and 'tune' in medians:
        lines += [
            '',
            f'Per converted pair ({pairs}), microseconds of step time:',
            '',
            '| difference | forward | backward | step |',
            '| --- | ---: | ---: | ---: |',
        ]
        for label, a, b in (
            ('tune - fold-floor', 'tune', 'fold-floor'),
            (
                'run-time checks (tune - tune-unchecked)',
                'tune',
                'tune-unchecked',
            ),
            (
                'recomputing folded weights (tune - tune-kept)',
                'tune',
                'tune-kept',
            ),
            (
                'the fold, forward and backward (tune-kept - tune-prefolded)',
                'tune-kept',
                'tune-prefolded',
            ),
            (
                'per-call Python: checks, conv wrapper, BN pass-through '
                '(tune-prefolded - fold-floor)',
                'tune-prefolded',
                'fold-floor',
            ),
            ('folding pair by pair (tune-alone - tune)', 'tune-alone', 'tune'),
        ):
            if a in medians and b in medians:
                cells = [
                    f'{(medians[a][k] - medians[b][k]) * 1e3 / pairs:.1f}'
                    for k in range(3)
                ]
                lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def _pairs(width: int) -> int:
    from mmtune.rewrite.tune_mode import tune_pairs

    return len(tune_pairs(build('tune', width, 'cpu')))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--width', type=int, default=2)
    parser.add_argument('--steps', type=int, default=200)
    parser.add_argument(
        '--breakdown',
        action='store_true',
        help='also the variants of tune mode that leave one component out',
    )
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
    modes = MODES + (BREAKDOWN if args.breakdown else ())
    medians = measure(args.width, args.steps, args.device, modes)
    print(
        f'ResNet-50 backbone, width {args.width}, batch 2x3x32x32, '
        f'{args.steps} steps per mode on {args.device}'
    )
    print(markdown(medians, pairs=_pairs(args.width)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
