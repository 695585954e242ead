# Copyright (c) mmtune contributors. All rights reserved.
"""Folding many Conv->BN pairs' BN statistics in one autograd node.

:func:`fold_conv_bn` costs about four tensor operations per pair in the
forward and about as many autograd nodes in the backward, all of them on
per-channel vectors except one: the weight times its factors. A training
step on a GPU mostly waits for the CPU to launch operations, so those
per-pair vector operations cost more time than eval mode's batch norm.
Here the vectors of a group of pairs are computed together:

- forward: the factors ``s = gamma / sqrt(var + eps)`` and the folded
  biases ``beta + s * (b - mean)`` of all pairs as one vector each, cut into
  each pair's ``(C, 1, ..., 1)`` factors and ``(C,)`` biases in one C++ call
  each; one autograd node for the group;
- backward: the node receives each pair's factor and bias gradients and
  gives ``gamma``, ``beta`` and the conv bias theirs, a few vector
  operations for all pairs.

The weights are not part of it: each pair's folded weight is its weight
times its factors (:func:`scale_weight`), one multiply, done where the pair
needs it. So no weight-sized tensor exists beyond the one pair at hand, in
the forward as in the backward (whose weight gradients come, pair by pair,
from that multiply's own autograd node), exactly as when folding pair by
pair; an earlier design multiplied all weights at once and held, for a
moment, about four times the weights in the forward and five in the
backward, more than eval mode at small inputs.

The values are those of :func:`fold_conv_bn`, element for element, and so
are the gradients of the weights; the vectors' gradients are the same sums.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .conv_bn import bn_scale, fold_conv_bn, scale_weight


class FoldGroupPlan:
    """What a group's fold needs besides the tensors.

    Args:
        shapes (list[torch.Size]): The conv weights' shapes (output
            channels on dimension 0).
        out_dtype (torch.dtype): The dtype of the folded biases and weights
            (the conv weights', or autocast's).
        names (list[str], optional): Pair names for error messages.
    """

    def __init__(
        self,
        shapes: Sequence[torch.Size],
        out_dtype: torch.dtype,
        names: Optional[Sequence[str]] = None,
    ):
        self.shapes = [torch.Size(s) for s in shapes]
        self.channels = [s[0] for s in self.shapes]
        self.out_dtype = out_dtype
        self.names = list(names) if names is not None else None
        # shaped like each pair's per-output-channel factor, (C, 1, ..., 1):
        # unflatten_dense_tensors cuts a vector into such views in one call,
        # or split does, faster, when all weights have as many dimensions
        self.factor_shapes = [
            torch.empty((s[0],) + (1,) * (len(s) - 1), device='meta')
            for s in self.shapes
        ]
        dims = {len(s) for s in self.shapes}
        self.factor_view = (
            (-1,) + (1,) * (dims.pop() - 1) if len(dims) == 1 else None
        )

    def name(self, i: int) -> str:
        return self.names[i] if self.names else f'#{i}'


_unflatten = torch._C._nn.unflatten_dense_tensors


def _factors(scale: Tensor, plan: FoldGroupPlan) -> List[Tensor]:
    """``scale`` cut into each pair's ``(C, 1, ..., 1)`` factors (views)."""
    if plan.factor_view is not None:
        return list(scale.view(plan.factor_view).split(plan.channels))
    return _unflatten(scale, plan.factor_shapes)


def _vectors(plan, biases, gammas, betas, mean, inv_std):
    """The factors, the folded biases (``plan.out_dtype``) and the shift
    ``b - mean``, each as one vector."""
    scale = bn_scale(inv_std, None if gammas[0] is None else torch.cat(gammas))
    shift = mean.neg() if biases[0] is None else torch.cat(biases) - mean
    if betas[0] is None:
        folded_b = scale * shift
    else:
        folded_b = torch.addcmul(torch.cat(betas), scale, shift)
    return scale, folded_b.to(plan.out_dtype), shift


def _outputs(plan, scale, folded_b) -> tuple:
    return (*_factors(scale, plan), *folded_b.split(plan.channels))


