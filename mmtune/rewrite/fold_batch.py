# Copyright (c) mmtune contributors. All rights reserved.
"""Tune mode's pairs folded together, once per forward of the model.

Folding pair by pair adds about four operations to the forward and as many
autograd nodes to the backward of each pair; a GPU training step mostly
waits for the CPU to launch operations, so that made tune mode slower than
eval mode. A :class:`FoldBatch` knows all pairs that one
:func:`~mmtune.rewrite.turn_on_fast_conv_bn_eval` call converted. Inside one
call of the model that was turned on (between its forward pre-hook and its
forward hook), the first pair that folds computes the per-channel factors
and folded biases of every eligible pair with
:func:`~mmtune.ops.fold_bn_group` (one autograd node per group of like
trainable pairs, plain operations for frozen ones); each pair, when it
runs, takes its factors and bias and multiplies its weight by the factors
(one operation: the only weight-sized tensor a fold makes, so that no more
than one exists at a time, as pair by pair). Nothing of it outlives that
call of the model: the folded tensors are let go when it returns.

Inside that call, a folded entry is used only while:

- the pair is called from code that the call runs (a call that a
  ``KeyboardInterrupt`` stopped closes nothing: a block called on its own
  afterwards folds alone);
- the backward pass through its group has not run (a backward inside the
  forward drops the entries);
- none of the tensors it was computed from was replaced or changed in place
  (storage, version and ``requires_grad`` of each, and the BN eps);
- it was folded for the autocast and grad mode of the call.

Otherwise the pair folds alone. A write through ``.data`` bumps no version,
so one made by the model's own code in the middle of its forward, after the
batch folded and before the pair runs, would not be seen; writes between
calls of the model (optimizers, EMA swaps, pruning, loading) always are, as
every call folds anew. Batching is used only where it is safe: outside
backward passes (reentrant checkpoint recomputation), without saved-tensor
hooks (non-reentrant checkpointing and offloading must find the tensors they
saved), outside ``torch.compile`` and functorch transforms, for convs
without forward pre-hooks, and for non-transposed conv weights (of any
memory layout: each pair multiplies its own weight, as alone).
Elsewhere the pair folds alone, exactly as before.

A pair that the forward does not call, or whose output does not reach the
loss, gets no gradient at all, as in eval mode. Its BN parameters (and conv
bias) are nevertheless inputs of the group's autograd node, so
``DistributedDataParallel(find_unused_parameters=True)`` would wait for
them: the engine layer turns batching off for such a wrapper.
"""

import sys
import types
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..ops import (
    ConvBNFold,
    FoldGroupPlan,
    autocast_dtype,
    fold_bn_group,
    is_compiling,
    scale_weight,
)


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


def batch_allowed() -> bool:
    """Whether a pair called now may take a batch-folded weight."""
    return (
        _CAN_BATCH
        and not is_compiling()  # first: torch.compile traces no further
        and _graph_task_id() == -1
        and _saved_tensors_hooks(False) is None
        and (_functorch_stack is None or _functorch_stack() is None)
    )


def runs_within(outer: types.FrameType, frame) -> bool:
    """Whether the Python frame ``frame`` is ``outer`` or was called, at
    any depth, from it (a walk up ``frame``'s callers)."""
    while frame is not None:
        if frame is outer:
            return True
        frame = frame.f_back
    return False


def check_batch_arg(batch) -> None:
    """Raise a ValueError naming ``batch`` unless it is 'auto', True or
    False."""
    if not (batch is True or batch is False or batch == 'auto'):
        raise ValueError(f"batch must be 'auto', True or False, got {batch!r}")


def _stamp(bn, cp: dict, bp: dict, bb: dict) -> tuple:
    """What a pair's fold is computed from: the BN eps, and the storage,
    version and ``requires_grad`` of each tensor (``cp``/``bp``/``bb``: the
    conv's parameters, the BN's parameters and buffers; a missing one is
    None). One flat tuple, built without a loop: this runs at every
    call."""
    w, b = cp.get('weight'), cp.get('bias')
    g, be = bp.get('weight'), bp.get('bias')
    mean, var = bb.get('running_mean'), bb.get('running_var')
    return (
        bn.eps,
        None if w is None else w.data_ptr(),
        None if w is None else w._version,
        None if w is None else w.requires_grad,
        None if b is None else b.data_ptr(),
        None if b is None else b._version,
        None if b is None else b.requires_grad,
        None if g is None else g.data_ptr(),
        None if g is None else g._version,
        None if g is None else g.requires_grad,
        None if be is None else be.data_ptr(),
        None if be is None else be._version,
        None if be is None else be.requires_grad,
        None if mean is None else mean.data_ptr(),
        None if mean is None else mean._version,
        None if var is None else var.data_ptr(),
        None if var is None else var._version,
    )


