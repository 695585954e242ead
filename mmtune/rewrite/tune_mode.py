# Copyright (c) mmtune contributors. All rights reserved.
"""Tune mode: Conv->eval-BN pairs fold the BN into the conv at every call.

For each pair found by :mod:`.analysis` the conv and the BN get a
``forward`` on the instance (class, parameters, buffers and ``state_dict``
are untouched). At every call the conv decides (:meth:`TunePair.refusal`):

- if its BN is in eval mode with running statistics, both modules are
  still the ones the frame calls and of foldable types, no hook would see
  the difference (:func:`~.guards.hooks_problem`), and the call comes
  through the very Python code in which the analysis traced it (the call
  chain, helper methods and nested functions included) or, for a handled
  frame such as mmcv's ``ConvModule``, its handler armed the call, it
  returns ``conv(x, w * s, beta + s * (b - mean))`` and hands that very
  tensor to the BN, which passes it through;
- otherwise both compute exactly what they would without mmtune, by their
  own class's ``forward`` (a BN in train mode normalises with batch
  statistics and updates its running statistics as usual).

Every call is counted, as folded or as computed by the modules with the
reason (:meth:`TunePair.counts`, :meth:`ConvBNReport.fold_counts`).

State: nothing folded outlives one call of the model that was turned on.
A pair folds from the tensors its modules hold at that moment; with
batching (:mod:`.fold_batch`) all pairs fold together in the model's
call and are let go when it returns. Between a conv's call and its BN's
call the conv's output is held (``pending``) to check that the BN receives
it.
"""

import copy
import gc
import operator
import sys
import time
import types
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from ..ops import conv_forward_folded, fold_modules, is_compiling
from .analysis import (
    CHECKPOINT,
    CHECKPOINT_FILE,
    Analysis,
    Chain,
    Pair,
    find_pairs,
    resolve_roots,
    same_value,
)
from .fold_batch import FoldBatch, check_batch_arg, runs_within
from .guards import (
    bn_type_problem,
    conv_type_problem,
    foldable_conv,
    hooks_problem,
    instance_forward,
    is_mmtune_forward,
)
from .report import ConvBNReport, SkipRecord


def _codes_within(*functions) -> frozenset:
    """The code objects of ``functions`` and of the functions nested in
    them."""
    codes = set()
    stack = [fn.__code__ for fn in functions if fn is not None]
    while stack:
        code = stack.pop()
        if code not in codes:
            codes.add(code)
            stack.extend(
                c for c in code.co_consts if isinstance(c, types.CodeType)
            )
    return frozenset(codes)


#: The code a module call runs between its caller and its forward.
_CALL_IMPL_CODES = _codes_within(
    nn.Module._call_impl, getattr(nn.Module, '_wrapped_call_impl', None)
)

#: Why a call computed as the modules do, for the counters.
TRAIN_MODE = 'the BN is in train mode'
NO_STATS = 'the BN has no running statistics'
DIVERGED = 'an earlier call diverged from the analysis'
WRAPPED = 'a forward wrapper was installed on the conv or the BN'
SWAPPED = 'the frame no longer calls these modules (replaced after turn-on)'
CALLER = 'called from outside the forward that the analysis traced'
NOT_ARMED = (
    "its frame's forward does not apply the BN right after the conv in this "
    'call (e.g. norm=False)'
)
ARGUMENTS = 'called with arguments the conv does not take'
UNBATCHED = (
    'the input has not the dimensions of a batch for the conv (an '
    'unbatched input: the BN would take its channels for a batch)'
)
_MISSING = object()


def _holds(container, tensor) -> bool:
    """Whether ``container`` is ``tensor`` or holds it (two levels of
    tuples, lists and dicts)."""
    todo = [(container, 0)]
    while todo:
        value, depth = todo.pop()
        if value is tensor:
            return True
        if depth < 2 and isinstance(value, (tuple, list, dict)):
            items = value.values() if isinstance(value, dict) else value
            todo.extend((item, depth + 1) for item in items)
    return False


