# Copyright (c) mmtune contributors. All rights reserved.
"""Fold many Conv->BN pairs at once, in a few ``foreach`` operations.

Folding pair by pair costs about six small operations per pair in the
forward and as many autograd nodes in the backward. With 50 pairs that is
600 operations for the CPU to launch per step, more than eval mode's
batch-norm calls cost, and a GPU training step is usually waiting on the
CPU. A :class:`FoldBatch` folds the pairs of one chunk together when the
first of them is called and hands each pair its folded weight and bias when
it is called: the arithmetic is the same, element for element.

Each folded tensor is used once. A pair called again (the next forward)
finds its entry taken and the whole chunk is folded anew. An entry is also
dropped when any tensor it was computed from changed (optimizer step,
checkpoint loading, ``.to()``), and when a backward pass went through the
chunk's fold (its graph is then freed). Folding in a batch happens only
with autograd recording, outside backward passes (reentrant checkpoint
recomputation), outside saved-tensor hooks (non-reentrant checkpointing
must recompute exactly what it saved) and outside ``torch.compile``;
everywhere else the pair folds on its own.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..ops import fold_conv_bn_foreach

#: Pairs folded together. Several chunks let DDP reduce the gradients of
#: one chunk while autograd still computes those of the layers before it.
CHUNK_SIZE = 16


def bn_uses_running_stats(bn: nn.Module) -> bool:
    """Whether ``bn`` normalises with its running statistics right now."""
    return (
        not bn.training
        and bn.running_mean is not None
        and bn.running_var is not None
    )


def _private(module, name):
    return getattr(module, name, None) if module is not None else None


_graph_task_id = _private(torch._C, '_current_graph_task_id')
_saved_tensors_hooks = _private(
    getattr(torch._C, '_autograd', None), '_top_saved_tensors_default_hooks'
)


def batch_fold_allowed() -> bool:
    """Whether a pair called now may take a batch-folded weight."""
    compiler = getattr(torch, 'compiler', None)
    if compiler is not None and compiler.is_compiling():
        return False  # dynamo traces the plain fold, without graph breaks
    if _graph_task_id is None or _saved_tensors_hooks is None:
        return False
    return (
        torch.is_grad_enabled()
        and not torch.is_inference_mode_enabled()
        and _graph_task_id() == -1
        and _saved_tensors_hooks(False) is None
    )


def _pair_tensors(conv: nn.Module, bn: nn.Module) -> tuple:
    # the modules' dicts, not nn.Module.__getattr__: this runs at every call
    params, buffers = conv._parameters, bn._buffers
    bn_params = bn._parameters
    return (
        params['weight'],
        params.get('bias'),
        buffers['running_mean'],
        buffers['running_var'],
        buffers.get('num_batches_tracked'),
        bn_params.get('weight'),
        bn_params.get('bias'),
    )


def _stamp(eps: float, tensors: tuple) -> tuple:
    """What a folded entry depends on: storage, version and the BN eps."""
    return (eps,) + tuple(
        None if t is None else (t.data_ptr(), t._version) for t in tensors
    )


def _needs_grad(tensors: tuple) -> bool:
    # conv weight and bias, BN weight and bias
    return any(
        t is not None and t.requires_grad
        for t in (tensors[0], tensors[1], tensors[5], tensors[6])
    )


def needs_grad(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether autograd would record the fold of this pair now."""
    return torch.is_grad_enabled() and _needs_grad(_pair_tensors(conv, bn))


class _Entry:
    __slots__ = ('weight', 'bias', 'stamp')

    def __init__(self, weight: Tensor, bias: Tensor, stamp: tuple):
        self.weight, self.bias, self.stamp = weight, bias, stamp


