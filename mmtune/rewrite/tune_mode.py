# Copyright (c) mmtune contributors. All rights reserved.
"""Tune mode: Conv->eval-BN pairs fold the BN into the conv at every call.

For each pair found by :mod:`.analysis` the conv and the BN get a
``forward`` on the instance (class, parameters, buffers and ``state_dict``
are untouched). At every call the conv decides:

- if its BN is in eval mode with running statistics, no hook would see the
  difference, and the call comes from the forward that the analysis
  checked, it returns ``conv(x, w * s, beta + s * (b - mean))`` and hands
  that very tensor to the BN, which passes it through;
- otherwise both compute exactly what they would without mmtune (a BN in
  train mode normalises with batch statistics and updates its running
  statistics as usual).

A BN that receives anything other than the handed-over tensor computes as
usual; the pair then stops folding and warns, since its analysis was wrong.
"""

import sys
import time
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_mod

from ..ops import bn_inv_std, conv_forward_with, fold_conv_bn
from .analysis import (
    Analysis,
    Pair,
    analyse,
    frame_codes,
    instance_forward,
    is_mmtune_forward,
)
from .fold_batch import (
    FoldBatch,
    _is_compiling,
    _pair_stamp,
    check_batch_arg,
    needs_grad,
)
from .report import ConvBNReport, SkipRecord

_CALL_IMPL_CODES = frozenset(
    fn.__code__
    for fn in (
        nn.Module._call_impl,
        getattr(nn.Module, '_wrapped_call_impl', None),
    )
    if fn is not None
)
_GLOBAL_HOOK_DICTS = tuple(
    getattr(_module_mod, name)
    for name in (
        '_global_forward_hooks',
        '_global_forward_pre_hooks',
        '_global_backward_hooks',
        '_global_backward_pre_hooks',
    )
    if hasattr(_module_mod, name)
)


def hooks_free(conv: nn.Module, bn: nn.Module) -> bool:
    """No hook, on the modules or global, would see the folded tensors."""
    if (
        conv._forward_hooks
        or conv._backward_hooks
        or bn._forward_pre_hooks
        or bn._forward_hooks
        or bn._backward_hooks
    ):
        return False
    return not any(_GLOBAL_HOOK_DICTS)


class _Stamp:
    """Remembers exactly which tensor values something was computed from.

    Holding an alias keeps the storage alive, so an equal ``data_ptr`` means
    the same storage, and the shared version counter tells in-place writes.
    """

    __slots__ = ('aliases', 'keys')

    def __init__(self, tensors: Sequence[Optional[Tensor]]):
        self.aliases = [None if t is None else t.detach() for t in tensors]
        self.keys = [_key(t) for t in tensors]

    def matches(self, tensors: Sequence[Optional[Tensor]]) -> bool:
        return all(key == _key(t) for key, t in zip(self.keys, tensors))


def _key(t: Optional[Tensor]):
    if t is None:
        return None
    return (t.data_ptr(), t._version, t.dtype, t.device, t.shape)