class _FoldVectors(torch.autograd.Function):
    """Inputs: plan, n, then n conv biases (or None), n gammas (or None),
    n betas (or None), then the running means and the inverse stds as two
    flat vectors (not differentiable). Outputs: n factors ``(C, 1, ...,
    1)``, n folded biases ``(C,)``."""

    @staticmethod
    def forward(ctx, plan, n, *tensors):
        biases, gammas, betas = (
            tensors[:n],
            tensors[n : 2 * n],
            tensors[2 * n : 3 * n],
        )
        mean, inv_std = tensors[3 * n], tensors[3 * n + 1]
        scale, folded_b, shift = _vectors(
            plan, biases, gammas, betas, mean, inv_std
        )
        ctx.plan, ctx.n = plan, n
        ctx.inputs = tensors[: 3 * n]
        # a gamma modified in place before the backward is refused, as
        # eval mode's batch norm (which keeps gamma) refuses it
        ctx.versions = (
            None if gammas[0] is None else [g._version for g in gammas]
        )
        ctx.save_for_backward(scale, shift, inv_std, mean)
        ctx.set_materialize_grads(False)
        return _outputs(plan, scale, folded_b)

    @staticmethod
    def backward(ctx, *grads):
        plan, n = ctx.plan, ctx.n
        grad_s, grad_b = grads[:n], grads[n:]
        used = [a is not None or b is not None for a, b in zip(grad_s, grad_b)]
        if not any(used):
            return (None,) * (3 * n + 4)
        _check_versions(plan, ctx.inputs[n : 2 * n], ctx.versions, used)
        if torch.is_grad_enabled():  # create_graph=True: differentiable
            return (None, None) + _backward_autograd(ctx, grads, used)
        scale, shift, inv_std, _ = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        flat_s = _flat(grad_s, plan, scale, plan.factor_view is not None)
        flat_b = _flat(grad_b, plan, scale, True)
        out = [None] * (3 * n + 2)
        if any(needs[:n]):  # conv biases
            _put(out, 0, flat_b * scale, plan, needs, used)
        if any(needs[n : 2 * n]):  # gammas
            grad_scale = torch.addcmul(flat_s, flat_b, shift)
            _put(out, n, grad_scale.mul_(inv_std), plan, needs, used)
        if any(needs[2 * n : 3 * n]):  # betas
            _put(out, 2 * n, flat_b, plan, needs, used)
        return (None, None, *out)


def _flat(grads, plan: FoldGroupPlan, like: Tensor, alike: bool) -> Tensor:
    """Per-pair gradients as one vector of ``like``'s dtype (zeros where a
    pair got none). ``alike``: the outputs they are the gradients of all
    have as many dimensions (the biases; the factors when the weights
    do), so that when every pair got one, one ``cat`` joins them as they
    are."""
    if alike and all(g is not None for g in grads):
        flat = torch.cat(grads).view(-1)
        return flat if flat.dtype == like.dtype else flat.to(like.dtype)
    return torch.cat(
        [
            like.new_zeros(c) if g is None else g.reshape(c).to(like.dtype)
            for g, c in zip(grads, plan.channels)
        ]
    )


def _put(out, start, flat, plan, needs, used) -> None:
    """Per-pair slices of a per-channel gradient into ``out[start:]``; None
    where not needed or where the pair got no gradient."""
    for i, part in enumerate(flat.split(plan.channels)):
        if needs[start + i] and used[i]:
            out[start + i] = part


def _check_versions(plan, gammas, versions, used) -> None:
    """Raise as autograd does when the gamma of a pair whose outputs got
    gradients was modified in place after the forward (a pair that folded
    alone instead gets none from this node, and its gamma's version is not
    this node's business)."""
    if versions is None or [g._version for g in gammas] == versions:
        return
    for i, (g, version) in enumerate(zip(gammas, versions)):
        if used[i] and g._version != version:
            raise RuntimeError(
                'one of the variables needed for gradient computation '
                'has been modified by an inplace operation: gamma of the '
                f'BN after {plan.name(i)} is at version {g._version}; '
                f'expected version {version} instead.'
            )


