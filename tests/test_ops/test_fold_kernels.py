# Copyright (c) mmtune contributors. All rights reserved.
"""The compiled fold kernels (used on CUDA) equal the eager group fold:
values and every gradient in float64, with and without conv bias and BN
affine; a kernel that fails falls back to the eager fold with a warning.

The kernels are compiled for the CPU here (inductor's C++ backend), which
takes a few seconds per variant."""

import warnings

import pytest
import torch

from mmtune.ops import (
    FoldGroupPlan,
    bn_inv_std,
    fold_conv_bn_group,
    fold_kernels,
)

SHAPES = [(6, 4, 3, 3), (5, 2, 1, 1), (4, 8, 1, 1)]


def _inputs(bias, affine):
    gen = torch.Generator().manual_seed(3)

    def rand(*shape, lo=-1.0, hi=1.0):
        t = torch.rand(shape, generator=gen, dtype=torch.float64)
        return t * (hi - lo) + lo

    ws = [rand(*s).requires_grad_() for s in SHAPES]
    cs = [s[0] for s in SHAPES]
    bs = [rand(c).requires_grad_() if bias else None for c in cs]
    gs = [
        rand(c, lo=0.5, hi=1.5).requires_grad_() if affine else None
        for c in cs
    ]
    betas = [rand(c).requires_grad_() if affine else None for c in cs]
    mean = rand(sum(cs))
    inv = bn_inv_std(rand(sum(cs), lo=0.3, hi=2.0), 1e-5)
    return ws, bs, gs, betas, mean, inv


def _run(plan, inputs):
    ws, bs, gs, betas, mean, inv = inputs
    outs, bias = fold_conv_bn_group(plan, ws, bs, gs, betas, mean, inv)
    gen = torch.Generator().manual_seed(5)
    loss = (
        bias * torch.randn(bias.shape, generator=gen, dtype=bias.dtype)
    ).sum()
    for o in outs:
        loss = (
            loss
            + (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
        )
    params = [t for t in ws + bs + gs + betas if t is not None]
    return outs + [bias], torch.autograd.grad(loss, params)


def _compiled_plan():
    plan = FoldGroupPlan(SHAPES, torch.float64)
    plan.kernels = fold_kernels.FoldKernels(plan.channels, torch.float64)
    return plan


@pytest.mark.parametrize('bias,affine', [(False, True), (True, False)])
def test_compiled_kernels_match_eager(bias, affine):
    inputs = _inputs(bias, affine)
    eager_values, eager_grads = _run(
        FoldGroupPlan(SHAPES, torch.float64), inputs
    )
    calls = []
    plan = _compiled_plan()
    forward, backward = plan.kernels.forward, plan.kernels.backward
    plan.kernels.forward = lambda *a: calls.append('f') or forward(*a)
    plan.kernels.backward = lambda *a: calls.append('b') or backward(*a)
    values, grads = _run(plan, inputs)
    assert calls == ['f', 'b']  # both kernels ran
    for a, b in zip(values + list(grads), eager_values + list(eager_grads)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_failing_kernel_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(fold_kernels, '_failed', None)
    inputs = _inputs(False, True)
    eager_values, eager_grads = _run(
        FoldGroupPlan(SHAPES, torch.float64), inputs
    )
    plan = FoldGroupPlan(SHAPES, torch.float64)

    def broken(*args):
        raise RuntimeError('no compiler here')

    plan.kernels = fold_kernels.FoldKernels.__new__(fold_kernels.FoldKernels)
    plan.kernels.forward = plan.kernels.backward = broken
    with pytest.warns(RuntimeWarning, match='no compiler here'):
        values, grads = _run(plan, inputs)
    for a, b in zip(values + list(grads), eager_values + list(eager_grads)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # from now on no kernels are made, and no second warning comes
    assert (
        fold_kernels.kernels_for([1], torch.float32, torch.device('cuda'))
        is None
    )
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        _run(plan, inputs)


def test_kernels_only_for_cuda(monkeypatch):
    monkeypatch.setattr(fold_kernels, '_failed', None)
    assert (
        fold_kernels.kernels_for([2], torch.float32, torch.device('cpu'))
        is None
    )
    monkeypatch.setattr(fold_kernels, 'ENABLED', False)
    assert (
        fold_kernels.kernels_for([2], torch.float32, torch.device('cuda'))
        is None
    )