def escaped(pair: 'TunePair', output=None) -> bool:
    """Whether the folded output that ``pair`` holds as pending, which its
    BN never received, is still in use: in ``output`` (what the model's
    call returns), held by an object, or by a function still running. A
    conv output that only finished frames hold (those of a forward that
    raised, which the model caught) was never used: dropping it is no
    divergence. Costly (it asks the garbage collector for the tensor's
    referrers); called only where a pending output was left behind."""
    tensor = pair.pending
    if output is not None and _holds(output, tensor):
        return True
    running = set()
    frame = sys._getframe(1)  # (materialises the running frames)
    while frame is not None:
        running.add(id(frame))
        frame = frame.f_back
    own = (pair.__dict__, sys._getframe(0))
    for referrer in gc.get_referrers(tensor):
        if any(referrer is o for o in own):
            continue
        if isinstance(referrer, types.FrameType) and id(referrer) not in (
            running
        ):
            continue  # a finished frame, kept by a traceback
        return True
    return False


def _changed(what: str, now, value) -> Optional[str]:
    """Why ``now`` (``_MISSING``: gone) is not the traced ``value`` of
    ``what`` (equal and of the same type, lists and dicts item by item),
    or None."""
    if now is value or (now is not _MISSING and same_value(now, value)):
        return None
    shown = 'gone' if now is _MISSING else repr(now)
    return f'{what} is {shown}; its forward was traced with {value!r}'


def state_problem(frame: nn.Module, state) -> Optional[str]:
    """Why the frame's plain attributes that its traced forward read no
    longer have the values it was traced with, or None (``state``:
    :attr:`~.analysis.Pair.frame_state`)."""
    attrs = frame.__dict__
    for name, value in state:
        now = attrs.get(name, _MISSING)
        if now is _MISSING:  # a class attribute or a property
            now = getattr(frame, name, _MISSING)
        reason = _changed(f'the frame attribute {name!r}', now, value)
        if reason is not None:
            return reason
    return None


def globals_problem(state) -> Optional[str]:
    """Why the plain module globals that the frame's traced forward read no
    longer have the values it was traced with, or None (``state``:
    :attr:`~.analysis.Pair.global_state`)."""
    for module_name, name, value in state:
        module = sys.modules.get(module_name)
        now = _MISSING if module is None else vars(module).get(name, _MISSING)
        reason = _changed(f'the global {module_name}.{name}', now, value)
        if reason is not None:
            return reason
    return None


def _installed(module: nn.Module, owner, function) -> bool:
    """Whether ``module``'s instance forward is ``owner``'s ``function``
    (bound methods compare by owner and function: a pickled model has new
    bound-method objects)."""
    fn = module.__dict__.get('forward')
    return (
        getattr(fn, '__self__', None) is owner
        and getattr(fn, '__func__', None) is function
    )


def _submodule(frame: nn.Module, path: Tuple[str, ...]):
    module = frame
    for name in path:
        module = module._modules.get(name)
        if module is None:
            return None
    return module


def _code_key(code):
    """What identifies a code object across pickling: file, first line and
    name (``CHECKPOINT`` stays itself)."""
    if not isinstance(code, types.CodeType):
        return code
    return (code.co_filename, code.co_firstlineno, code.co_name)


def chain_matches(frame, chains: Sequence[Chain]) -> bool:
    """Whether the Python frame ``frame`` (the caller of the conv's
    ``forward``) runs one of the traced call ``chains``.

    A chain lists the code objects from the function that called the conv
    up to the frame module's ``forward``, which a module call
    (``nn.Module._call_impl``) must have called; or up to a
    ``torch.utils.checkpoint`` call, whose code must be the caller.
    """
    while frame is not None and frame.f_code in _CALL_IMPL_CODES:
        frame = frame.f_back
    for chain in chains:
        current = frame
        for code in chain:
            if code is CHECKPOINT:
                if (
                    current is not None
                    and current.f_code.co_filename == CHECKPOINT_FILE
                ):
                    return True
                break
            if current is None:
                break
            f_code = current.f_code
            if f_code is not code and (
                code.__class__ is not tuple or _code_key(f_code) != code
            ):
                break  # (a chain of an unpickled pair holds code keys)
            current = current.f_back
        else:
            if current is not None and current.f_code in _CALL_IMPL_CODES:
                return True
    return False


