# Copyright (c) mmtune contributors. All rights reserved.
"""Helpers to check tune mode against eval mode (torch only).

Used by mmtune's tests and by ``tools/analysis_tools/
check_fast_conv_bn_eval.py``; usable on any model.
"""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial running statistics and affine values.

    With default statistics (mean 0, var 1, gamma 1, beta 0) almost any
    folding bug goes unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not isinstance(module, _BatchNorm):
            continue
        n = module.num_features
        if module.running_mean is not None:
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
        if module.weight is not None:
            module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.copy_(torch.randn(n, generator=gen) * 0.5)


def find_conv_bn_pairs_at_runtime(
    model: nn.Module, *args, forward: Optional[Callable] = None, **kwargs
) -> List[Tuple[str, str]]:
    """Run ``model(*args, **kwargs)`` (or ``forward(*args, **kwargs)``) and
    list the ``(conv, bn)`` pairs of ``model`` where a BN received exactly
    the tensor that a conv returned.

    Returns:
        list[tuple[str, str]]: Qualified names, in call order.
    """
    produced: Dict[int, Tuple[str, Tensor]] = {}
    pairs: List[Tuple[str, str]] = []
    handles = []

    def conv_hook(name):
        def hook(module, inputs, output):
            if isinstance(output, Tensor):
                produced[id(output)] = (name, output)

        return hook

    def bn_hook(name):
        def hook(module, inputs):
            if inputs and isinstance(inputs[0], Tensor):
                found = produced.get(id(inputs[0]))
                if found is not None and found[1] is inputs[0]:
                    pairs.append((found[0], name))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, _ConvNd):
            handles.append(module.register_forward_hook(conv_hook(name)))
        elif isinstance(module, _BatchNorm):
            handles.append(module.register_forward_pre_hook(bn_hook(name)))
    try:
        with torch.no_grad():
            (forward or model)(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return pairs


def _flatten(out: Any) -> List[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _flatten(item)]
    return []


def forward_backward(
    model: nn.Module,
    inputs: Sequence[Tensor],
    loss_fn: Optional[Callable] = None,
) -> Tuple[List[Tensor], Dict[str, Tensor], List]:
    """Outputs, parameter gradients and input gradients of one pass.

    The loss is the sum of ``(out * w).sum()`` over all outputs with fixed
    pseudo-random weights ``w``, so every output element matters.
    """
    model.zero_grad(set_to_none=True)
    inputs = [
        x.detach().clone().requires_grad_(x.is_floating_point())
        for x in inputs
    ]
    outs = _flatten(model(*inputs))
    if loss_fn is None:
        loss = sum(
            (o.float() * _probe_like(o)).sum()
            for o in outs
            if o.is_floating_point()
        )
    else:
        loss = loss_fn(outs)
    loss.backward()
    grads = {
        name: p.grad.detach().clone()
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    input_grads = [x.grad for x in inputs]
    return [o.detach() for o in outs], grads, input_grads


def _probe_like(t: Tensor) -> Tensor:
    gen = torch.Generator().manual_seed(t.numel() % 9973)
    return torch.randn(t.shape, generator=gen).to(t.device, torch.float32)


def fold_batches(model: nn.Module) -> list:
    """The :class:`~mmtune.rewrite.fold_batch.FoldBatch` objects that the
    tune-mode pairs of ``model`` fold in (empty when batching is off)."""
    from mmtune.rewrite.tune_mode import tune_pairs

    found = []
    for pair in tune_pairs(model):
        batch = pair.batch
        if batch is not None and all(batch is not b for b in found):
            found.append(batch)
    return found


class count_batch_norm_calls(torch.overrides.TorchFunctionMode):
    """Counts the calls of ``F.batch_norm`` inside the ``with`` block
    (``.calls``): a converted pair that folds runs none."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.batch_norm, torch.batch_norm):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def max_relative_error(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max(max|b|, tiny)`` in float64."""
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp_min(1e-12)
    return ((a - b).abs().max() / scale).item()


def compare_models(
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Sequence[Tensor],
    rtol: float,
    loss_fn: Optional[Callable] = None,
) -> List[str]:
    """Compare outputs, all parameter gradients and input gradients.

    Returns:
        list[str]: One line per mismatch (empty when all agree).
    """
    out_a, grads_a, in_a = forward_backward(reference, inputs, loss_fn)
    out_b, grads_b, in_b = forward_backward(candidate, inputs, loss_fn)
    problems = []
    if len(out_a) != len(out_b):
        return [f'{len(out_a)} outputs vs {len(out_b)}']
    for i, (a, b) in enumerate(zip(out_a, out_b)):
        err = max_relative_error(b, a)
        if err > rtol:
            problems.append(f'output {i}: relative error {err:.2e}')
    if set(grads_a) != set(grads_b):
        problems.append(
            'different parameters got gradients: '
            f'{sorted(set(grads_a) ^ set(grads_b))}'
        )
    for name in sorted(set(grads_a) & set(grads_b)):
        err = max_relative_error(grads_b[name], grads_a[name])
        if err > rtol:
            problems.append(f'grad of {name}: relative error {err:.2e}')
    for i, (a, b) in enumerate(zip(in_a, in_b)):
        if a is not None and b is not None:
            err = max_relative_error(b, a)
            if err > rtol:
                problems.append(f'grad of input {i}: relative error {err:.2e}')
    return problems


HRNET_EXTRA = dict(
    stage1=dict(
        num_modules=1,
        num_branches=1,
        block='BOTTLENECK',
        num_blocks=(1,),
        num_channels=(16,),
    ),
    stage2=dict(
        num_modules=1,
        num_branches=2,
        block='BASIC',
        num_blocks=(1, 1),
        num_channels=(8, 16),
    ),
    stage3=dict(
        num_modules=1,
        num_branches=3,
        block='BASIC',
        num_blocks=(1, 1, 1),
        num_channels=(8, 16, 32),
    ),
    stage4=dict(
        num_modules=1,
        num_branches=4,
        block='BASIC',
        num_blocks=(1, 1, 1, 1),
        num_channels=(8, 16, 32, 64),
    ),
)

#: mmdet backbone configs (plain dicts, no mmdet import here) used by the
#: tests and ``tools/analysis_tools/conv_bn_coverage.py``.
MMDET_BACKBONES = {
    'resnet50': dict(type='ResNet', depth=50, norm_eval=True),
    'resnet18_with_cp': dict(
        type='ResNet', depth=18, with_cp=True, norm_eval=True
    ),
    'resnext50': dict(
        type='ResNeXt', depth=50, groups=32, base_width=4, norm_eval=True
    ),
    'regnetx_400mf': dict(type='RegNet', arch='regnetx_400mf', norm_eval=True),
    'hrnet': dict(type='HRNet', extra=HRNET_EXTRA, norm_eval=True),
    'resnet50_dcn': dict(
        type='ResNet',
        depth=50,
        norm_eval=True,
        dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
        stage_with_dcn=(False, False, True, True),
    ),
    'cspdarknet': dict(
        type='CSPDarknet',
        deepen_factor=0.33,
        widen_factor=0.25,
        norm_eval=True,
    ),
    'cspnext': dict(
        type='CSPNeXt', deepen_factor=0.167, widen_factor=0.25, norm_eval=True
    ),
    'mobilenetv2': dict(type='MobileNetV2', norm_eval=True),
    # Conv2dAdaptivePadding convs (mmtune/engine/mmcv_convs.py)
    'efficientnet_b0': dict(type='EfficientNet', arch='b0', norm_eval=True),
}


def run_python(
    args: Sequence[str],
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[str] = None,
    timeout: float = 300,
) -> str:
    """Run ``python *args`` in a fresh process and return its output
    (stdout and stderr together).

    Raises:
        AssertionError: the process failed or ran past ``timeout`` seconds
            (with the end of its output).
    """
    import subprocess
    import sys

    try:
        proc = subprocess.run(
            [sys.executable, *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f'python {" ".join(args)[:200]} ran past {timeout} s:\n'
            f'{exc.output}'
        ) from None
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


def run_isolated(func: Callable, *args: str, timeout: float = 180) -> str:
    """Run the module-level function ``func(*args)`` (string arguments) in
    a fresh Python process (:func:`run_python`), for tests that start a
    process group: a gloo group torn down while a DDP reducer still holds
    it can hang a process for good, and must not hang the test run.

    Returns:
        str: The process's output.
    """
    import inspect

    path = inspect.getfile(func)
    code = (
        'import importlib.util, sys\n'
        'spec = importlib.util.spec_from_file_location(\n'
        f'    "_isolated", {path!r})\n'
        'module = importlib.util.module_from_spec(spec)\n'
        'sys.path.insert(0, __import__("os").path.dirname(spec.origin))\n'
        'spec.loader.exec_module(module)\n'
        f'module.{func.__name__}(*{list(args)!r})\n'
    )
    return run_python(['-c', code], timeout=timeout)
