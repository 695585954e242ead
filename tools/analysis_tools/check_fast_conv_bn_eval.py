# Copyright (c) mmtune contributors. All rights reserved.
"""Check that tune mode computes exactly what eval mode computes, on a
config's model and a real batch.

    python tools/analysis_tools/check_fast_conv_bn_eval.py CONFIG \\
        [--checkpoint CKPT] [--batch-size N] [--synthetic] [--img-size H W] \\
        [--dtype float64|float32] [--rtol R] [--device cpu|cuda] \\
        [--batch auto|on|off] [--cfg-options ...]

1. Turns tune mode on in a copy of the model and prints the report: the
   Conv+BN pairs converted, and those skipped with the reason. ``--batch``
   is its ``batch`` argument: ``auto`` (the default: batched on CUDA),
   ``on`` (batched on every device: the GPU's path, checked on a CPU) or
   ``off`` (pair by pair).
2. Runs the model (``mode='tensor'`` and ``mode='loss'``) with hooks that
   find the pairs really computed (a BN receiving exactly a conv's output)
   and lists those found at run time but not converted.
3. Compares tune mode against eval mode (the model as the config builds
   it, BN frozen as ``norm_eval`` says) on one batch from the train
   dataloader (synthetic if the dataset is unavailable): the
   ``mode='tensor'`` outputs and the gradients of all parameters and of
   the input under a fixed random projection of them; every loss of
   ``mode='loss'`` and the gradients of their sum; and the losses and
   gradients again after the same small gradient step on both models
   (caches must follow the new weights). Both passes start from the same
   seed, so detectors' random samplers pick the same boxes. In float64
   (the default) the two must agree to ``--rtol``; in float32 within
   three times float32's own largest error on eval mode (against
   float64), if that is more, leaving out tensors whose very shape float32
   changes (NMS keeping other boxes). On CUDA, TF32 is turned off and
   cuDNN made deterministic: float32 means float32.

Exit status: 0 when everything matches, 1 on a mismatch (each one
printed), 2 on bad arguments, 3 when the check itself fails to run (an
exception, printed). Without ``--checkpoint`` the weights are the
config's initialisation with random BN statistics and affine values
(default ones would hide most folding bugs).
"""

import argparse
import copy
import importlib
import math
import os.path as osp
import sys
import traceback
from contextlib import contextmanager
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from mmengine.config import DictAction

# The config, model and batch helpers are the benchmark tool's, next to
# this file (on sys.path when run as a script; added when imported).
_HERE = osp.dirname(osp.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from benchmark_fast_conv_bn_eval import (  # noqa: E402
    build_model,
    load_batch,
    load_config,
)

from mmtune import turn_on_fast_conv_bn_eval  # noqa: E402
from mmtune.testing import (  # noqa: E402
    find_conv_bn_pairs_at_runtime,
    forward_backward,
    max_relative_error,
)

DEFAULT_RTOL = {'float64': 1e-6, 'float32': 1e-3}
# In float32, tune mode may differ from eval mode by this factor times the
# largest error that float32 alone gives eval mode (against float64) in the
# whole check, if that is more than rtol.
FLOAT32_FACTOR = 3.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Check that tune mode (fast_conv_bn_eval) gives the '
        'outputs, losses and gradients of eval mode on a config.'
    )
    parser.add_argument('config', help='config file')
    parser.add_argument('--checkpoint', help='checkpoint to load')
    parser.add_argument(
        '--batch-size',
        type=int,
        default=2,
        help='images in the batch (default 2)',
    )
    parser.add_argument(
        '--synthetic',
        action='store_true',
        help='random inputs of the config size instead of its dataset '
        '(the default when the dataset is not available)',
    )
    parser.add_argument(
        '--img-size',
        nargs=2,
        type=int,
        metavar=('H', 'W'),
        help='image size of a synthetic batch (implies --synthetic)',
    )
    parser.add_argument(
        '--dtype',
        choices=sorted(DEFAULT_RTOL),
        default='float64',
        help='precision of both models (default float64)',
    )
    parser.add_argument(
        '--rtol',
        type=float,
        help='largest relative error max|a-b|/max|b| per tensor (default '
        '1e-6 in float64, 1e-3 in float32)',
    )
    parser.add_argument(
        '--device', default='cpu', help='cpu or cuda (default cpu)'
    )
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument(
        '--batch',
        choices=['auto', 'on', 'off'],
        default='auto',
        help="tune mode's batch argument: auto (batched on CUDA), on, off",
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value',
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f'--batch-size must be >= 1, got {args.batch_size}')
    if args.rtol is None:
        args.rtol = DEFAULT_RTOL[args.dtype]
    elif not args.rtol > 0:
        parser.error(f'--rtol must be > 0, got {args.rtol}')
    if args.img_size is not None and min(args.img_size) < 32:
        parser.error(f'--img-size must be at least 32, got {args.img_size}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error(f'--device {args.device}: CUDA is not available')
    if not osp.isfile(args.config):
        parser.error(f'no such config file: {args.config}')
    if args.checkpoint is not None and not osp.isfile(args.checkpoint):
        parser.error(f'no such checkpoint: {args.checkpoint}')
    return args


class _TensorMode(torch.nn.Module):
    """``model(x, data_samples, mode='tensor')`` as a one-input module."""

    def __init__(self, model: torch.nn.Module, data_samples, seed: int):
        super().__init__()
        self.model = model
        self.data_samples = data_samples
        self.seed = seed

    def forward(self, inputs):
        torch.manual_seed(self.seed)
        return self.model(
            inputs, copy.deepcopy(self.data_samples), mode='tensor'
        )


Pass = Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]