class FoldState:
    """Computes a pair's tune-mode forward, caching what it safely can.

    ``1 / sqrt(var + eps)`` is cached while the running variance is
    unchanged. When nothing needs gradients (validation, inference, frozen
    layers) the folded weight and bias are cached too while no input
    changed, so such forwards cost one convolution; for trainable layers the
    cache is dropped at the next forward with autograd so that it costs no
    memory in training.
    """

    def __init__(self):
        self.clear()
        self.batch: Optional[FoldBatch] = None
        self.index = -1

    def join(self, batch: 'FoldBatch', index: int) -> None:
        """Take folded tensors from ``batch`` (member ``index``) when it
        has them; see :mod:`.fold_batch`."""
        self.batch, self.index = batch, index

    def clear(self) -> None:
        self._inv_std = self._inv_std_stamp = self._inv_std_eps = None
        self._folded = self._folded_stamp = self._folded_inputs = None

    def _get_inv_std(self, bn: nn.Module) -> Tensor:
        # BN kernels update running_var in place without bumping its version
        # counter; num_batches_tracked.add_(1) in the same forward does.
        stats = (bn.running_var, bn.num_batches_tracked)
        if (
            self._inv_std_stamp is not None
            and self._inv_std_eps == bn.eps
            and self._inv_std_stamp.matches(stats)
        ):
            return self._inv_std
        inv_std = bn_inv_std(bn.running_var, bn.eps)
        if torch.is_inference_mode_enabled():
            # an inference tensor could not be saved for backward by a
            # later training forward: use it now, do not keep it
            return inv_std
        self._inv_std, self._inv_std_stamp = inv_std, _Stamp(stats)
        self._inv_std_eps = bn.eps
        return inv_std

    def fold(self, conv: nn.Module, bn: nn.Module) -> Tuple[Tensor, Tensor]:
        """The folded weight and bias of ``conv`` and ``bn``."""
        cp, bp, bb = conv._parameters, bn._parameters, bn._buffers
        weight, bias = cp['weight'], cp.get('bias')
        gamma, beta = bp.get('weight'), bp.get('bias')
        tensors = (
            weight,
            bias,
            bb['running_mean'],
            bb['running_var'],
            gamma,
            beta,
        )
        if _is_compiling():
            return fold_conv_bn(*tensors, bn.eps, conv.transposed, conv.groups)
        # Without autograd there is no graph to rebuild, so the folded
        # tensors can be reused until an input changes: in validation, and
        # for frozen layers (frozen_stages) in training.
        cacheable = not torch.is_inference_mode_enabled() and not (
            torch.is_grad_enabled() and needs_grad(weight, cp, bp)
        )
        stamp = None
        if not cacheable:
            self._folded = self._folded_stamp = self._folded_inputs = None
        else:
            stamp = _pair_stamp(bn, cp, bp, bb)
            if stamp == self._folded_stamp:
                return self._folded
        folded = fold_conv_bn(
            *tensors,
            bn.eps,
            conv.transposed,
            conv.groups,
            inv_std=self._get_inv_std(bn),
        )
        if cacheable:
            self._folded, self._folded_stamp = folded, stamp
            # held so that no other tensor can take their storage: an equal
            # data_ptr in the stamp then means the same tensor
            self._folded_inputs = tensors + (bb.get('num_batches_tracked'),)
        return folded

    def forward(
        self, conv: nn.Module, bn: nn.Module, x: Tensor, output_size=None
    ) -> Tensor:
        """``bn(conv(x))`` for an eval-mode ``bn``, as one convolution."""
        batch = self.batch
        folded = None
        if batch is not None:
            folded = batch.take(self.index, conv, bn)
        if folded is None:
            folded = self.fold(conv, bn)
        return conv_forward_with(conv, x, folded[0], folded[1], output_size)


class TunePair:
    """The runtime of one Conv->BN pair in tune mode.

    Its bound methods become the instance ``forward`` of the conv and of the
    BN. Deep copies (EMA) and pickles carry it along; caches are not kept.
    """

    _mmtune_forward_owner = True

    def __init__(
        self,
        conv: nn.Module,
        bn: nn.Module,
        frame_cls: type,
        conv_name: str,
        bn_name: str,
    ):
        self.conv = conv
        self.bn = bn
        self.frame_cls = frame_cls
        self.conv_name = conv_name
        self.bn_name = bn_name
        self.disabled = False
        self._reset()

    def _reset(self) -> None:
        self.pending: Optional[Tensor] = None
        self.fold_state = FoldState()
        self.codes = frame_codes(self.frame_cls)

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ('pending', 'fold_state', 'codes'):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def _called_from_frame(self) -> bool:
        if _is_compiling():
            return True
        frame = sys._getframe(2)
        while frame is not None and frame.f_code in _CALL_IMPL_CODES:
            frame = frame.f_back
        return frame is not None and frame.f_code in self.codes

    def _diverged(self, what: str) -> None:
        self.disabled = True
        self.pending = None
        warnings.warn(
            f'mmtune: {what}; the dataflow differs from what the analysis '
            f'saw, so {self.conv_name} -> {self.bn_name} stops folding and '
            'computes as in eval mode from now on. Please report this.',
            RuntimeWarning,
            stacklevel=3,
        )

    def conv_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        conv, bn = self.conv, self.bn
        if self.pending is not None:
            self._diverged(
                f'the output of {self.conv_name} never reached {self.bn_name}'
            )
        buffers = bn._buffers  # not nn.Module.__getattr__: every call
        if (
            not self.disabled
            and not bn.training
            and buffers.get('running_mean') is not None
            and buffers.get('running_var') is not None
            and hooks_free(conv, bn)
            and self._called_from_frame()
        ):
            output_size = args[0] if args else kwargs.get('output_size')
            out = self.fold_state.forward(conv, bn, x, output_size)
            self.pending = out
            return out
        return type(conv).forward(conv, x, *args, **kwargs)

    def bn_forward(self, x: Tensor) -> Tensor:
        pending = self.pending
        if pending is not None:
            self.pending = None
            if x is pending:
                return x
            self._diverged(
                f'{self.bn_name} received another tensor than '
                f'the output of {self.conv_name}'
            )
        if self.bn.training:
            self.fold_state.clear()  # running statistics may change
        return type(self.bn).forward(self.bn, x)