def _conv_args(args: tuple, kwargs: dict, transposed: bool):
    """``(input, output_size)`` of a conv call, or None if the conv's own
    forward would not take these arguments."""
    if len(args) == 1 and not kwargs:
        x, output_size = args[0], None
    else:
        names = ('input', 'output_size') if transposed else ('input',)
        if len(args) > len(names):
            return None
        bound = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in names or key in bound:
                return None
            bound[key] = value
        if 'input' not in bound:
            return None
        x, output_size = bound['input'], bound.get('output_size')
    return (x, output_size) if isinstance(x, Tensor) else None


def fold_forward(
    conv: nn.Module, bn: nn.Module, x: Tensor, output_size=None
) -> Tensor:
    """``bn(conv(x))`` for an eval-mode ``bn``, as one convolution, from
    the tensors the modules' own forwards would read now (through a
    registered conv class's input and weight transforms)."""
    spec = foldable_conv(type(conv))
    conv_weight = None
    if spec is not None:
        if spec.input is not None:
            x = spec.input(conv, x)
        if spec.weight is not None:
            conv_weight = spec.weight(conv)
    return conv_forward_folded(
        conv, x, fold_modules(conv, bn, conv_weight), output_size
    )


class PlainReplica:
    """The instance ``_replicate_for_data_parallel`` of a module that tune
    mode gave a forward: an ``nn.DataParallel`` replica copies the
    instance's ``__dict__``, so its forward would be the original pair's,
    folding the original modules' tensors (on another device: an error).
    The replica gets its class's own forward instead: it computes as in
    eval mode, from its own tensors, and is not counted."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self) -> nn.Module:
        module = self.module
        replica = type(module)._replicate_for_data_parallel(module)
        for key in ('forward', '_replicate_for_data_parallel'):
            replica.__dict__.pop(key, None)
        return replica


def _mark_plain_replicas(*modules: nn.Module) -> None:
    for module in modules:
        module._replicate_for_data_parallel = PlainReplica(module)


class TunePair:
    """The runtime of one Conv->BN pair in tune mode.

    Its bound methods become the instance ``forward`` of the conv and of the
    BN. Deep copies (EMA) and pickles carry it along with its frame; the
    counters and the pending output are not kept.

    Args:
        pair (Pair): The pair, as the analysis found it.
        batch (FoldBatch, optional): The batch the pair folds in.
    """

    _mmtune_forward_owner = True
    # (defaults for pairs pickled before these existed)
    frame_state: Tuple = ()
    global_state: Tuple = ()
    _state_get = None
    #: the dimensions of a batched input of the conv (set at its first
    #: call)
    input_dim: Optional[int] = None

    def __init__(self, pair: Pair, batch: Optional[FoldBatch] = None):
        conv, bn, frame = pair.conv, pair.bn, pair.frame
        self.conv, self.bn, self.frame = conv, bn, frame
        self.conv_name, self.bn_name = pair.conv_name, pair.bn_name
        skip = len(pair.frame_name) + 1 if pair.frame_name else 0
        self.conv_path = tuple(pair.conv_name[skip:].split('.'))
        self.bn_path = tuple(pair.bn_name[skip:].split('.'))
        #: None: a frame handler arms each call (``armed``)
        self.chains = tuple(pair.chains) if pair.handler is None else None
        #: the frame's plain attributes its traced forward read, and their
        #: values then
        self.frame_state = tuple(pair.frame_state)
        #: the plain module globals it read, and their values then
        self.global_state = tuple(pair.global_state)
        names = [name for name, _ in self.frame_state]
        values = tuple(value for _, value in self.frame_state)
        if (
            names
            and all(frame.__dict__.get(n) is v for n, v in self.frame_state)
            and not any(isinstance(v, (list, dict)) for v in values)
        ):
            # the same objects still there: two C calls compare them all
            # at every call (a value replaced by an equal one takes the
            # slow, exact comparison)
            self._state_get = operator.itemgetter(*names)
            self._state_values = values if len(values) > 1 else values[0]
        self.conv_type, self.bn_type = type(conv), type(bn)
        self.batch = None
        self.index = -1
        spec = foldable_conv(type(conv))
        if (
            batch is not None
            and not conv.transposed
            and (spec is None or spec.plain)
        ):
            self.batch = batch
            self.index = batch.add(conv, bn, pair.conv_name)
        self.disabled = False
        #: the object and function installed as the conv's forward: this
        #: pair's own, or a :class:`SharedConv` that dispatches to it
        self.conv_owner: tuple = (self, TunePair.conv_forward)
        self._reset()

    def _reset(self) -> None:
        self.pending: Optional[Tensor] = None
        self.armed = False
        self.folded = 0
        self.computed: Dict[str, int] = {}
        # the bound methods last seen installed (compared by identity at
        # every call; a copy or an unpickled model has new ones)
        self._installed: Tuple = (None, None)

    def install(self) -> None:
        """Make the methods the modules' instance forwards."""
        conv_fn, bn_fn = self.conv_forward, self.bn_forward
        self.conv.forward = conv_fn
        self.bn.forward = bn_fn
        _mark_plain_replicas(self.conv, self.bn)
        self.conv_owner = (self, TunePair.conv_forward)
        self._installed = (conv_fn, bn_fn)

    _TRANSIENT = ('pending', 'armed', 'folded', 'computed', '_installed')

    def _still_installed(self) -> bool:
        """Whether the conv's and the BN's instance forwards are still this
        pair's methods."""
        conv_fn = self.conv.__dict__.get('forward')
        bn_fn = self.bn.__dict__.get('forward')
        known = self._installed
        if conv_fn is known[0] and bn_fn is known[1]:
            return True
        owner, function = self.conv_owner
        if _installed(self.conv, owner, function) and _installed(
            self.bn, self, TunePair.bn_forward
        ):
            self._installed = (conv_fn, bn_fn)
            return True
        return False

    def __deepcopy__(self, memo):
        # not through __getstate__ (which turns the chains' code objects
        # into keys for pickle): copy keeps code objects as they are
        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in self._TRANSIENT:
                new.__dict__[key] = copy.deepcopy(value, memo)
        new._reset()
        new._rejoin()
        return new

    def __getstate__(self):
        # pickle: code objects cannot be pickled; chains keep their keys
        state = self.__dict__.copy()
        for key in self._TRANSIENT:
            state.pop(key, None)
        if self.chains is not None:
            state['chains'] = tuple(
                tuple(_code_key(c) for c in chain) for chain in self.chains
            )
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()
        self._rejoin()

    def _rejoin(self) -> None:
        """A copied or unpickled pair joins the copy of its batch, which
        holds no members of its own (:class:`FoldBatch` pickles none). The
        modules may not be whole yet: ``add`` only keeps them."""
        if self.batch is not None:
            self.index = self.batch.add(self.conv, self.bn, self.conv_name)

    def counts(self) -> Tuple[int, Dict[str, int]]:
        """Calls that folded, and calls computed by the modules by
        reason, since turn-on (or :meth:`reset_counts`)."""
        return self.folded, dict(self.computed)

    def reset_counts(self) -> None:
        self.folded = 0
        self.computed = {}

    def _diverged(self, what: str) -> None:
        self.disabled = True
        self.pending = None
        warnings.warn(
            f'mmtune: {what}; the dataflow differs from what the analysis '
            f'saw, so {self.conv_name} -> {self.bn_name} stops folding and '
            'computes as in eval mode from now on. Please report this.',
            RuntimeWarning,
            stacklevel=4,
        )

    def refusal(self) -> Optional[str]:
        """Why this call of the conv's forward must compute as the modules
        do, or None when it folds (called by :meth:`conv_forward` only: it
        reads its caller's Python frames)."""
        conv, bn = self.conv, self.bn
        if self.disabled:
            return DIVERGED
        if bn.training:
            return TRAIN_MODE
        buffers = bn._buffers  # not nn.Module.__getattr__: every call
        if (
            buffers.get('running_mean') is None
            or buffers.get('running_var') is None
        ):
            return NO_STATS
        if type(conv) is not self.conv_type or type(bn) is not self.bn_type:
            reason = conv_type_problem(conv) or bn_type_problem(bn)
            if reason is not None:
                return reason
        if not self._still_installed():
            return WRAPPED
        frame = self.frame
        conv_path, bn_path = self.conv_path, self.bn_path
        if len(conv_path) == 1 and len(bn_path) == 1:
            children = frame._modules
            swapped = (
                children.get(conv_path[0]) is not conv
                or children.get(bn_path[0]) is not bn
            )
        else:
            swapped = (
                _submodule(frame, conv_path) is not conv
                or _submodule(frame, bn_path) is not bn
            )
        if swapped:
            return SWAPPED
        if self.frame_state:
            get = self._state_get
            try:
                # (torch.compile traces the plain loop below)
                if get is None or is_compiling():
                    same = False
                elif len(self.frame_state) == 1:
                    same = get(frame.__dict__) is self._state_values
                else:
                    same = all(
                        map(
                            operator.is_,
                            get(frame.__dict__),
                            self._state_values,
                        )
                    )
            except KeyError:
                same = False
            if not same:
                reason = state_problem(frame, self.frame_state)
                if reason is not None:
                    return reason
        if self.global_state:
            reason = globals_problem(self.global_state)
            if reason is not None:
                return reason
        reason = hooks_problem(conv, bn)
        if reason is not None:
            return reason
        if self.chains is None:
            return None if self.armed else NOT_ARMED
        if is_compiling() or chain_matches(sys._getframe(2), self.chains):
            return None
        return CALLER

    def conv_forward(self, *args, **kwargs) -> Tensor:
        conv = self.conv
        if self.pending is not None:
            if escaped(self):
                self._diverged(
                    f'the output of {self.conv_name} never reached '
                    f'{self.bn_name}'
                )
            self.pending = None  # (a forward that raised left it: unused)
        reason = self.refusal()
        if reason is None:
            if len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
                parsed = args[0], None
            else:
                parsed = _conv_args(args, kwargs, conv.transposed)
            dim = self.input_dim
            if dim is None:
                dim = self.input_dim = len(conv.kernel_size) + 2
            if parsed is None:
                reason = ARGUMENTS
            elif parsed[0].dim() != dim:
                reason = UNBATCHED
        if reason is not None:
            self.computed[reason] = self.computed.get(reason, 0) + 1
            return type(conv).forward(conv, *args, **kwargs)
        x, output_size = parsed
        out = None
        if (
            self.batch is not None
            and type(conv) is self.conv_type
            and type(self.bn) is self.bn_type
        ):
            folded = self.batch.take(self.index)
            if folded is not None:
                out = conv_forward_folded(conv, x, folded, output_size)
        if out is None:
            out = fold_forward(conv, self.bn, x, output_size)
        self.folded += 1
        self.pending = out
        return out

    def bn_forward(self, *args, **kwargs) -> Tensor:
        pending = self.pending
        if pending is not None:
            self.pending = None
            if len(args) + len(kwargs) == 1 and (
                (args[0] if args else kwargs.get('input')) is pending
            ):
                return pending
            self._diverged(
                f'{self.bn_name} received another tensor than '
                f'the output of {self.conv_name}'
            )
        return type(self.bn).forward(self.bn, *args, **kwargs)