def needs_grad(weight: Tensor, cp: dict, bp: dict) -> bool:
    """Whether any parameter of a pair requires grad (``cp``/``bp``: the
    conv's and the BN's parameters): its fold is then recorded by autograd
    when grad mode is on."""
    if weight.requires_grad:
        return True
    bias, gamma, beta = cp.get('bias'), bp.get('weight'), bp.get('bias')
    return (
        (bias is not None and bias.requires_grad)
        or (gamma is not None and gamma.requires_grad)
        or (beta is not None and beta.requires_grad)
    )


def _batchable(conv: nn.Module, cp: dict, bp: dict, bb: dict) -> bool:
    """Whether the pair's tensors are the ones its modules' forwards read,
    and a group can take them."""
    weight = cp.get('weight')
    return (
        weight is not None
        and 'bias' in cp
        and 'weight' in bp
        and 'bias' in bp
        and bb.get('running_mean') is not None
        and bb.get('running_var') is not None
        and not conv._forward_pre_hooks
        and weight.numel() > 0
    )


class _Folded:
    """The entries of one fold, by member index (weakly referenced by the
    groups' backward hooks).

    An entry is a list ``[factor, bias, dtype, stamp, inputs]`` (a list,
    not an object: one is read at every call): the pair's factors and
    folded bias, and the dtype of its folded weight. The pair takes it
    once: the entry is dropped then, so that its folded weight, made then,
    lives only as long as the pair's convolution holds it (through its
    forward: :func:`~mmtune.ops.conv_forward_folded` keeps a recipe, not
    the weight, for the backward). A pair called again in the same forward
    folds alone.
    """

    __slots__ = ('entries', '__weakref__')

    def __init__(self):
        self.entries: Dict[int, list] = {}