def _resolve_roots(
    model: nn.Module, modules: Union[None, str, Sequence[str]]
) -> List[str]:
    if modules is None:
        return ['']
    if isinstance(modules, str):
        modules = [modules]
    if not isinstance(modules, (list, tuple)) or not all(
        isinstance(m, str) for m in modules
    ):
        raise TypeError(
            'modules must be None, a module name or a list of '
            f'module names, got {modules!r}'
        )
    names = dict(model.named_modules())
    unknown = [m for m in modules if m not in names]
    if unknown:
        valid = [name for name, _ in model.named_children()]
        raise ValueError(
            f'unknown module name(s) {unknown} for '
            f'{type(model).__name__}; valid top-level names are {valid}'
        )
    # Drop names inside another requested name: their frames are covered.
    roots = []
    for name in sorted(set(modules), key=len):
        if not any(
            name == r or name.startswith(r + '.') or r == '' for r in roots
        ):
            roots.append(name)
    return roots


def _install(pair: Pair, batch: Optional[FoldBatch]) -> bool:
    """Put one pair in tune mode; False if it already was."""
    if pair.handler is not None:
        if not pair.handler.turn_on(pair.frame):
            return False
        state = pair.handler.fold_state(pair.frame)
    elif is_mmtune_forward(instance_forward(pair.conv)):
        return False
    else:
        runtime = TunePair(
            pair.conv, pair.bn, type(pair.frame), pair.conv_name, pair.bn_name
        )
        pair.conv.forward = runtime.conv_forward
        pair.bn.forward = runtime.bn_forward
        state = runtime.fold_state
    if batch is not None and state is not None and not pair.conv.transposed:
        state.join(batch, batch.add(pair.conv, pair.bn, pair.conv_name))
    return True


def _make_batch(batch: Union[str, bool]) -> Optional[FoldBatch]:
    check_batch_arg(batch)
    if batch is False:
        return None
    return FoldBatch(('cuda',) if batch == 'auto' else None)


def turn_on_fast_conv_bn_eval(
    model: nn.Module,
    modules: Union[None, str, Sequence[str]] = None,
    batch: Union[str, bool] = 'auto',
) -> ConvBNReport:
    """Run the Conv->BN pairs of ``model`` in tune mode.

    Outputs and gradients stay those of eval mode; autograd no longer keeps
    the conv outputs, which saves memory. Whether a BN is in eval mode is
    checked at every call, so ``model.train()`` / ``model.eval()`` and
    ``norm_eval`` keep working. Calling it again changes nothing that is
    already on.

    Args:
        model (nn.Module): The model (unwrapped, not DDP).
        modules (str | list[str], optional): Qualified names of submodules
            to cover; None covers the whole model. Defaults to None.
        batch (str | bool): Fold the trainable pairs together, once per
            forward (:mod:`mmtune.rewrite.fold_batch`): ``'auto'`` on CUDA
            devices, True on every device, False never. The results are the
            same; batching saves the per-pair launches that make a GPU step
            wait for the CPU. Turn it off under
            ``DistributedDataParallel(find_unused_parameters=True)``.
            Defaults to ``'auto'``.

    Returns:
        ConvBNReport: converted pairs and what was skipped, and why.
    """
    start = time.perf_counter()
    fold_batch = _make_batch(batch)
    roots = _resolve_roots(model, modules)
    analysis: Analysis = analyse(model, roots)
    report = ConvBNReport(mode='tune', skipped=list(analysis.skipped))
    for pair in analysis.pairs:
        if not _install(pair, fold_batch):
            report.already_on += 1
        report.converted.append((pair.conv_name, pair.bn_name))
    report.seconds = time.perf_counter() - start
    return report


def turn_off_fast_conv_bn_eval(model: nn.Module) -> int:
    """Undo :func:`turn_on_fast_conv_bn_eval` everywhere in ``model``.

    Returns:
        int: How many modules got their original forward back.
    """
    from .handlers import get_frame_handler

    count = 0
    for module in model.modules():
        handler = get_frame_handler(module)
        if handler is not None and handler.turn_off(module):
            count += 1
        if is_mmtune_forward(instance_forward(module)):
            del module.forward
            count += 1
    return count


__all__ = [
    'turn_on_fast_conv_bn_eval',
    'turn_off_fast_conv_bn_eval',
    'TunePair',
    'FoldState',
    'SkipRecord',
]