class SharedConv:
    """The forward of a conv that several handled frames share, each with
    its own BN (e.g. a detection head whose ``ConvModule``s of every level
    share one conv and keep one BN per level): a call runs the pair whose
    frame armed it (:attr:`TunePair.armed`), so each frame folds its own
    BN. A call that no frame armed computes as the conv does; it is counted
    on the first pair, as not armed.

    Args:
        conv (nn.Module): The shared conv.
        pairs (list[TunePair]): Its pairs, each armed by a frame handler.
    """

    _mmtune_forward_owner = True

    def __init__(self, conv: nn.Module, pairs: List['TunePair']):
        self.conv = conv
        self.pairs = list(pairs)

    def install(self) -> None:
        """Make :meth:`forward` the conv's instance forward, and each
        pair's BN forward its own."""
        self.conv.forward = self.forward
        _mark_plain_replicas(self.conv)
        for pair in self.pairs:
            pair.bn.forward = pair.bn_forward
            _mark_plain_replicas(pair.bn)
            pair.conv_owner = (self, SharedConv.forward)
            pair._installed = (None, None)

    def forward(self, *args, **kwargs) -> Tensor:
        for pair in self.pairs:
            if pair.armed:
                return pair.conv_forward(*args, **kwargs)
        return self.pairs[0].conv_forward(*args, **kwargs)


