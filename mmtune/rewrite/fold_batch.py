# Copyright (c) mmtune contributors. All rights reserved.
"""Tune mode's trainable pairs folded together, once per forward.

Folding pair by pair adds about four operations to the forward and as many
autograd nodes to the backward of each pair; a GPU training step mostly
waits for the CPU to launch operations, so that made tune mode slower than
eval mode. A :class:`FoldBatch` knows all pairs that one
:func:`~mmtune.rewrite.turn_on_fast_conv_bn_eval` call converted. The first
pair called with autograd recording folds every eligible pair of the model
with :func:`~mmtune.ops.fold_conv_bn_group` (one autograd node per group of
like pairs) and the others take their folded weight and bias from it.

A folded entry is used while it is valid:

- the backward pass through its group has not run yet (afterwards the
  entries are dropped and the next call folds anew);
- none of the tensors it was computed from changed (storage or version:
  optimizer steps, checkpoint loading, ``.to()``; the BN eps);
- it was folded for the autocast state of the call.

Anything else folds again. Batching is used only where it is safe: autograd
recording, outside backward passes (reentrant checkpoint recomputation),
without saved-tensor hooks (non-reentrant checkpointing and offloading
must find the tensors they saved), outside ``torch.compile`` and functorch
transforms, and for contiguous, non-transposed conv weights. Elsewhere the
pair folds alone, exactly as before.

A pair that the forward does not call, or whose output does not reach the
loss, gets no gradient at all, as in eval mode. Its parameters are
nevertheless inputs of the group's autograd node, so
``DistributedDataParallel(find_unused_parameters=True)`` would wait for
them: the engine layer turns batching off for such a wrapper.
"""

import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..ops import FoldGroupPlan, fold_conv_bn_group


def _private(module, name):
    return getattr(module, name, None) if module is not None else None


_graph_task_id = _private(torch._C, '_current_graph_task_id')
_saved_tensors_hooks = _private(
    getattr(torch._C, '_autograd', None), '_top_saved_tensors_default_hooks'
)
_functorch_stack = _private(
    getattr(torch._C, '_functorch', None), 'peek_interpreter_stack'
)
_CAN_BATCH = None not in (_graph_task_id, _saved_tensors_hooks)


def _compiling() -> bool:
    compiler = getattr(torch, 'compiler', None)
    return bool(compiler is not None and compiler.is_compiling())


def batch_allowed() -> bool:
    """Whether a pair called now may take a batch-folded weight."""
    return (
        _CAN_BATCH
        and torch.is_grad_enabled()
        and not torch.is_inference_mode_enabled()
        and _graph_task_id() == -1
        and _saved_tensors_hooks(False) is None
        and (_functorch_stack is None or _functorch_stack() is None)
        and not _compiling()
    )


def bn_uses_running_stats(bn: nn.Module) -> bool:
    """Whether ``bn`` normalises with its running statistics right now."""
    return (
        not bn.training
        and bn.running_mean is not None
        and bn.running_var is not None
    )


def check_batch_arg(batch) -> None:
    """Raise a ValueError naming ``batch`` unless it is 'auto', True or
    False."""
    if not (batch is True or batch is False or batch == 'auto'):
        raise ValueError(f"batch must be 'auto', True or False, got {batch!r}")


def _pair_tensors(conv: nn.Module, bn: nn.Module) -> tuple:
    # the modules' dicts, not nn.Module.__getattr__: this runs at every call
    params, bn_params, buffers = conv._parameters, bn._parameters, bn._buffers
    return (
        params['weight'],
        params.get('bias'),
        bn_params.get('weight'),
        bn_params.get('bias'),
        buffers['running_mean'],
        buffers['running_var'],
        buffers.get('num_batches_tracked'),
    )


def _stamp(eps: float, tensors: tuple) -> tuple:
    """Storage and version of each tensor, and the BN eps."""
    return (eps,) + tuple(
        None if t is None else (t.data_ptr(), t._version) for t in tensors
    )


def _trainable(tensors: tuple) -> bool:
    """Autograd would record this pair's fold, and the group can take it."""
    weight = tensors[0]
    return (
        any(t is not None and t.requires_grad for t in tensors[:4])
        and weight.is_contiguous()
        and weight.numel() > 0
    )


def _row_length(weight: Tensor) -> int:
    return weight.numel() // max(weight.shape[0], 1)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _Folded:
    """The entries of one fold, by member index (weakly referenced by the
    groups' backward hooks)."""

    __slots__ = ('entries', '__weakref__')

    def __init__(self):
        self.entries: Dict[int, _Entry] = {}


class _Entry:
    """One pair's folded weight and bias.

    The weight is held until the pair takes it, then only weakly: the
    convolution keeps it for its backward and frees it there, as when
    folding pair by pair; a pair called again in the same forward finds it
    alive.
    """

    __slots__ = ('weight', 'weak', 'bias', 'stamp')

    def __init__(self, weight: Tensor, bias: Tensor, stamp: tuple):
        self.weight, self.bias, self.stamp = weight, bias, stamp
        self.weak = None

    def take(self) -> Optional[Tensor]:
        weight = self.weight
        if weight is not None:
            self.weak, self.weight = weakref.ref(weight), None
            return weight
        return self.weak()