def _grads(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    grads = {
        name: p.grad.detach().clone()
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    if x.grad is not None:
        grads['<input>'] = x.grad.detach().clone()
    return grads


def tensor_pass(model, inputs, data_samples, seed: int) -> Pass:
    """``mode='tensor'`` outputs, and the gradients (parameters and input)
    of a fixed random projection of them (:func:`forward_backward`)."""
    outs, grads, input_grads = forward_backward(
        _TensorMode(model, data_samples, seed), [inputs]
    )
    values = {f'output {i}': out for i, out in enumerate(outs)}
    grads = {name[len('model.') :]: g for name, g in grads.items()}
    if input_grads[0] is not None:
        grads['<input>'] = input_grads[0]
    return values, grads


def loss_pass(model, inputs, data_samples, seed: int) -> Pass:
    """``mode='loss'`` losses, and the gradients (parameters and input) of
    their sum as mmengine's ``parse_losses`` makes it."""
    model.zero_grad(set_to_none=True)
    x = inputs.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    losses = model.loss(x, copy.deepcopy(data_samples))
    total, _ = model.parse_losses(losses)
    total.backward()
    values = {'sum of losses': total.detach()}
    for name, value in losses.items():
        if isinstance(value, torch.Tensor):
            values[name] = value.detach()
        else:  # a list of tensors (one per level or stage)
            for i, item in enumerate(value):
                values[f'{name}[{i}]'] = item.detach()
    return values, _grads(model, x)


def relative_error(
    a: torch.Tensor, b: torch.Tensor, floor: float = 0.0
) -> float:
    """``max|a - b| / max(max|b|, floor)``; infinite if the shapes
    differ."""
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    scale = b.detach().abs().max().item()
    if scale >= floor:
        return max_relative_error(a, b)
    return (a.detach() - b.detach()).abs().max().item() / floor


#: A tensor is compared relative to at least this fraction of the largest
#: magnitude among the tensors of its kind in the pass: a loss that is zero
#: up to round-off (an FPN level without positives: -1e-10 against a sum
#: of 112) has no magnitude of its own to be relative to.
FLOOR = 1e-6


def _floor(tensors: Dict[str, torch.Tensor]) -> float:
    peaks = [
        t.detach().abs().max().item() for t in tensors.values() if t.numel()
    ]
    return FLOOR * max(peaks, default=0.0)


def compare_passes(
    ref: Pass, cand: Pass, allowed: float, skip: FrozenSet[str] = frozenset()
) -> Tuple[List[str], float]:
    """Mismatches of tune mode (``cand``) against eval mode (``ref``): each
    tensor may be off by ``allowed`` (relative to its largest magnitude, or
    to :data:`FLOOR` times the largest of its kind in the pass when that is
    more).
    Tensors named in ``skip`` (``'grad of '`` before gradients' names) are
    left out.

    Returns:
        tuple[list[str], float]: The mismatches and the largest relative
        error.
    """
    problems, worst = [], 0.0
    for kind, a, b in (('', ref[0], cand[0]), ('grad of ', ref[1], cand[1])):
        if set(a) != set(b):
            problems.append(
                f'{kind or "values"}: only in one of them: '
                f'{sorted(set(a) ^ set(b))}'
            )
        floor = _floor(a)
        for name in [k for k in a if k in b and kind + k not in skip]:
            err = relative_error(b[name], a[name], floor)
            worst = max(worst, err)
            if not err <= allowed:  # NaN fails too
                detail = (
                    f'shape {tuple(b[name].shape)} vs {tuple(a[name].shape)}'
                    if math.isinf(err)
                    else f'relative error {err:.2e}'
                )
                problems.append(f'{kind}{name}: {detail}')
    return problems, worst


def float32_error(ref: Pass, exact: Pass) -> Tuple[float, FrozenSet[str]]:
    """How far a float32 pass is from the same pass in float64.

    Returns:
        tuple[float, frozenset[str]]: The largest relative error of the
        tensors of equal shapes, and the names of the others (float32
        took other discrete decisions, e.g. NMS kept other boxes), with
        ``'grad of '`` before gradients' names.
    """
    worst, unstable = 0.0, set()
    for kind, i in (('', 0), ('grad of ', 1)):
        for name, value in ref[i].items():
            if name not in exact[i]:
                continue
            truth = exact[i][name]
            err = relative_error(value.to(truth), truth)
            if math.isinf(err):
                unstable.add(kind + name)
            else:
                worst = max(worst, err)
    return worst, frozenset(unstable)


def gradient_step(
    reference: torch.nn.Module,
    others: Sequence[torch.nn.Module],
    size: float = 1e-3,
) -> None:
    """Move all models by the same small step along the reference's last
    gradients: each tensor by at most ``size`` times its largest magnitude
    (``size`` if it is all zeros). The same update everywhere keeps the
    weights equal, whatever the rounding of each model's gradients."""
    params = [dict(model.named_parameters()) for model in others]
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if p.grad is None or not p.grad.abs().max() > 0:
                continue
            scale = size * (p.abs().max().item() or 1.0)
            update = p.grad * (scale / p.grad.abs().max())
            p.sub_(update)
            for other in params:
                other[name].sub_(update.to(other[name]))


def runtime_pairs(model, inputs, data_samples, seed) -> List[Tuple[str, str]]:
    """Pairs computed by ``mode='tensor'`` and ``mode='loss'``, in order."""
    pairs = find_conv_bn_pairs_at_runtime(
        _TensorMode(model, data_samples, seed), inputs
    )
    pairs = [
        (conv[len('model.') :], bn[len('model.') :]) for conv, bn in pairs
    ]

    def run_loss():
        torch.manual_seed(seed)
        model.loss(inputs, copy.deepcopy(data_samples))

    pairs += find_conv_bn_pairs_at_runtime(model, forward=run_loss)
    return list(dict.fromkeys(pairs))


@contextmanager
def nms_in_float32():
    """Let mmcv's NMS run on float64 boxes (its kernels take float32 only).

    Boxes and scores go to the kernel in float32; the kept indices select
    the original float64 boxes (``batched_nms``), only the returned scores
    are rounded to float32, identically in both modes.
    """
    try:  # the module, not the function that mmcv.ops exports as `nms`
        nms_module = importlib.import_module('mmcv.ops.nms')
    except ImportError:
        yield
        return
    original = nms_module.nms

    def nms(boxes, scores, *args, **kwargs):
        dets, inds = original(boxes.float(), scores.float(), *args, **kwargs)
        return dets.to(boxes.dtype), inds

    nms_module.nms = nms  # batched_nms looks `nms` up in this module
    try:
        yield
    finally:
        nms_module.nms = original


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: bad arguments, or --help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return _main(args)
    except Exception:  # noqa: BLE001  (not a mismatch: say so)
        traceback.print_exc()
        print('\nERROR: the check could not run (see above)')
        return 3


def _main(args) -> int:
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    cfg = load_config(args.config, args.cfg_options)
    model = build_model(cfg, args.seed)
    if args.checkpoint:
        from mmengine.runner import load_checkpoint

        load_checkpoint(model, args.checkpoint, map_location='cpu')
    model.to(device=args.device, dtype=dtype).train()

    batch, source = load_batch(
        cfg,
        model,
        args.batch_size,
        args.synthetic,
        args.img_size,
        args.seed,
    )
    with torch.no_grad():
        data = model.data_preprocessor(batch, True)
    inputs = data['inputs'].to(dtype)
    data_samples = data['data_samples']
    print(f'config: {args.config}')
    print(f'batch: {source}, inputs {tuple(inputs.shape)} {args.dtype}')
    print(f'rtol: {args.rtol:g} (relative to each tensor max magnitude)')

    with nms_in_float32():
        return _check(args, model, inputs, data_samples)


def _check(args, model, inputs, data_samples) -> int:
    reference = model
    candidate = copy.deepcopy(model)
    batch = {'auto': 'auto', 'on': True, 'off': False}[args.batch]
    report = turn_on_fast_conv_bn_eval(candidate, batch=batch)
    print(report)

    found = runtime_pairs(reference, inputs, data_samples, args.seed)
    missed = [pair for pair in found if pair not in set(report.converted)]
    print(
        f'run-time check: {len(found)} Conv->BN pairs computed, '
        f'{len(found) - len(missed)} of them converted, {len(missed)} not'
    )
    for conv, bn in missed:
        print(f'  found at run time, not converted: {conv} -> {bn}')

    # float32 also runs eval mode in float64: float32's own error on eval
    # mode widens the tolerance (on deep detectors at initialisation,
    # rounding alone flips ReLUs and moves some gradients by 1e-2)
    exact = None
    if inputs.dtype != torch.float64:
        exact = copy.deepcopy(reference).double()
    checks = [
        ("mode='tensor'", tensor_pass, False),
        ("mode='loss'", loss_pass, False),
        ("mode='loss' after a gradient step", loss_pass, True),
    ]
    results, noise = [], 0.0
    for what, run_pass, step_first in checks:
        if step_first:
            others = [m for m in (candidate, exact) if m is not None]
            gradient_step(reference, others)
        ref = run_pass(reference, inputs, data_samples, args.seed)
        cand = run_pass(candidate, inputs, data_samples, args.seed)
        unstable = frozenset()
        if exact is not None:
            truth = run_pass(exact, inputs.double(), data_samples, args.seed)
            error, unstable = float32_error(ref, truth)
            noise = max(noise, error)
        results.append((what, ref, cand, unstable))
    allowed = max(args.rtol, FLOAT32_FACTOR * noise)
    if exact is not None:
        print(
            f'float32 alone moves eval mode by up to {noise:.1e} here '
            f'(against float64): differences up to {allowed:.1e} pass '
            f'(float64 checks to {DEFAULT_RTOL["float64"]:g})'
        )
    problems = []
    for what, ref, cand, unstable in results:
        found, worst = compare_passes(ref, cand, allowed, unstable)
        problems += [f'{what}: {p}' for p in found]
        print(
            f'{what}: {len(ref[0])} values, {len(ref[1])} gradients, max '
            f'relative error {worst:.2e}: '
            + ('match' if not found else 'MISMATCH')
        )
        if unstable:
            print(
                f'  not compared: {", ".join(sorted(unstable))} (their shape '
                'in float32 differs from float64 even in eval mode)'
            )

    if not report.converted:
        print('nothing converted: tune mode changes nothing here')
    print(report.runtime_summary())
    never = report.never_folded()
    if never:
        problems.append(
            f'{len(never)} converted pairs never folded in these passes '
            '(tune mode saves nothing for them): '
            + ', '.join(f'{conv} -> {bn}' for conv, bn in never)
        )
    if problems:
        print(f'\nFAILED: {len(problems)} mismatches (allowed {allowed:.2g}):')
        for problem in problems:
            print(f'  {problem}')
        return 1
    print(
        f'\nOK: tune mode matches eval mode ({len(report.converted)} pairs '
        f'converted, relative error up to {allowed:.2g} allowed)'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