class ForwardScope:
    """One call of the model that was turned on: its forward pre-hook and
    forward hook. Whatever tune mode folds inside the call is let go when
    it returns. A call that returns normally while a conv's output never
    reached its BN diverged from the analysis: the pair is warned about and
    computes as in eval mode from then on. A pending output left by an
    interrupted call is dropped when the next one begins; so is the whole
    scope of a call that a ``BaseException`` (``KeyboardInterrupt``)
    interrupted, which runs no forward hook: the next call finds its
    outer call no longer running and begins anew."""

    def __init__(self, pairs: List[TunePair], batch: Optional[FoldBatch]):
        self.pairs = pairs
        self.batch = batch
        self.depth = 0
        self.outer = None  # the Python frame of the outermost call

    def __getstate__(self):
        return {'pairs': self.pairs, 'batch': self.batch}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.depth = 0
        self.outer = None

    def _outer_running(self) -> bool:
        return runs_within(self.outer, sys._getframe(2))

    def enter(self, module, args) -> None:
        if is_compiling():
            return
        if self.depth and not self._outer_running():
            self.depth = 0  # interrupted without its forward hook
        self.depth += 1
        if self.depth == 1:
            self.outer = sys._getframe(1)
            for pair in self.pairs:
                pair.pending = None
            if self.batch is not None:
                self.batch.open(self.outer)

    def exit(self, module, args, output) -> None:
        if is_compiling() or self.depth == 0:
            return
        self.depth -= 1
        if self.depth:
            return
        self.outer = None
        if self.batch is not None:
            self.batch.close()
        if sys.exc_info()[0] is None:  # returned, not raised
            for pair in self.pairs:
                if pair.pending is not None and escaped(pair, output):
                    pair._diverged(
                        f'the output of {pair.conv_name} never reached '
                        f'{pair.bn_name} in a call of the model'
                    )


