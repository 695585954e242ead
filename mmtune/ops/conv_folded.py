# Copyright (c) mmtune contributors. All rights reserved.
"""A convolution with a folded weight that autograd does not keep.

Called with a folded weight ``w * s``, a convolution keeps that tensor for
its backward: one copy of every folded weight, alive from the forward to the
backward. Eval mode keeps none (its convolutions keep ``w`` itself, a
parameter), and neither does a model whose BNs were folded away once. Here
the convolution runs under saved-tensor hooks that keep, instead of the
folded weight, what it was computed from: ``w`` (a parameter, or the weight
the conv's forward computes) and ``s`` (one factor per output channel). The
backward multiplies them again, the same operation on the same values, so
the same bits, and lets the product go after the convolution's backward.
Everything else the convolution keeps (its input) is kept as it is.

The hooks are used only where they cannot get in anybody's way: when grad
mode records the convolution, torch (2.8 or later) can tell that no other
saved-tensor hooks are active (those
of non-reentrant checkpointing or offloading must see every tensor; an
:func:`observe_saved_tensors` observer is the exception: it sees every
tensor that is kept), saved-tensor hooks are enabled, and no
``torch.compile`` or functorch transform is tracing. Elsewhere the folded
weight is kept, as before.
"""

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .conv_bn import (
    ConvBNFold,
    _scale_out_channels,
    conv_forward_with,
    scale_weight,
)

_autograd = torch._C._autograd
_push = _autograd._push_saved_tensors_default_hooks
_pop = _autograd._pop_saved_tensors_default_hooks
# torch < 2.8 cannot tell which saved-tensor hooks are active: there the
# folded weight is kept, as before (``(None,)`` is never an observer)
_top = getattr(
    _autograd, '_top_saved_tensors_default_hooks', lambda _: (None,)
)
_hooks_enabled = getattr(
    _autograd, '_saved_tensors_hooks_is_enabled', lambda: True
)
_functorch_stack = getattr(
    getattr(torch._C, '_functorch', None),
    'peek_interpreter_stack',
    lambda: None,
)
#: Whether ``torch.compile`` is tracing (False on torch without it).
is_compiling = getattr(
    getattr(torch, 'compiler', None), 'is_compiling', lambda: False
)


class _Observer:
    """The pack hook of :func:`observe_saved_tensors`."""

    __slots__ = ('callback',)

    def __init__(self, callback: Callable[[Tensor], None]):
        self.callback = callback

    def __call__(self, tensor: Tensor) -> Tensor:
        self.callback(tensor)
        return tensor


def _identity(tensor):
    return tensor


@contextmanager
def observe_saved_tensors(
    callback: Callable[[Tensor], None],
) -> Iterator[None]:
    """Call ``callback`` with every tensor autograd keeps for the backward
    inside the block, keeping each as it is.

    Unlike a pair of saved-tensor hooks of one's own, this lets
    :func:`conv_forward_folded` keep its recipe instead of the folded
    weight, so the callback sees what a run really keeps (benchmarks
    measure memory with it).
    """
    with torch.autograd.graph.saved_tensors_hooks(
        _Observer(callback), _identity
    ):
        yield


class _Refold:
    """What a convolution keeps instead of its folded weight; its pack
    hook, and the recipe it packs the folded weight into."""

    __slots__ = (
        'folded',
        'source',
        'scale',
        'transposed',
        'groups',
        'dtype',
        'version',
        'observer',
    )

    def __init__(self, folded, source, scale, transposed, groups, observer):
        self.folded = folded
        self.source = source
        self.scale = scale.detach() if scale.requires_grad else scale
        self.transposed = transposed
        self.groups = groups
        self.dtype = folded.dtype
        self.version = source._version
        self.observer = observer

    def __call__(self, tensor: Tensor):
        if tensor is self.folded:
            self.folded = None  # the recipe must not keep it alive
            if self.observer is not None:
                self.observer(self.scale)
            return self
        if self.observer is not None:
            self.observer(tensor)
        return tensor

    def weight(self) -> Tensor:
        """The folded weight again: the forward's operations on the
        forward's values."""
        source = self.source
        if source._version != self.version:
            raise RuntimeError(
                'one of the variables needed for gradient computation has '
                'been modified by an inplace operation: the weight a '
                f'tune-mode convolution folded, of shape {tuple(source.shape)}'
                f', is at version {source._version}; expected version '
                f'{self.version} instead.'
            )
        if torch.is_grad_enabled():  # create_graph=True
            with torch.no_grad():
                return self._product()
        return self._product()

    def _product(self) -> Tensor:
        source, scale = self.source, self.scale
        if scale.dim() == source.dim() and not self.transposed:
            # factors shaped (C, 1, ..., 1): the batched fold's multiply
            return scale_weight(source, scale, self.dtype)
        weight = _scale_out_channels(
            source, scale, self.transposed, self.groups
        )
        return weight if weight.dtype == self.dtype else weight.to(self.dtype)


def _unpack(packed):
    return packed.weight() if type(packed) is _Refold else packed


def _refold_hooks_allowed(top) -> bool:
    return (
        (top is None or type(top[0]) is _Observer)
        and _hooks_enabled()
        and _functorch_stack() is None
    )


_autocast_available = getattr(torch.amp, 'is_autocast_available', None)
# device type -> whether autocast exists there (torch raises on asking
# about one without it, e.g. 'meta')
_AUTOCAST_DEVICES: Dict[str, bool] = {}


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts to on ``device_type`` now; None when it is
    off there, or the device type has no autocast (``'meta'``: torch's
    query would raise)."""
    available = _AUTOCAST_DEVICES.get(device_type)
    if available is None:
        available = _autocast_available is None or bool(
            _autocast_available(device_type)
        )
        _AUTOCAST_DEVICES[device_type] = available
    if not available or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_dtype(weight: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would cast ``weight`` to for a convolution, or
    None when it would not cast it."""
    dtype = autocast_dtype(weight.device.type)
    if dtype is None:
        return None
    if not weight.is_floating_point() or weight.dtype in (
        dtype,
        torch.float64,
    ):
        return None
    return dtype


def conv_forward_folded(
    conv: nn.modules.conv._ConvNd,
    x: Tensor,
    fold: ConvBNFold,
    output_size: Optional[Sequence[int]] = None,
) -> Tensor:
    """``conv``'s computation on ``x`` with the folded weight and bias of
    ``fold``, keeping for the backward ``fold.source`` and ``fold.scale``
    instead of the folded weight (see the module docstring).

    Values and gradients are those of
    :func:`~mmtune.ops.conv_forward_with` with ``fold.weight`` and
    ``fold.bias``, bit for bit. Under autocast the folded weight is cast
    here, as autocast would cast it, so that the convolution keeps the
    tensor the recipe replaces.
    """
    weight, bias = fold.weight, fold.bias
    if (
        is_compiling()  # first: torch.compile traces no further
        or not torch.is_grad_enabled()
        or not (weight.requires_grad or x.requires_grad)
    ):
        return conv_forward_with(conv, x, weight, bias, output_size)
    top = _top(False)
    if not _refold_hooks_allowed(top):
        return conv_forward_with(conv, x, weight, bias, output_size)
    dtype = _autocast_dtype(weight)
    if dtype is not None:
        weight = weight.to(dtype)
    pack = _Refold(
        weight,
        fold.source,
        fold.scale,
        conv.transposed,
        conv.groups,
        None if top is None else top[0].callback,
    )
    del weight
    _push(pack, _unpack)
    try:
        return conv_forward_with(conv, x, pack.folded, bias, output_size)
    finally:
        _pop()
        pack.folded = None
