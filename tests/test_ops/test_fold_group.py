# Copyright (c) mmtune contributors. All rights reserved.
"""fold_conv_bn_group (fold_bn_group's vectors, then each weight times its
factors) equals fold_conv_bn pair by pair: values, every gradient (float64;
the weights' bit for bit), unused pairs, frozen inputs, double backward and
the in-place modification check."""

import itertools

import pytest
import torch

from mmtune.ops import (
    FoldGroupPlan,
    bn_inv_std,
    fold_bn_group,
    fold_conv_bn,
    fold_conv_bn_group,
)

SHAPES = [(6, 4, 3, 3), (5, 2, 1, 1), (3, 6, 3), (4, 1, 2, 2, 2)]
#: CUDA too where there is one (the GPU machine runs these tests)
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def _pairs(bias, affine, seed=0, dtype=torch.float64, device='cpu'):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, lo=-1.0, hi=1.0):
        x = torch.rand(shape, generator=gen, dtype=dtype) * (hi - lo) + lo
        return x.to(device)

    pairs = []
    for shape in SHAPES:
        c = shape[0]
        pairs.append(
            dict(
                weight=rand(*shape).requires_grad_(),
                bias=rand(c).requires_grad_() if bias else None,
                mean=rand(c),
                var=rand(c, lo=0.3, hi=2.0),
                gamma=rand(c, lo=0.5, hi=1.5).requires_grad_()
                if affine
                else None,
                beta=rand(c).requires_grad_() if affine else None,
                eps=1e-5 * (1 + len(pairs)),
            )
        )
    return pairs


def _group(pairs, out_dtype=torch.float64):
    plan = FoldGroupPlan([p['weight'].shape for p in pairs], out_dtype)
    mean = torch.cat([p['mean'] for p in pairs])
    inv = torch.cat([bn_inv_std(p['var'], p['eps']) for p in pairs])
    weights, biases, _ = fold_conv_bn_group(
        plan,
        [p['weight'] for p in pairs],
        [p['bias'] for p in pairs],
        [p['gamma'] for p in pairs],
        [p['beta'] for p in pairs],
        mean,
        inv,
    )
    return weights, biases


def _single(pairs):
    out = [
        fold_conv_bn(
            p['weight'],
            p['bias'],
            p['mean'],
            p['var'],
            p['gamma'],
            p['beta'],
            p['eps'],
        )
        for p in pairs
    ]
    return [w for w, _ in out], [b for _, b in out]


def _params(pairs):
    return [
        p[k]
        for p in pairs
        for k in ('weight', 'bias', 'gamma', 'beta')
        if p[k] is not None and p[k].requires_grad
    ]