class FoldBatch:
    """The pairs of one model that fold together, once per call of it.

    :meth:`open` and :meth:`close` mark a call of the model (tune mode
    registers them as its forward pre-hook and forward hook); outside such a
    call :meth:`take` gives nothing and every pair folds alone.

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
        # (device, autocast dtype, grad mode) -> this call's fold for it
        self._folded: Dict[tuple, _Folded] = {}
        self._open = False
        self._outer: Optional[types.FrameType] = None
        # group layout -> (plan, eps as a float or a per-channel vector)
        self._plans: Dict[tuple, tuple] = {}
        # each member's module and dicts, read at every call (not through
        # nn.Module.__getattr__); built at the first call, since a copy or
        # an unpickled batch may get its modules before they are whole
        self._dicts: Optional[list] = None
        self.folds = 0  # how many times the batch was folded

    def __getstate__(self):
        # not the members: each pair that is copied or unpickled adds
        # itself to the copy of its batch (TunePair), so that a copy of one
        # block holds that block's pairs, not a copy of the whole model
        return {'device_types': self.device_types, 'enabled': self.enabled}

    def __setstate__(self, state):
        self.device_types = state['device_types']
        self.enabled = state['enabled']
        # (pairs may have added themselves already; a batch pickled with
        # its members, before they were left out, drops them here)
        self.__dict__.setdefault('members', [])
        self._reset()

    def add(self, conv: nn.Module, bn: nn.Module, name: str = '') -> int:
        """Register a pair; returns its index for :meth:`take`."""
        self.members.append((conv, bn, name))
        self._dicts = None
        return len(self.members) - 1

    def open(self, outer: Optional[types.FrameType] = None) -> None:
        """A call of the model begins: nothing folded before it is used.

        Args:
            outer (frame, optional): The Python frame of that call. Pairs
                take folds only while it is running, from code it called:
                a call that a ``BaseException`` (``KeyboardInterrupt``)
                stopped runs no forward hook to :meth:`close` the batch,
                and a block called on its own afterwards must not take
                what that call folded (a write through ``.data`` since
                then would not be seen).
        """
        self._folded = {}
        self._outer = outer
        self._open = True

    def close(self) -> None:
        """The call of the model returned: let go of what it folded."""
        self._folded = {}
        self._outer = None
        self._open = False

    def _inside_call(self) -> bool:
        """Whether the caller of :meth:`take`'s caller runs inside the call
        that opened the batch (one walk up the stack, about 15 frames for
        a ResNet block's conv)."""
        outer = self._outer
        return outer is None or runs_within(outer, sys._getframe(2))

    def take(self, index: int) -> Optional[ConvBNFold]:
        """The fold of member ``index``, or None when the pair must fold on
        its own (see the module docstring; a pair takes its fold once per
        call of the model).

        The caller has checked that the pair folds now (BN in eval mode
        with running statistics, no hooks, modules of the types it was
        turned on with). This runs at every call of every pair, so it reads
        the modules' dicts directly, not through ``nn.Module.__getattr__``.
        """
        if (
            not self._open
            or not self.enabled
            or not batch_allowed()
            or not self._inside_call()
        ):
            return None
        dicts = self._dicts
        if dicts is None:
            dicts = self._build_dicts()
        conv, bn, cp, bp, bb = dicts[index]
        weight = cp.get('weight')
        if weight is None:
            return None
        device = weight.device
        types = self.device_types
        if types is not None and device.type not in types:
            return None
        key = (device, autocast_dtype(device.type), torch.is_grad_enabled())
        folded = self._folded.get(key)
        if folded is None:
            folded = self._fold(key)
        entry = folded.entries.pop(index, None)
        # the stamp: the same tensors, unchanged since they were folded (a
        # pre-hook added since could write through .data: fold alone)
        if entry is None or conv._forward_pre_hooks:
            return None
        try:
            if entry[3] != _stamp(bn, cp, bp, bb):
                return None
        except RuntimeError:  # a tensor replaced by an inference tensor
            return None
        factor = entry[0]
        return ConvBNFold(
            scale_weight(weight, factor, entry[2]), entry[1], weight, factor
        )

    def _build_dicts(self) -> list:
        self._dicts = [
            (conv, bn, conv._parameters, bn._parameters, bn._buffers)
            for conv, bn, _ in self.members
        ]
        return self._dicts

    def _fold(self, key: tuple) -> _Folded:
        device, amp_dtype, grad_enabled = key
        groups: Dict[tuple, List[int]] = {}
        pair_tensors: Dict[int, tuple] = {}
        stamps: Dict[int, tuple] = {}
        dicts = self._dicts
        for i, (conv, bn, cp, bp, bb) in enumerate(dicts):
            if (
                bn.training
                or not _batchable(conv, cp, bp, bb)
                or cp['weight'].device != device
            ):
                continue
            try:
                stamps[i] = _stamp(bn, cp, bp, bb)
            except RuntimeError:
                # inference tensors have no version to stamp: fold alone
                continue
            weight, bias = cp['weight'], cp['bias']
            gamma, beta = bp['weight'], bp['bias']
            mean, var = bb['running_mean'], bb['running_var']
            pair_tensors[i] = (weight, bias, gamma, beta, mean, var)
            group_key = (
                weight.dtype,
                var.dtype,
                bias is None,
                gamma is None,
                beta is None,
                grad_enabled and needs_grad(weight, cp, bp),
            )
            groups.setdefault(group_key, []).append(i)
        folded = _Folded()
        for (w_dtype, *_, record), indices in groups.items():
            # autocast would cast the folded weight for the conv anyway
            if amp_dtype is not None and w_dtype != torch.float64:
                out_dtype = amp_dtype
            else:
                out_dtype = w_dtype
            tensors = [pair_tensors[i] for i in indices]
            with torch.set_grad_enabled(record):
                self._fold_group(
                    indices, tensors, stamps, device, out_dtype, folded
                )
        self._folded[key] = folded
        self.folds += 1
        return folded

    def _plan(
        self, indices: List[int], tensors: List[tuple], device, out_dtype
    ) -> tuple:
        shapes = tuple([t[0].shape for t in tensors])
        eps = tuple([self._dicts[i][1].eps for i in indices])
        plan_key = (tuple(indices), shapes, device, out_dtype, eps)
        cached = self._plans.get(plan_key)
        if cached is not None:
            return cached
        if len(self._plans) >= 16:
            self._plans.clear()
        names = [self.members[i][2] or f'#{i}' for i in indices]
        plan = FoldGroupPlan(shapes, out_dtype, names)
        if len(set(eps)) == 1:
            eps_value = float(eps[0])
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
        stamps: Dict[int, tuple],
        device,
        out_dtype,
        folded: _Folded,
    ) -> None:
        plan, eps = self._plan(indices, tensors, device, out_dtype)
        _, biases, gammas, betas, means, variances = zip(*tensors)
        with torch.no_grad():
            mean = torch.cat(means)
            inv_std = torch.cat(variances).add_(eps).rsqrt_()
        factors, folded_bs = fold_bn_group(
            plan, biases, gammas, betas, mean, inv_std
        )
        entries = folded.entries
        # the inputs are held so that no other tensor can take their
        # storage: an equal data_ptr in the stamp means the same tensor
        for i, factor, bias, inputs in zip(
            indices, factors, folded_bs, tensors
        ):
            entries[i] = [factor, bias, out_dtype, stamps[i], inputs]
        node = folded_bs[0].grad_fn
        if node is not None:
            node.register_hook(_Expire(folded, indices))


class _Expire:
    """Backward hook of a group: its graph is gone after the backward pass,
    so its entries are dropped and later calls in the same forward fold
    alone."""

    def __init__(self, folded: _Folded, indices: Sequence[int]):
        self.folded = weakref.ref(folded)
        self.indices = tuple(indices)

    def __call__(self, *_) -> None:
        folded = self.folded()
        if folded is not None:
            for i in self.indices:
                folded.entries.pop(i, None)