def conv_runtimes(conv: nn.Module) -> List[TunePair]:
    """The :class:`TunePair` objects whose conv is ``conv`` (several when
    a :class:`SharedConv` dispatches to them)."""
    owner = getattr(instance_forward(conv), '__self__', None)
    if isinstance(owner, SharedConv) and owner.conv is conv:
        return list(owner.pairs)
    if isinstance(owner, TunePair) and owner.conv is conv:
        return [owner]
    return []


def _install(pair: Pair, batch: Optional[FoldBatch]) -> Optional[TunePair]:
    """Put one pair in tune mode; None if it already was."""
    current = conv_runtimes(pair.conv)
    if current:
        # a conv shared by frames that a handler arms takes one pair per
        # frame; the analysis admits no other sharing
        if (
            any(runtime.bn is pair.bn for runtime in current)
            or pair.handler is None
            or any(runtime.chains is not None for runtime in current)
        ):
            return None  # on already
    elif is_mmtune_forward(instance_forward(pair.conv)):
        return None
    if pair.handler is not None and not pair.handler.turn_on(pair.frame):
        return None
    runtime = TunePair(pair, batch)
    if current:
        SharedConv(pair.conv, current + [runtime]).install()
    else:
        runtime.install()
    if pair.handler is not None:
        pair.handler.attach(pair.frame, runtime)
    return runtime


