# Copyright (c) mmtune contributors. All rights reserved.
"""Folding many Conv->BN pairs in one autograd node.

:func:`fold_conv_bn` costs about four tensor operations per pair in the
forward and about as many autograd nodes in the backward. A training step on
a GPU mostly waits for the CPU to launch operations, so those per-pair
operations cost more time than eval mode's batch norm. Here a group of
pairs folds in one autograd node, with few operations called from Python:

- forward: the per-channel factors ``gamma / sqrt(var + eps)`` of all pairs
  as one vector, cut into ``(C, 1, ..., 1)`` views in one C++ call (what
  each pair's convolution keeps to compute its folded weight again), and
  one multi-tensor multiply of all weights by their factors repeated over
  the weights' rows (tensors of equal shapes: a few CUDA kernels for all
  pairs, where broadcasting factors costs one kernel and one operation call
  per pair; the repeated factors, one weight-sized vector, are let go when
  the fold returns). The folded weights are separate tensors, so each is
  freed as soon as its convolution lets go of it, as when folding pair by
  pair; all biases are one vector.
  Under autocast the products are rounded to the autocast dtype a run at a
  time (consecutive pairs whose weight rows have the same length);
- backward: the weights' gradients in one multi-tensor multiply (by the
  repeated factors again); the ``gamma`` gradients need ``sum(grad * w)``
  per output channel: one multi-tensor multiply, one flat copy of the
  products and one sum per run. This backward runs after the backward
  of every pair's convolution, when their activations are gone: the
  products and the repeated factors it holds for a moment (about three
  times the weights) are not at the step's peak.

The values are those of :func:`fold_conv_bn`, element for element; the
gradients are the same sums, accumulated in another order.

The pairs' weights must be contiguous and have their output channels on
dimension 0 (not transposed convs).
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .conv_bn import bn_scale, fold_conv_bn


class FoldGroupPlan:
    """What a group's fold needs besides the parameters.

    Args:
        shapes (list[torch.Size]): The conv weights' shapes.
        out_dtype (torch.dtype): The dtype of the folded tensors (the conv
            weights', or autocast's).
        names (list[str], optional): Pair names for error messages.
    """

    def __init__(
        self,
        shapes: Sequence[torch.Size],
        out_dtype: torch.dtype,
        names: Optional[Sequence[str]] = None,
    ):
        self.shapes = [torch.Size(s) for s in shapes]
        self.numels = [s.numel() for s in self.shapes]
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
        # runs of consecutive pairs whose rows have the same length:
        # (first pair, end pair, first row, end row, row length)
        self.runs: List[Tuple[int, int, int, int, int]] = []
        row = 0
        for i, (numel, channels) in enumerate(zip(self.numels, self.channels)):
            length = numel // channels
            last = self.runs[-1] if self.runs else None
            if last is not None and last[4] == length:
                self.runs[-1] = (
                    last[0],
                    i + 1,
                    last[2],
                    row + channels,
                    length,
                )
            else:
                self.runs.append((i, i + 1, row, row + channels, length))
            row += channels
        #: the elements of all weights
        self.total = sum(self.numels)
        self._repeats: dict = {}

    def repeats(self, device) -> Tensor:
        """Each output channel's row length (how often
        :func:`_expanded` repeats its factor), on ``device``."""
        repeats = self._repeats.get(device)
        if repeats is None:
            lengths = [n // c for n, c in zip(self.numels, self.channels)]
            repeats = torch.tensor(
                [
                    length
                    for length, c in zip(lengths, self.channels)
                    for _ in range(c)
                ],
                dtype=torch.long,
            ).to(device)
            self._repeats[device] = repeats
        return repeats


# One C++ call each (no Python per tensor): all tensors as one flat copy,
# and a flat tensor cut into views shaped like the given tensors.
_flatten = torch._C._nn.flatten_dense_tensors
_unflatten = torch._C._nn.unflatten_dense_tensors


def _expanded(scale: Tensor, plan: FoldGroupPlan, like) -> List[Tensor]:
    """Each pair's factors repeated over the rows of its weight: tensors
    shaped like the weights ``like`` (views of one vector). A multi-tensor
    multiply of tensors of equal shapes is a few kernels for all pairs; with
    ``(C, 1, ..., 1)`` factors it broadcasts, and then it is one kernel and
    one operation call per pair."""
    full = torch.repeat_interleave(
        scale, plan.repeats(scale.device), output_size=plan.total
    )
    return _unflatten(full, list(like))


def _fold_weights(weights, scale: Tensor, plan: FoldGroupPlan) -> List[Tensor]:
    """Each weight times its output channels' factors, as separate tensors
    (each is freed with its convolution's saved tensors)."""
    weights = list(weights)
    factors = _expanded(scale, plan, weights)
    if torch.promote_types(weights[0].dtype, scale.dtype) == plan.out_dtype:
        return list(torch._foreach_mul(weights, factors))
    # autocast: computed in the weights' precision, then rounded once, a
    # run at a time (x * 1 makes separate tensors again)
    outs: List[Tensor] = []
    for p0, p1, *_ in plan.runs:
        products = torch._foreach_mul(weights[p0:p1], factors[p0:p1])
        flat = _flatten(products).to(plan.out_dtype)
        del products
        outs.extend(torch._foreach_mul(_unflatten(flat, weights[p0:p1]), 1.0))
    return outs


def _weight_grads(
    weights,
    grads,
    scale: Tensor,
    plan: FoldGroupPlan,
    need_w: bool,
    need_gamma: bool,
) -> Tuple[List[Optional[Tensor]], Optional[Tensor]]:
    """The weights' gradients and ``sum(grad * w)`` of each output channel
    (None for a weight whose folded weight got no gradient)."""
    n = len(weights)
    used = [i for i in range(n) if grads[i] is not None]
    grad_ws: List[Optional[Tensor]] = [None] * n
    rows = None
    if need_gamma:
        rows = scale.new_zeros(scale.shape)
        if len(used) == n:  # all products at once, then one sum per run
            products = torch._foreach_mul(list(grads[:n]), list(weights))
            flat = _flatten(products).to(scale.dtype)
            del products
            start = 0
            for _, _, r0, r1, length in plan.runs:
                end = start + (r1 - r0) * length
                torch.sum(
                    flat[start:end].view(r1 - r0, length), 1, out=rows[r0:r1]
                )
                start = end
            del flat
        else:
            row = 0
            for i, channels in enumerate(plan.channels):
                if grads[i] is not None:
                    product = (grads[i] * weights[i]).to(scale.dtype)
                    torch.sum(
                        product.view(channels, -1),
                        1,
                        out=rows[row : row + channels],
                    )
                row += channels
    if need_w:
        factors = _expanded(scale, plan, weights)
        if len(used) == n:
            got = torch._foreach_mul(list(grads[:n]), factors)
        else:
            got = torch._foreach_mul(
                [grads[i] for i in used], [factors[i] for i in used]
            )
        for i, g in zip(used, got):
            grad_ws[i] = g
    return grad_ws, rows


def _fold(plan, weights, biases, betas, mean, scale):
    """The forward of :class:`_FoldGroup`: folded weights, folded bias and
    shift."""
    shift = mean.neg() if biases[0] is None else torch.cat(biases) - mean
    outs = _fold_weights(weights, scale, plan)
    if betas[0] is None:
        folded_b = scale * shift
    else:
        folded_b = torch.addcmul(torch.cat(betas), scale, shift)
    return outs, folded_b.to(plan.out_dtype), shift


class _FoldGroup(torch.autograd.Function):
    """Inputs: plan, n, ``(scale,)`` (the values of ``gamma * inv_std``
    as one vector, in a tuple so that autograd does not take it for an
    input: computed by the caller, held for the backward), then n
    weights, n conv biases (or None), n gammas (or None), n betas (or
    None), then running means and inverse stds as two flat vectors.
    Outputs: n folded weights and one flat folded bias."""

    @staticmethod
    def forward(ctx, plan, n, held, *tensors):
        (scale,) = held
        weights = tensors[:n]
        biases, betas = tensors[n : 2 * n], tensors[3 * n : 4 * n]
        mean, inv_std = tensors[4 * n], tensors[4 * n + 1]
        outs, folded_b, shift = _fold(
            plan, weights, biases, betas, mean, scale
        )
        ctx.plan, ctx.n = plan, n
        # Only the parameters are held, and per-channel vectors: the
        # factors (kept, not recomputed: a few hundred kB for a ResNet),
        # and the shift and inverse std (double backward); the running
        # mean is given back by the shift. No weight-sized tensor is kept.
        ctx.scale = scale
        ctx.inputs = tensors[: 4 * n]
        ctx.versions = _versions(weights, tensors[2 * n : 3 * n])
        ctx.save_for_backward(shift, inv_std)
        ctx.set_materialize_grads(False)
        return (*outs, folded_b)

    @staticmethod
    def backward(ctx, *grads):
        plan, n = ctx.plan, ctx.n
        weights, gammas = ctx.inputs[:n], ctx.inputs[2 * n : 3 * n]
        _check_versions(plan, weights, gammas, ctx.versions)
        if torch.is_grad_enabled():  # create_graph=True: differentiable
            return (None, None, None) + _fold_group_backward_autograd(
                ctx, grads
            )
        grad_ws, grad_b = grads[:n], grads[n]
        used = [g is not None for g in grad_ws]
        if not any(used):
            return (None,) * (3 + 4 * n + 2)
        shift, inv_std = ctx.saved_tensors
        scale = ctx.scale
        dtype = scale.dtype
        if grad_b is None:
            grad_b = scale.new_zeros(scale.shape)
        grad_b = grad_b.to(dtype)
        needs = ctx.needs_input_grad[3:]
        need_w = any(needs[:n])
        need_b = any(needs[n : 2 * n])
        need_gamma = any(needs[2 * n : 3 * n])
        grad_gamma = grad_bias = None
        grad_w, rows = _weight_grads(
            weights, grad_ws, scale, plan, need_w, need_gamma
        )
        if need_gamma:
            grad_gamma = torch.addcmul(rows, grad_b, shift).mul_(inv_std)
        if need_b:
            grad_bias = grad_b * scale
        # the engine casts each gradient to its input's dtype
        out_w = [
            g if needs[i] and used[i] else None for i, g in enumerate(grad_w)
        ]
        out_b = _split(grad_bias, plan, needs[n : 2 * n], used)
        out_g = _split(grad_gamma, plan, needs[2 * n : 3 * n], used)
        out_beta = _split(grad_b, plan, needs[3 * n : 4 * n], used)
        return (
            None,
            None,
            None,
            *out_w,
            *out_b,
            *out_g,
            *out_beta,
            None,
            None,
        )


def _watched(weights, gammas) -> List[Tensor]:
    """The inputs the backward computes from: weights, then gammas."""
    return list(weights) + ([] if gammas[0] is None else list(gammas))


def _versions(weights, gammas) -> List[int]:
    return [t._version for t in _watched(weights, gammas)]


def _check_versions(plan, weights, gammas, versions) -> None:
    """Raise as autograd does when a tensor the backward needs was
    modified in place after the forward."""
    n = len(weights)
    tensors = _watched(weights, gammas)
    if [t._version for t in tensors] == versions:
        return
    for k, (t, version) in enumerate(zip(tensors, versions)):
        if t._version != version:
            i = k % n
            name = plan.names[i] if plan.names else f'#{i}'
            what = 'the weight of conv' if k < n else 'gamma of the BN after'
            raise RuntimeError(
                'one of the variables needed for gradient computation '
                f'has been modified by an inplace operation: {what} '
                f'{name} is at version {t._version}; expected version '
                f'{version} instead.'
            )


def _split(
    flat: Optional[Tensor],
    plan: FoldGroupPlan,
    needs: Sequence[bool],
    used: Sequence[bool],
) -> List[Optional[Tensor]]:
    """Per-pair slices of a per-channel gradient; None where not needed or
    where the pair's folded weight got no gradient."""
    if flat is None:
        return [None] * len(needs)
    return [
        part if needs[i] and used[i] else None
        for i, part in enumerate(flat.split(plan.channels))
    ]


def _fold_group_backward_autograd(ctx, grads) -> tuple:
    """The backward as differentiable per-pair folds (double backward)."""
    plan, n = ctx.plan, ctx.n
    tensors = ctx.inputs
    shift, inv_std = ctx.saved_tensors
    grad_ws, grad_b = grads[:n], grads[n]
    offsets = [0]
    for c in plan.channels:
        offsets.append(offsets[-1] + c)
    result: List[Optional[Tensor]] = [None] * (4 * n + 2)
    for i in range(n):
        if grad_ws[i] is None:
            continue
        lo, hi = offsets[i], offsets[i + 1]
        inputs = [tensors[k * n + i] for k in range(4)]
        # the running mean from the shift (b - mean, or -mean): exact
        # without a conv bias; with one, b - mean may come back one rounding
        # of b away from the shift of the forward
        mean = -shift[lo:hi]
        if inputs[1] is not None:
            mean = mean + inputs[1].detach()
        with torch.enable_grad():
            w, b = fold_conv_bn(
                inputs[0],
                inputs[1],
                mean,
                None,
                inputs[2],
                inputs[3],
                0.0,
                inv_std=inv_std[lo:hi],
            )
        w, b = w.to(plan.out_dtype), b.to(plan.out_dtype)
        wanted = [
            (k, t)
            for k, t in enumerate(inputs)
            if t is not None and ctx.needs_input_grad[3 + k * n + i]
        ]
        if not wanted:
            continue
        outs, gouts = [w], [grad_ws[i]]
        if grad_b is not None:
            outs.append(b)
            gouts.append(grad_b[lo:hi])
        got = torch.autograd.grad(
            outs,
            [t for _, t in wanted],
            gouts,
            create_graph=True,
            allow_unused=True,
        )
        for (k, _), g in zip(wanted, got):
            result[k * n + i] = g
    return tuple(result)


def _factors(scale: Tensor, plan: FoldGroupPlan) -> List[Tensor]:
    """``scale`` cut into each pair's ``(C, 1, ..., 1)`` factors (views)."""
    if plan.factor_view is not None:
        return list(scale.view(plan.factor_view).split(plan.channels))
    return _unflatten(scale, plan.factor_shapes)


def fold_conv_bn_group(
    plan: FoldGroupPlan,
    weights: Sequence[Tensor],
    biases: Sequence[Optional[Tensor]],
    gammas: Sequence[Optional[Tensor]],
    betas: Sequence[Optional[Tensor]],
    mean: Tensor,
    inv_std: Tensor,
) -> Tuple[List[Tensor], Tensor, List[Tensor]]:
    """Fold a group of Conv->eval-BN pairs at once.

    Args:
        plan (FoldGroupPlan): The group's shapes and output dtype.
        weights (list[Tensor]): Contiguous conv weights, output channels on
            dimension 0.
        biases (list[Tensor | None]): The conv biases, all None or none.
        gammas (list[Tensor | None]): BN weights, all None or none.
        betas (list[Tensor | None]): BN biases, all None or none.
        mean (Tensor): All pairs' running means, concatenated.
        inv_std (Tensor): All pairs' ``1 / sqrt(var + eps)``, concatenated.

    Returns:
        tuple[list[Tensor], Tensor, list[Tensor]]: Each pair's folded
        weight (shaped as its conv weight) and all folded biases as one
        vector, in ``plan.out_dtype``, and each pair's factors ``gamma /
        sqrt(var + eps)`` shaped ``(C, 1, ..., 1)`` (not differentiable:
        for computing a folded weight again). A pair whose folded weight
        gets no gradient gets None for all its parameters, as in eval mode.
    """
    n = len(weights)
    for seq, what in (
        (biases, 'biases'),
        (gammas, 'gammas'),
        (betas, 'betas'),
    ):
        if len(seq) != n:
            raise ValueError(f'{what}: expected {n} entries, got {len(seq)}')
        if len({t is None for t in seq}) > 1:
            raise ValueError(f'{what} must be all None or all tensors')
    with torch.no_grad():
        scale = bn_scale(
            inv_std, None if gammas[0] is None else torch.cat(gammas)
        )
    factors = _factors(scale, plan)
    outs = _FoldGroup.apply(
        plan,
        n,
        (scale,),
        *weights,
        *biases,
        *gammas,
        *betas,
        mean,
        inv_std,
    )
    return list(outs[:n]), outs[n], factors