def _loss(weights, biases, probes, used):
    """A loss that reads only the used pairs' weights and biases, as the
    convolutions would."""
    loss = 0
    bias_probes = probes[-1].split([s[0] for s in SHAPES])
    for w, b, probe, bias_probe, u in zip(
        weights, biases, probes, bias_probes, used
    ):
        if u:
            loss = loss + (w * probe).sum() + (b * bias_probe).sum()
    return loss


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize(
    'bias,affine,used',
    [
        (b, a, u)
        for b, a in itertools.product((True, False), (True, False))
        for u in ((True,) * 4, (True, False, True, False))
    ],
)
def test_group_matches_single_folds(bias, affine, used, dtype, device):
    pairs = _pairs(bias, affine, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(7)
    probes = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    probes.append(
        torch.randn(sum(s[0] for s in SHAPES), generator=gen, dtype=dtype)
    )
    probes = [p.to(device) for p in probes]
    gw, gb = _group(pairs, out_dtype=dtype)
    sw, sb = _single(pairs)
    for a, b in zip(gw + gb, sw + sb):
        assert a.shape == b.shape
        assert torch.equal(a, b)
    params = _params(pairs)
    grads_group = torch.autograd.grad(
        _loss(gw, gb, probes, used), params, allow_unused=True
    )
    grads_single = torch.autograd.grad(
        _loss(sw, sb, probes, used), params, allow_unused=True
    )
    weights = {id(p['weight']) for p in pairs}
    for param, a, b in zip(params, grads_group, grads_single):
        if b is None:  # a parameter of an unused pair
            assert a is None
            continue
        assert a is not None
        if id(param) in weights:  # the same multiply's gradient
            assert torch.equal(a, b)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_unused_pair_gets_no_gradient_at_all():
    """Eval mode gives None to every parameter of a pair that was not used;
    so does the group, also for gamma and beta."""
    pairs = _pairs(True, True)
    gw, gb = _group(pairs)
    loss = (gw[0] * 2).sum() + gb[0].sum()
    loss.backward()
    for p in pairs[1:]:
        for k in ('weight', 'bias', 'gamma', 'beta'):
            assert p[k].grad is None, k
    assert pairs[0]['gamma'].grad is not None


def test_frozen_inputs_get_no_gradient():
    pairs = _pairs(True, True)
    for p in pairs:
        p['gamma'].requires_grad_(False)
        p['beta'].requires_grad_(False)
    gw, gb = _group(pairs)
    sw, sb = _single(pairs)
    loss_g = sum((w**2).sum() for w in gw) + sum((b**2).sum() for b in gb)
    loss_s = sum((w**2).sum() for w in sw) + sum((b**2).sum() for b in sb)
    params = _params(pairs)
    for a, b in zip(
        torch.autograd.grad(loss_g, params),
        torch.autograd.grad(loss_s, params),
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_double_backward_matches_single_folds():
    pairs = _pairs(True, True)
    params = _params(pairs)

    def second_order(fold):
        ws, b = fold(pairs)
        loss = sum((w**3).sum() for w in ws)
        loss = loss + sum((t**3).sum() for t in b)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum((g**2).sum() for g in grads)
        return torch.autograd.grad(penalty, params)

    for a, b in zip(second_order(_group), second_order(_single)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    'key, message',
    [
        # autograd's own check: the multiply keeps the weight
        ('weight', 'modified by an inplace operation'),
        # the group checks gamma, as eval mode's batch norm keeps it
        ('gamma', 'gamma of the BN after #1'),
    ],
)
def test_input_modified_before_backward_is_refused(key, message):
    """As autograd refuses a saved tensor modified in place."""
    pairs = _pairs(False, True)
    gw, gb = _group(pairs)
    loss = sum(w.sum() for w in gw) + sum(b.sum() for b in gb)
    with torch.no_grad():
        pairs[1][key].mul_(2)
    with pytest.raises(RuntimeError, match=message):
        loss.backward()


@pytest.mark.parametrize('device', DEVICES)
def test_output_dtype_and_gradient_dtype(device):
    pairs = _pairs(True, True, dtype=torch.float32, device=device)
    gw, gb = _group(pairs, out_dtype=torch.bfloat16)
    # rounded once, as the single fold's products cast to bfloat16
    sw, sb = _single(pairs)
    for a, b in zip(gw + gb, sw + sb):
        assert torch.equal(a, b.to(torch.bfloat16))
        assert a.dtype == torch.bfloat16
    loss = sum(t.float().sum() for t in gw + gb)
    loss.backward()
    assert all(p['weight'].grad.dtype == torch.float32 for p in pairs)


def test_bad_input_is_named():
    pairs = _pairs(True, True)
    pairs[1]['bias'] = None
    with pytest.raises(ValueError, match='biases must be all None'):
        _group(pairs)


def test_a_gamma_modified_for_a_pair_that_got_no_gradient_is_not_refused():
    """A pair whose outputs got no gradient from this group (it folded
    alone instead, say) has nothing to do with the group's backward."""
    pairs = _pairs(False, True)
    gw, gb = _group(pairs)
    loss = gw[0].sum() + gb[0].sum()
    with torch.no_grad():
        pairs[1]['gamma'].mul_(2)
    loss.backward()
    assert pairs[0]['gamma'].grad is not None
    assert pairs[1]['gamma'].grad is None


def test_only_per_channel_tensors_are_made_or_kept():
    """No weight-sized tensor but the folded weights themselves: the
    vectors' node keeps per-channel vectors, each folded weight is one
    multiply, whose autograd node keeps the weight (a parameter) and the
    factors."""
    pairs = _pairs(True, True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: sizes.append(t.numel()) or t, lambda t: t
    ):
        gw, gb = _group(pairs)
    channels = sum(s[0] for s in SHAPES)
    weights = {p['weight'].numel() for p in pairs}
    assert all(n <= channels or n in weights for n in sizes), sizes
    factors, biases = fold_bn_group(
        FoldGroupPlan(SHAPES, torch.float64),
        [p['bias'] for p in pairs],
        [p['gamma'] for p in pairs],
        [p['beta'] for p in pairs],
        torch.cat([p['mean'] for p in pairs]),
        torch.cat([bn_inv_std(p['var'], p['eps']) for p in pairs]),
    )
    for f, b, s in zip(factors, biases, SHAPES):
        assert f.shape == (s[0],) + (1,) * (len(s) - 1)
        assert b.shape == (s[0],)


def test_double_backward_gives_an_unused_pair_no_gradient_at_all():
    """Second derivatives must not reach a pair the loss does not use."""
    pairs = _pairs(True, True)
    gw, gb = _group(pairs)
    params = _params(pairs)
    loss = (gw[0] ** 3).sum() + (gb[0] ** 3).sum()
    grads = torch.autograd.grad(
        loss, params, create_graph=True, allow_unused=True
    )
    sum((g**2).sum() for g in grads if g is not None).backward()
    for p in pairs[1:]:
        for k in ('weight', 'bias', 'gamma', 'beta'):
            assert p[k].grad is None, k
    assert pairs[0]['gamma'].grad is not None
