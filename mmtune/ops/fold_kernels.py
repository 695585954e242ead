# Copyright (c) mmtune contributors. All rights reserved.
"""A group's fold and its backward as compiled kernels (CUDA).

Folded eagerly, a group of 42 pairs (ResNet-50's trainable stages) costs
the CPU about 4 ms per training step on the H200 machine, forward and
backward, mostly launching small operations; the step waits for it. The
same arithmetic compiled by ``torch.compile`` (inductor, with its combo
kernels, which put independent element-wise loops in one launch) costs
about 1 ms (measured side by side, docs/benchmark.md).

The kernels are pure functions of tensors: :class:`_FoldGroup
<mmtune.ops.fold_group>` stays the autograd node and keeps its semantics
(no gradient for a pair whose folded weight got none, the in-place check,
double backward); it calls these when they are available and all of a
group's weights got gradients, and its eager code otherwise. They compute
the same formulas in the same precision (inputs promoted to the BN
statistics' dtype, results rounded once to the output dtype); reductions
may add in another order.

Compiled for CUDA tensors only (on a CPU the fold is not launch-bound, and
inductor would need a C++ compiler). The first fold of a group compiles,
about 10-20 s. Set the environment variable ``MMTUNE_COMPILE_FOLD=0``, or
:data:`ENABLED` to False, to fold eagerly; a compilation that fails is
reported once and the process folds eagerly from then on.
"""

import os
import warnings
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

ENABLED = os.environ.get('MMTUNE_COMPILE_FOLD', '1') != '0'
_failed: Optional[str] = None


def _factor(s: Tensor, w: Tensor) -> Tensor:
    """Per-output-channel factors shaped to broadcast over a weight."""
    return s.view((-1,) + (1,) * (w.dim() - 1))


def make_forward(channels: Sequence[int], out_dtype: torch.dtype) -> Callable:
    """``(weights, biases, gammas, betas, mean, inv_std) -> (folded weights,
    folded bias, scale, shift)`` for one group layout."""
    channels = tuple(channels)

    def forward(weights, biases, gammas, betas, mean, inv_std):
        scale = inv_std if gammas[0] is None else torch.cat(gammas) * inv_std
        shift = -mean if biases[0] is None else torch.cat(biases) - mean
        if betas[0] is None:
            bias = scale * shift
        else:
            bias = torch.cat(betas) + scale * shift
        outs = [
            (w * _factor(s, w)).to(out_dtype)
            for w, s in zip(weights, scale.split(channels))
        ]
        return outs, bias.to(out_dtype), scale, shift

    return forward


def make_backward(channels: Sequence[int]) -> Callable:
    """``(weights, grads, grad_bias, scale, shift, inv_std, need_w,
    need_gamma, need_b) -> (weight grads, gamma grads, conv-bias grads)``
    with every folded weight's gradient given."""
    channels = tuple(channels)

    def backward(
        weights,
        grads,
        grad_b,
        scale,
        shift,
        inv_std,
        need_w,
        need_gamma,
        need_b,
    ):
        dtype = scale.dtype
        grad_b = grad_b.to(dtype)
        grad_ws = grad_gamma = grad_bias = None
        if need_w:
            grad_ws = [
                g.to(dtype) * _factor(s, g)
                for g, s in zip(grads, scale.split(channels))
            ]
        if need_gamma:
            rows = torch.cat(
                [
                    (g.to(dtype) * w.to(dtype)).flatten(1).sum(1)
                    for g, w in zip(grads, weights)
                ]
            )
            grad_gamma = (rows + grad_b * shift) * inv_std
        if need_b:
            grad_bias = grad_b * scale
        return grad_ws, grad_gamma, grad_bias, grad_b

    return backward


class FoldKernels:
    """The compiled forward and backward of one group layout."""

    def __init__(self, channels: Sequence[int], out_dtype: torch.dtype):
        options = {'combo_kernels': True}
        self.forward = torch.compile(
            make_forward(channels, out_dtype),
            dynamic=False,
            fullgraph=True,
            options=options,
        )
        self.backward = torch.compile(
            make_backward(channels),
            dynamic=False,
            fullgraph=True,
            options=options,
        )


def kernels_for(
    channels: Sequence[int], out_dtype: torch.dtype, device: torch.device
) -> Optional[FoldKernels]:
    """Compiled kernels for a group on ``device``, or None to fold
    eagerly."""
    if not ENABLED or _failed is not None or device.type != 'cuda':
        return None
    if not hasattr(torch, 'compile'):
        return None
    return FoldKernels(channels, out_dtype)


def call(fn: Callable, *args) -> Optional[List]:
    """``fn(*args)``, or None (and eager folding from now on) if compiling
    or running it fails."""
    global _failed
    if _failed is not None:
        return None
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001  (fall back, never crash)
        _failed = f'{type(exc).__name__}: {str(exc).splitlines()[0][:200]}'
        warnings.warn(
            'mmtune: compiling the batched fold failed; folding without '
            f'compiled kernels from now on (same results). {_failed}',
            RuntimeWarning,
            stacklevel=2,
        )
        return None