def _install_pairs(
    model: nn.Module, pairs: Sequence[Pair], batch: Optional[FoldBatch]
) -> List[Optional[TunePair]]:
    """Put ``pairs`` in tune mode, and mark each call of ``model`` with a
    :class:`ForwardScope` of those newly on.

    Returns:
        list: For each pair its new :class:`TunePair`, or None if it
        already was in tune mode.
    """
    runtimes = [_install(pair, batch) for pair in pairs]
    installed = [runtime for runtime in runtimes if runtime is not None]
    if installed:
        scope = ForwardScope(installed, batch)
        model.register_forward_pre_hook(scope.enter)
        model.register_forward_hook(scope.exit, always_call=True)
    return runtimes


def _tune_report(
    analysis: Analysis, runtimes: Sequence[Optional[TunePair]]
) -> ConvBNReport:
    """The report of :func:`turn_on_fast_conv_bn_eval`: every pair found
    is converted (``runtimes``: what :func:`_install_pairs` returned)."""
    report = ConvBNReport(mode='tune', skipped=list(analysis.skipped))
    for pair, runtime in zip(analysis.pairs, runtimes):
        names = (pair.conv_name, pair.bn_name)
        report.converted.append(names)
        if runtime is None:
            report.already_on += 1
        owner = runtime or next(
            (r for r in conv_runtimes(pair.conv) if r.bn is pair.bn), None
        )
        if owner is not None:
            report.runtimes[names] = owner
    return report


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
        model (nn.Module): The model (unwrapped, not DDP). Its forward
            pre-hook and forward hook mark each call of it: what tune mode
            folds inside a call is let go when it returns.
        modules (str | list[str], optional): Qualified names of submodules
            to cover; None covers the whole model. Defaults to None.
        batch (str | bool): Fold the pairs together, once per call of
            ``model`` (:mod:`mmtune.rewrite.fold_batch`): ``'auto'`` on
            CUDA devices, True on every device, False never. The results
            are the same; batching saves the per-pair launches that make a
            GPU step wait for the CPU. Turn it off under
            ``DistributedDataParallel(find_unused_parameters=True)``.
            Defaults to ``'auto'``.

    Returns:
        ConvBNReport: converted pairs and what was skipped, and why; its
        :meth:`~ConvBNReport.fold_counts` tell how each call went.
    """
    start = time.perf_counter()
    fold_batch = _make_batch(batch)
    analysis = find_pairs(model, modules)
    runtimes = _install_pairs(model, analysis.pairs, fold_batch)
    report = _tune_report(analysis, runtimes)
    report.seconds = time.perf_counter() - start
    return report


def tune_pair_of(conv: nn.Module) -> Optional[TunePair]:
    """The :class:`TunePair` whose conv is ``conv``, if it is in tune
    mode (the first of them for a :class:`SharedConv`)."""
    runtimes = conv_runtimes(conv)
    return runtimes[0] if runtimes else None


def tune_pairs(model: nn.Module) -> List[TunePair]:
    """The :class:`TunePair` of every pair of ``model`` in tune mode."""
    return [
        runtime
        for module in model.modules()
        for runtime in conv_runtimes(module)
    ]


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
        if isinstance(
            module.__dict__.get('_replicate_for_data_parallel'), PlainReplica
        ):
            del module.__dict__['_replicate_for_data_parallel']
        for hooks in (
            module._forward_pre_hooks,
            module._forward_hooks,
        ):
            for key, hook in list(hooks.items()):
                if isinstance(getattr(hook, '__self__', None), ForwardScope):
                    del hooks[key]
                    getattr(module, '_forward_hooks_always_called', {}).pop(
                        key, None
                    )
    return count


__all__ = [
    'turn_on_fast_conv_bn_eval',
    'turn_off_fast_conv_bn_eval',
    'resolve_roots',
    'tune_pairs',
    'tune_pair_of',
    'fold_forward',
    'TunePair',
    'SharedConv',
    'conv_runtimes',
    'ForwardScope',
    'SkipRecord',
]