class FoldBatch:
    """The pairs of one chunk, folded together.

    Args:
        members (list[tuple[nn.Module, nn.Module]]): ``(conv, bn)`` of each
            pair; no transposed convs.
    """

    def __init__(self, members: Sequence[Tuple[nn.Module, nn.Module]]):
        self.members = list(members)
        self._reset()

    def _reset(self) -> None:
        self.entries: Optional[List[Optional[_Entry]]] = None
        self.generation = 0
        self.folds = 0  # how many times the chunk was folded

    def __getstate__(self):
        return {'members': self.members}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def take(self, index: int) -> Optional[Tuple[Tensor, Tensor]]:
        """The folded weight and bias of member ``index``, used once.

        The caller checked that the pair folds now and that
        :func:`batch_fold_allowed`. Returns None if autograd has nothing to
        record for this pair, or it cannot be folded with the others: then
        it folds alone.
        """
        conv, bn = self.members[index]
        tensors = _pair_tensors(conv, bn)
        if not _needs_grad(tensors):
            return None
        entries = self.entries
        entry = entries[index] if entries is not None else None
        if entry is None or entry.stamp != _stamp(bn.eps, tensors):
            self._fold()
            entries = self.entries
            entry = entries[index]
            if entry is None:
                return None
        entries[index] = None
        return entry.weight, entry.bias

    def _fold(self) -> None:
        groups: Dict[tuple, List[int]] = {}
        for i, (conv, bn) in enumerate(self.members):
            if not (
                bn_uses_running_stats(bn)
                and _needs_grad(_pair_tensors(conv, bn))
            ):
                continue
            weight = conv.weight
            key = (
                weight.dim(),
                weight.dtype,
                weight.device,
                bn.running_var.dtype,
                conv.bias is None,
                bn.weight is None,
                bn.bias is None,
                bn.eps,
            )
            groups.setdefault(key, []).append(i)
        self.generation += 1
        self.folds += 1
        entries: List[Optional[_Entry]] = [None] * len(self.members)
        nodes = set()
        for key, indices in groups.items():
            convs = [self.members[i][0] for i in indices]
            bns = [self.members[i][1] for i in indices]
            eps = key[-1]
            with torch.no_grad():
                variances = [bn.running_var for bn in bns]
                inv_stds = torch._foreach_rsqrt(
                    torch._foreach_add(variances, eps)
                )
            weights, biases = fold_conv_bn_foreach(
                [c.weight for c in convs],
                None if key[4] else [c.bias for c in convs],
                [bn.running_mean for bn in bns],
                inv_stds,
                None if key[5] else [bn.weight for bn in bns],
                None if key[6] else [bn.bias for bn in bns],
            )
            dtype = key[1]
            for i, conv, bn, weight, bias in zip(
                indices, convs, bns, weights, biases
            ):
                stamp = _stamp(bn.eps, _pair_tensors(conv, bn))
                entries[i] = _Entry(weight.to(dtype), bias.to(dtype), stamp)
            for tensor in (weights[0], biases[0]):
                if tensor.grad_fn is not None:
                    nodes.add(tensor.grad_fn)
        self.entries = entries
        generation = self.generation

        def expire(*_):
            # A backward pass went through the fold: the graph of entries
            # not taken yet is freed.
            if self.generation == generation:
                self.entries = None

        for node in nodes:
            node.register_hook(expire)


def make_fold_batches(
    members: Sequence[Tuple[nn.Module, nn.Module]],
    chunk_size: Optional[int] = None,
) -> List[Tuple[FoldBatch, List[int]]]:
    """Split ``members`` into chunks of ``chunk_size`` (default
    :data:`CHUNK_SIZE`; 0 folds every pair alone); returns each chunk and
    the positions in ``members`` of its pairs."""
    if chunk_size is None:
        chunk_size = CHUNK_SIZE
    batches = []
    if chunk_size <= 0:
        return batches
    for start in range(0, len(members), chunk_size):
        chunk = list(members[start : start + chunk_size])
        positions = list(range(start, start + len(chunk)))
        batches.append((FoldBatch(chunk), positions))
    return batches
