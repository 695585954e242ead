# Copyright (c) mmtune contributors. All rights reserved.
"""Peak memory over a whole training step: eval mode, the fold floor, tune
mode pair by pair and batched.

    python tools/analysis_tools/memory_timeline_fast_conv_bn_eval.py \\
        [CONFIG] [--batch-size 64] [--img-size 224] [--device cpu]

Builds the config's model (default: the ResNet-50 classification benchmark
config) once per mode, runs its backbone forward, backward and an SGD step
once to warm up and once under ``torch.profiler`` with memory profiling,
and prints the peak of ``export_memory_timeline`` (every category of memory
the profiler tracks, summed) for each. Tune mode is turned on on the
backbone, the module the step calls, so that ``batch=True`` really batches
(a submodule called on its own folds pair by pair); the batched row says
how many times the batch folded. On a CPU this is the peak of the whole
step, parameters, gradients and optimizer state included, which the
benchmark tool's "saved for backward" figure leaves out. See
docs/tune_mode.md, "Batched folding".
"""

import argparse
import json
import os.path as osp
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import benchmark_fast_conv_bn_eval as bench  # noqa: E402

DEFAULT_CONFIG = 'configs/benchmark/resnet50_8xb64_finetune-cls-224.py'
MiB = 1024.0**2


#: mode -> what ``peak_mib`` does to the backbone
MODES = ('eval', 'fold-floor', 'pair by pair', 'batched')


def peak_mib(cfg, mode: str, batch_size: int, img_size: int, device):
    """The step's peak (MiB), and how many times the batch folded (None
    when the mode does not batch)."""
    from mmtune import fuse_conv_bn, turn_on_fast_conv_bn_eval
    from mmtune.testing import fold_batches

    model = bench.build_model(cfg, 0)
    if mode == 'fold-floor':
        fuse_conv_bn(model.backbone)
    elif mode != 'eval':
        turn_on_fast_conv_bn_eval(model.backbone, batch=mode == 'batched')
    model.to(device).train()
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = sum(f.float().mean() for f in model.backbone(x))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    activities = [ProfilerActivity.CPU]
    if str(device).startswith('cuda'):
        activities.append(ProfilerActivity.CUDA)
    with profile(
        activities=activities,
        profile_memory=True,
        record_shapes=True,
        with_stack=True,
    ) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = osp.join(tmp, 'timeline.json')
        prof.export_memory_timeline(path, device=str(device))
        with open(path) as f:
            _, sizes = json.load(f)
    batches = fold_batches(model.backbone)
    folds = sum(b.folds for b in batches) if mode == 'batched' else None
    return max(sum(s) for s in sizes) / MiB, folds


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', nargs='?', default=DEFAULT_CONFIG)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args(argv)
    for name in ('batch_size', 'img_size'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = bench.load_config(args.config)
    print(
        f'{args.config}: backbone step, batch {args.batch_size}, '
        f'{args.img_size}x{args.img_size}, {args.device}'
    )
    print('| mode | peak memory over the step (MiB) | ratio to eval |')
    print('| --- | ---: | ---: |')
    base = None
    for mode in MODES:
        peak, folds = peak_mib(
            cfg, mode, args.batch_size, args.img_size, args.device
        )
        base = base or peak
        label = mode if folds is None else f'{mode} ({folds} batch folds)'
        print(f'| {label} | {peak:.1f} | {peak / base:.3f} |', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