class FoldBatch:
    """The pairs of one model that fold together.

    Args:
        device_types (Sequence[str], optional): Device types on which pairs
            are batched; None for all. Defaults to ``('cuda',)``: on a CPU
            the CPU does the arithmetic too, and folding pair by pair is as
            fast.
    """

    def __init__(self, device_types: Optional[Sequence[str]] = ('cuda',)):
        self.device_types = (
            None if device_types is None else frozenset(device_types)
        )
        self.enabled = True
        self.members: List[Tuple[nn.Module, nn.Module, str]] = []
        self._reset()

    def _reset(self) -> None:
        # autocast key -> the latest fold for it
        self._folded: Dict[tuple, _Folded] = {}
        # group layout -> (plan, eps as a float or a per-channel vector)
        self._plans: Dict[tuple, tuple] = {}
        self.folds = 0  # how many times the batch was folded

    def __getstate__(self):
        return {
            'device_types': self.device_types,
            'enabled': self.enabled,
            'members': self.members,
        }

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def add(self, conv: nn.Module, bn: nn.Module, name: str = '') -> int:
        """Register a pair; returns its index for :meth:`take`."""
        self.members.append((conv, bn, name))
        return len(self.members) - 1

    def take(
        self, index: int, conv: nn.Module, bn: nn.Module
    ) -> Optional[Tuple[Tensor, Tensor]]:
        """The folded weight and bias of member ``index``, or None when the
        pair must fold on its own (see the module docstring).

        The caller has checked that the pair folds now (BN in eval mode
        with running statistics, no hooks).
        """
        if not self.enabled:
            return None
        tensors = _pair_tensors(conv, bn)
        weight = tensors[0]
        device = weight.device
        if (
            self.device_types is not None
            and device.type not in self.device_types
        ) or not _trainable(tensors):
            return None
        if not batch_allowed():
            return None
        key = (device, _autocast_dtype(device.type))
        folded = self._folded.get(key)
        entry = folded.entries.get(index) if folded is not None else None
        weight = None
        if entry is not None and entry.stamp == _stamp(bn.eps, tensors):
            weight = entry.take()
        if weight is None:
            entry = self._fold(key).entries.get(index)
            if entry is None:
                return None
            weight = entry.take()
        return weight, entry.bias

    def _fold(self, key: tuple) -> _Folded:
        device, amp_dtype = key
        groups: Dict[tuple, List[int]] = {}
        pair_tensors: Dict[int, tuple] = {}
        for i, (conv, bn, _) in enumerate(self.members):
            tensors = _pair_tensors(conv, bn)
            weight = tensors[0]
            if (
                not bn_uses_running_stats(bn)
                or weight.device != device
                or not _trainable(tensors)
            ):
                continue
            pair_tensors[i] = tensors
            group_key = (
                weight.dtype,
                tensors[4].dtype,
                tensors[1] is None,
                tensors[2] is None,
                tensors[3] is None,
            )
            groups.setdefault(group_key, []).append(i)
        folded = _Folded()
        for indices in groups.values():
            # equal row lengths next to each other: fewer runs to scale
            indices.sort(key=lambda i: _row_length(pair_tensors[i][0]))
        for (w_dtype, *_), indices in groups.items():
            # autocast would cast the folded weight for the conv anyway
            if amp_dtype is not None and w_dtype != torch.float64:
                out_dtype = amp_dtype
            else:
                out_dtype = w_dtype
            tensors = [pair_tensors[i] for i in indices]
            self._fold_group(indices, tensors, device, out_dtype, folded)
        self._folded[key] = folded
        self.folds += 1
        return folded

    def _plan(
        self, indices: List[int], tensors: List[tuple], device, out_dtype
    ) -> tuple:
        bns = [self.members[i][1] for i in indices]
        shapes = tuple(t[0].shape for t in tensors)
        eps = tuple(float(bn.eps) for bn in bns)
        plan_key = (tuple(indices), shapes, device, out_dtype, eps)
        cached = self._plans.get(plan_key)
        if cached is not None:
            return cached
        if len(self._plans) >= 16:
            self._plans.clear()
        names = [self.members[i][2] or f'#{i}' for i in indices]
        plan = FoldGroupPlan(shapes, out_dtype, names)
        if len(set(eps)) == 1:
            eps_value = eps[0]
        else:
            eps_value = torch.cat(
                [torch.full_like(t[5], e) for t, e in zip(tensors, eps)]
            )
        self._plans[plan_key] = plan, eps_value
        return plan, eps_value

    def _fold_group(
        self,
        indices: List[int],
        tensors: List[tuple],
        device,
        out_dtype,
        folded: _Folded,
    ) -> None:
        members = [self.members[i] for i in indices]
        plan, eps = self._plan(indices, tensors, device, out_dtype)
        with torch.no_grad():
            mean = torch.cat([t[4] for t in tensors])
            inv_std = torch.cat([t[5] for t in tensors]).add_(eps).rsqrt_()
        weights, bias = fold_conv_bn_group(
            plan,
            [t[0] for t in tensors],
            [t[1] for t in tensors],
            [t[2] for t in tensors],
            [t[3] for t in tensors],
            mean,
            inv_std,
        )
        biases = bias.split(plan.channels)
        for i, (_, bn, _), t, w, b in zip(
            indices, members, tensors, weights, biases
        ):
            folded.entries[i] = _Entry(w, b, _stamp(bn.eps, t))
        node = bias.grad_fn
        if node is not None:
            node.register_hook(_Expire(folded, indices))


class _Expire:
    """Backward hook of a group: its graph is gone after the backward pass,
    so its entries are dropped and the next call folds anew."""

    def __init__(self, folded: _Folded, indices: Sequence[int]):
        self.folded = weakref.ref(folded)
        self.indices = tuple(indices)

    def __call__(self, *_) -> None:
        folded = self.folded()
        if folded is not None:
            for i in self.indices:
                folded.entries.pop(i, None)