def _backward_autograd(ctx, grads, used) -> tuple:
    """The backward as a differentiable recomputation of the forward
    (double backward), from the pairs whose outputs got gradients only: a
    second derivative must not reach the others either (eval mode gives
    them None, not zeros)."""
    plan, n = ctx.plan, ctx.n
    tensors = ctx.inputs
    _, _, inv_std, mean = ctx.saved_tensors
    result: List[Optional[Tensor]] = [None] * (3 * n + 2)
    pairs = [i for i in range(n) if used[i]]
    wanted = [
        k * n + i
        for k in range(3)
        for i in pairs
        if tensors[k * n + i] is not None
        and ctx.needs_input_grad[2 + k * n + i]
    ]
    if not wanted:
        return tuple(result)
    sub = FoldGroupPlan([plan.shapes[i] for i in pairs], plan.out_dtype)
    means, inv_stds = mean.split(plan.channels), inv_std.split(plan.channels)
    with torch.enable_grad():
        scale, folded_b, _ = _vectors(
            sub,
            *([tensors[k * n + i] for i in pairs] for k in range(3)),
            torch.cat([means[i] for i in pairs]),
            torch.cat([inv_stds[i] for i in pairs]),
        )
        outs = _outputs(sub, scale, folded_b)
    outer = [grads[i] for i in pairs] + [grads[n + i] for i in pairs]
    given = [(o, g) for o, g in zip(outs, outer) if g is not None]
    got = torch.autograd.grad(
        [o for o, _ in given],
        [tensors[k] for k in wanted],
        [g for _, g in given],
        create_graph=True,
        allow_unused=True,
    )
    for k, g in zip(wanted, got):
        result[k] = g
    return tuple(result)


def fold_bn_group(
    plan: FoldGroupPlan,
    biases: Sequence[Optional[Tensor]],
    gammas: Sequence[Optional[Tensor]],
    betas: Sequence[Optional[Tensor]],
    mean: Tensor,
    inv_std: Tensor,
) -> Tuple[List[Tensor], List[Tensor]]:
    """The per-channel part of folding a group of Conv->eval-BN pairs.

    Args:
        plan (FoldGroupPlan): The group's shapes and output dtype.
        biases (list[Tensor | None]): The conv biases, all None or none.
        gammas (list[Tensor | None]): BN weights, all None or none.
        betas (list[Tensor | None]): BN biases, all None or none.
        mean (Tensor): All pairs' running means, concatenated.
        inv_std (Tensor): All pairs' ``1 / sqrt(var + eps)``, concatenated.

    Returns:
        tuple[list[Tensor], list[Tensor]]: Each pair's factors ``gamma /
        sqrt(var + eps)``, shaped ``(C, 1, ..., 1)`` as its weight's
        dimensions (multiply the weight by them: :func:`scale_weight`), and
        each pair's folded bias in ``plan.out_dtype``. One autograd node
        when grad mode is on and a parameter requires grad; a pair none of
        whose outputs gets a gradient gets None for all its parameters, as
        in eval mode.
    """
    n = len(plan.channels)
    for seq, what in (
        (biases, 'biases'),
        (gammas, 'gammas'),
        (betas, 'betas'),
    ):
        if len(seq) != n:
            raise ValueError(f'{what}: expected {n} entries, got {len(seq)}')
        if len({t is None for t in seq}) > 1:
            raise ValueError(f'{what} must be all None or all tensors')
    tensors = (*biases, *gammas, *betas)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors
    ):
        outs = _FoldVectors.apply(plan, n, *tensors, mean, inv_std)
    else:
        with torch.no_grad():
            scale, folded_b, _ = _vectors(
                plan, biases, gammas, betas, mean, inv_std
            )
            outs = _outputs(plan, scale, folded_b)
    return list(outs[:n]), list(outs[n:])


def fold_conv_bn_group(
    plan: FoldGroupPlan,
    weights: Sequence[Tensor],
    biases: Sequence[Optional[Tensor]],
    gammas: Sequence[Optional[Tensor]],
    betas: Sequence[Optional[Tensor]],
    mean: Tensor,
    inv_std: Tensor,
) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """Fold a group of Conv->eval-BN pairs at once: :func:`fold_bn_group`,
    then every weight times its factors.

    Returns:
        tuple[list[Tensor], list[Tensor], list[Tensor]]: Each pair's folded
        weight and folded bias in ``plan.out_dtype``, and its factors.
    """
    if len(weights) != len(plan.channels):
        raise ValueError(
            f'weights: expected {len(plan.channels)} entries, '
            f'got {len(weights)}'
        )
    factors, folded_bs = fold_bn_group(
        plan, biases, gammas, betas, mean, inv_std
    )
    folded_ws = [
        scale_weight(w, f, plan.out_dtype) for w, f in zip(weights, factors)
    ]
    return folded_ws, folded_bs, factors


# ``fold_conv_bn`` is the pair-by-pair reference these equal
__all__ = [
    'FoldGroupPlan',
    'fold_bn_group',
    'fold_conv_bn_group',
    'fold_conv_bn',
]
