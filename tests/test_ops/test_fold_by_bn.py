# Copyright (c) mmtune contributors. All rights reserved.
"""The batch-norm-kernel fold equals the plain fold: values, gradients and
second derivatives, in float64, for every weight layout it accepts."""

import itertools

import pytest
import torch

from mmtune.ops import bn_fold_supported, fold_conv_bn, fold_conv_bn_by_bn

C_OUT = 6


def _tensors(transposed, bias, affine, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, low=None):
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        return t if low is None else t.abs() + low

    shape = (4, C_OUT, 3, 3) if transposed else (C_OUT, 2, 3, 3)
    params = dict(
        conv_weight=rand(*shape),
        conv_bias=rand(C_OUT) if bias else None,
        bn_weight=rand(C_OUT, low=0.5) if affine else None,
        bn_bias=rand(C_OUT) if affine else None,
    )
    for t in params.values():
        if t is not None:
            t.requires_grad_()
    stats = dict(running_mean=rand(C_OUT), running_var=rand(C_OUT, low=0.3))
    return params, stats


CASES = list(itertools.product((False, True), (True, False), (True, False)))


@pytest.mark.parametrize('transposed,bias,affine', CASES)
def test_bn_kernel_fold_matches_plain_fold(transposed, bias, affine):
    params, stats = _tensors(transposed, bias, affine)
    eps = 1e-3
    plain = fold_conv_bn(
        params['conv_weight'],
        params['conv_bias'],
        stats['running_mean'],
        stats['running_var'],
        params['bn_weight'],
        params['bn_bias'],
        eps,
        transposed,
    )
    zeros = torch.zeros(C_OUT, dtype=torch.float64)
    bias_input = params['conv_bias']
    if bias_input is None:
        bias_input = torch.zeros(1, C_OUT, dtype=torch.float64)
    by_bn = fold_conv_bn_by_bn(
        params['conv_weight'],
        params['conv_bias'],
        stats['running_mean'],
        stats['running_var'],
        params['bn_weight'],
        params['bn_bias'],
        eps,
        zeros,
        bias_input,
        transposed,
    )
    for a, b in zip(plain, by_bn):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    inputs = [t for t in params.values() if t is not None]
    gen = torch.Generator().manual_seed(1)
    probes = [
        torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in plain
    ]

    def grads(outs):
        pairs = [(o, p) for o, p in zip(outs, probes) if o.requires_grad]
        return torch.autograd.grad(
            [o for o, _ in pairs],
            inputs,
            [p for _, p in pairs],
            create_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )

    first_plain, first_bn = grads(plain), grads(by_bn)
    for a, b in zip(first_plain, first_bn):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # second derivatives (e.g. gradient penalties) through the fold
    loss_plain = sum((g**3).sum() for g in first_plain)
    loss_bn = sum((g**3).sum() for g in first_bn)
    if not loss_plain.requires_grad:  # the fold is linear in every input
        return
    second_plain = torch.autograd.grad(
        loss_plain, inputs, allow_unused=True, materialize_grads=True
    )
    second_bn = torch.autograd.grad(
        loss_bn, inputs, allow_unused=True, materialize_grads=True
    )
    for a, b in zip(second_plain, second_bn):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_bn_fold_supported_layouts():
    assert bn_fold_supported(False, 1) and bn_fold_supported(False, 4)
    assert bn_fold_supported(True, 1)
    # a grouped transposed weight interleaves groups and output channels
    assert not bn_fold_supported(True, 2)
