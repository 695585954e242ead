# Copyright (c) mmtune contributors. All rights reserved.
"""What makes a Conv->BN pair foldable: the checks that the analysis makes
once and that tune mode makes again at every call (torch only).

Each ``*_problem`` function returns why a pair cannot fold, or None. The
analysis and the run time call the same functions, so a pair is never
accepted by one and refused by the other for a reason they disagree on.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from torch import Tensor, nn
from torch.nn.modules import module as _module_mod
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

PLAIN_CONV_FORWARDS = frozenset(
    cls.forward
    for cls in (
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
    )
)
PLAIN_CONV_FORWARD_IMPLS = frozenset(
    cls._conv_forward for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
)
PLAIN_BN_FORWARDS = frozenset((_BatchNorm.forward, nn.SyncBatchNorm.forward))

#: Module hook dicts every module call consults: a hook in any of them
#: sees every module's inputs, outputs or gradients.
_GLOBAL_HOOK_DICTS = tuple(
    getattr(_module_mod, name)
    for name in (
        '_global_forward_pre_hooks',
        '_global_forward_hooks',
        '_global_backward_pre_hooks',
        '_global_backward_hooks',
    )
    if hasattr(_module_mod, name)
)

# Input dimensions each BN type accepts (SyncBatchNorm: any of them).
_BN_INPUT_DIMS = {
    nn.BatchNorm1d: (2, 3),
    nn.BatchNorm2d: (4,),
    nn.BatchNorm3d: (5,),
}


@dataclass(frozen=True)
class FoldableConv:
    """How a conv class with its own ``forward`` computes, for folding.

    The class's forward must compute exactly
    ``conv._conv_forward(input(conv, x), weight(conv), conv.bias)`` (for a
    transposed conv, the transposed convolution of its ``forward`` with
    that weight): a transform of the input (e.g. adaptive padding) and of
    the weight (e.g. weight standardisation), both differentiable. Tune mode
    then folds the BN into ``weight(conv)`` at every call.

    Attributes:
        weight (callable, optional): ``conv -> Tensor``, the weight the
            forward convolves with; None: ``conv.weight``.
        input (callable, optional): ``(conv, x) -> Tensor``, what the
            forward does to its input first; None: nothing.
    """

    weight: Optional[Callable[[nn.Module], Tensor]] = None
    input: Optional[Callable[[nn.Module, Tensor], Tensor]] = None

    @property
    def plain(self) -> bool:
        """Whether it convolves its own weight with its input unchanged."""
        return self.weight is None and self.input is None


_FOLDABLE_CONVS: Dict[type, FoldableConv] = {}


def register_foldable_conv(
    cls: type,
    weight: Optional[Callable[[nn.Module], Tensor]] = None,
    input: Optional[Callable[[nn.Module, Tensor], Tensor]] = None,
) -> type:
    """Declare a conv subclass with its own ``forward`` foldable: tune mode
    folds it as :class:`FoldableConv` describes (``weight``, ``input``).
    Exactly that class, not its subclasses. Returns ``cls``.

    Raises:
        TypeError: ``cls`` is not a subclass of a torch convolution.
    """
    if not (isinstance(cls, type) and issubclass(cls, _ConvNd)):
        raise TypeError(
            'register_foldable_conv takes a subclass of nn.Conv1d/2d/3d or '
            f'nn.ConvTranspose1d/2d/3d, got {cls!r}'
        )
    _FOLDABLE_CONVS[cls] = FoldableConv(weight, input)
    return cls


def foldable_conv(cls: type) -> Optional[FoldableConv]:
    """How a registered conv class folds, or None (not registered)."""
    return _FOLDABLE_CONVS.get(cls)


def instance_forward(module: nn.Module) -> Optional[Callable]:
    """The ``forward`` set on the instance (not its class), if any."""
    return module.__dict__.get('forward')


def is_mmtune_forward(fn: Optional[Callable]) -> bool:
    """Whether ``fn`` is a forward that mmtune installed."""
    owner = getattr(fn, '__self__', None)
    return bool(getattr(owner, '_mmtune_forward_owner', False))


def conv_type_problem(conv: nn.Module) -> Optional[str]:
    """Why the class of ``conv`` computes something the fold cannot
    reproduce, or None."""
    if not isinstance(conv, _ConvNd):
        return f'{type(conv).__name__} is not a convolution'
    cls = type(conv)
    if cls in _FOLDABLE_CONVS:
        return None
    if cls.forward not in PLAIN_CONV_FORWARDS or (
        not conv.transposed
        and cls._conv_forward not in PLAIN_CONV_FORWARD_IMPLS
    ):
        return (
            f'the conv type {cls.__name__} has its own forward (declare '
            'it with mmtune.rewrite.register_foldable_conv if it only '
            'transforms its input or weight)'
        )
    return None


def bn_type_problem(bn: nn.Module) -> Optional[str]:
    """Why the class of ``bn`` computes something else than an eval-mode
    batch norm, or None."""
    cls = type(bn)
    if not isinstance(bn, _BatchNorm) or cls.forward not in PLAIN_BN_FORWARDS:
        return f'the BN type {cls.__name__} has its own forward'
    return None


def conv_problem(conv: nn.Module) -> Optional[str]:
    """Why ``conv`` cannot be folded into, or None when it can."""
    reason = conv_type_problem(conv)
    if reason is None:
        fn = instance_forward(conv)
        if fn is not None and not is_mmtune_forward(fn):
            reason = 'the conv has a forward wrapper installed on the instance'
    return reason


def bn_problem(
    bn: nn.Module, conv: Optional[nn.Module] = None
) -> Optional[str]:
    """Why ``bn`` cannot be folded (into ``conv``, when given), or None."""
    reason = bn_type_problem(bn)
    if reason is not None:
        return reason
    if bn.running_mean is None or bn.running_var is None:
        return 'the BN has no running statistics (track_running_stats=False)'
    fn = instance_forward(bn)
    if fn is not None and not is_mmtune_forward(fn):
        return 'the BN has a forward wrapper installed on the instance'
    if conv is not None and isinstance(conv, _ConvNd):
        if conv.out_channels != bn.num_features:
            return (
                f'the conv has {conv.out_channels} output channels but '
                f'the BN {bn.num_features} features'
            )
        dims = _BN_INPUT_DIMS.get(type(bn))
        conv_dims = len(conv.kernel_size) + 2
        if dims is not None and conv_dims not in dims:
            # eval mode raises for such a call; folding would not
            return (
                f'{type(bn).__name__} does not accept the {conv_dims}D '
                f'output of {type(conv).__name__}'
            )
    return None


def hooks_problem(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    """Why a hook would see the difference between folding and eval mode,
    or None.

    Hooks on the conv's output or gradients would see the folded output,
    hooks on the BN its folded input, global module hooks both. A forward
    pre-hook on the conv sees only the input and runs before the fold reads
    the conv's weight, so it does not prevent folding.

    This is the one predicate for hooks: the analysis checks it once, tune
    mode at every call.
    """
    if not (
        conv._forward_hooks
        or conv._backward_hooks
        or conv._backward_pre_hooks
        or bn._forward_pre_hooks
        or bn._forward_hooks
        or bn._backward_hooks
        or bn._backward_pre_hooks
        or any(_GLOBAL_HOOK_DICTS)
    ):
        return None
    if conv._forward_hooks:
        return 'the conv has forward hooks'
    if conv._backward_hooks or conv._backward_pre_hooks:
        return 'the conv has backward hooks'
    if bn._forward_pre_hooks or bn._forward_hooks:
        return 'the BN has forward hooks'
    if bn._backward_hooks or bn._backward_pre_hooks:
        return 'the BN has backward hooks'
    return 'global module hooks are registered'


def pair_problem(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    """Everything that the modules themselves can make unfoldable."""
    return (
        conv_problem(conv) or bn_problem(bn, conv) or hooks_problem(conv, bn)
    )
