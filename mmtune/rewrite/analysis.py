# Copyright (c) mmtune contributors. All rights reserved.
"""Find the Conv->BN pairs of a model that tune mode can take over exactly.

Every module whose forward calls submodules is a *frame*. Each frame's
``forward`` is traced with torch.fx on its own, with every submodule call
kept as one node, so a pair is always a conv and a BN called by the same
Python code. Tracing is repeated for every outcome of every data-dependent
branch (``if x.requires_grad``, ``if norm``: the per-call arguments are
traced as free inputs) and in both training modes, and
``torch.utils.checkpoint`` is looked through. A pair is accepted only when,
on every one of those paths, the conv output goes to the BN and nowhere
else, the BN gets nothing else, and neither module is called from any other
place. For a frame that cannot be traced, the pairs that its forward's
source proves are taken (:mod:`.source_pairs`: ``self.bn(self.conv(x))``,
``x = self.conv(x); x = self.bn(x)``, or a helper method returning the
conv's output handed to the BN, each module named nowhere else);
it loses only the other pairs it calls directly; its children are frames of
their own.

:func:`analyse` runs in three steps: list the frames below the roots;
trace each (or let its frame handler, e.g. for mmcv's ``ConvModule``, say
which pair it computes), noting on every path who calls each module, what
each conv output feeds and a :class:`Verdict` for each BN; then decide each
BN once from all paths: a :class:`Pair`, or a skip record with the reason.

A trace runs the forward's Python with the current values of the frame's
own attributes: ``if self.flag:`` or ``self.bns[self.domain]`` are decided
by them, not traced. So the analysis watches the attributes that the
forward's code reads as ``self.name`` (from the bytecode of the forward,
its nested functions, the helpers on the call chains and the frame's own
methods and properties they read) whose values are plain (:func:`_is_plain`),
and tune mode folds a call only while each has its traced value, of the
same type (:func:`same_value`); a frame whose forward changes one it reads
is skipped. Tune mode likewise folds only while the plain module globals
that the same code reads by name (``if DEBUG:``, ``FLAGS['skip']``) have
their traced values. A value reached through another object
(``self.opts.flag`` of a plain class instance, a global read through
``getattr``) is not watched: that is the known limit (a call whose conv
output then misses its BN is warned about, and the pair stops folding; one
that also sends it elsewhere is not seen). A tensor that the forward
stores on the frame (``self.feats.append(x)``, ``self.pre = x``) leaves
the traced dataflow: a
conv whose output, or anything computed from it, is found stored in the
frame's attributes after a trace is not paired. Each trace is undone: the
frame's attributes, and the contents of the containers among them, are put
back as they were, and so are the random generators.

For every module call it traces, the analysis also records the call chain:
the code objects from the function that called the module up to the
frame's ``forward`` (helper methods, nested functions, decorators), or up
to a ``torch.utils.checkpoint`` call. Tune mode folds a call only when it
comes through one of the chains of its conv, so the run time folds exactly
where the trace looked.
"""

import collections
import contextlib
import copy
import dis
import enum
import functools
import inspect
import os
import random
import sys
import types
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import (
    Dict,
    FrozenSet,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

import numpy
import torch
import torch.fx as fx
import torch.utils.checkpoint
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .guards import instance_forward, is_mmtune_forward, pair_problem
from .handlers import FrameHandler, HandledFrame, get_frame_handler
from .report import SkipRecord
from .source_pairs import SourcePairs, find_source_pairs

#: At most this many traced paths per frame and training mode.
MAX_PATHS_PER_FRAME = 64

_FX_DIR = os.path.dirname(fx.__file__)
_MODULE_FILE = nn.modules.module.__file__
CHECKPOINT_FILE = torch.utils.checkpoint.__file__


class _Checkpoint:
    """Stands in a call chain for ``torch.utils.checkpoint.checkpoint``: at
    run time the function it calls is called from that module's code."""

    def __repr__(self) -> str:
        return '<checkpoint>'

    def __reduce__(self):
        return 'CHECKPOINT'  # pickles and copies as the one instance


#: The end of a call chain that goes through ``torch.utils.checkpoint``.
CHECKPOINT = _Checkpoint()

#: A call chain: the code objects from the function that calls a module up
#: to the frame's ``forward`` (outermost last), or up to a checkpoint.
Chain = Tuple[object, ...]


def _fx_internal(code: types.CodeType) -> bool:
    """Whether ``code`` is torch.fx's or ``nn.Module``'s own."""
    name = code.co_filename
    return name.startswith(_FX_DIR) or name == _MODULE_FILE


def _caller_chain() -> Chain:
    """The chain of the module call being traced now (called from
    :meth:`_FrameTracer.call_module`)."""
    frame = sys._getframe(2)
    while frame is not None and _fx_internal(frame.f_code):
        frame = frame.f_back  # fx's patched Module.__call__
    chain: List[object] = []
    while frame is not None:
        code = frame.f_code
        if (
            code is _checkpoint_inline.__code__
            or code.co_filename == CHECKPOINT_FILE
        ):
            chain.append(CHECKPOINT)
            break
        if _fx_internal(code):
            break  # fx called the frame's forward here
        chain.append(code)
        frame = frame.f_back
    return tuple(chain)


class _TooManyPaths(Exception):
    pass


class _FrameTracer(fx.Tracer):
    """Traces one forward, every submodule call a leaf node.

    ``to_bool`` answers data-dependent branches from ``decisions`` (then
    False) and records what it answered, so that the caller can enumerate
    every path.
    """

    def __init__(self, decisions: Sequence[bool]):
        super().__init__()
        self.decisions = list(decisions)
        self.taken: List[bool] = []
        # submodule target -> the call chains it was called through
        self.chains: Dict[str, Set[Chain]] = defaultdict(set)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

    def call_module(self, m, forward, args, kwargs):
        self.chains[self.path_of_module(m)].add(_caller_chain())
        return super().call_module(m, forward, args, kwargs)

    def to_bool(self, obj: fx.Proxy) -> bool:
        index = len(self.taken)
        if index >= 4 * MAX_PATHS_PER_FRAME:
            raise _TooManyPaths()
        value = self.decisions[index] if index < len(self.decisions) else False
        self.taken.append(value)
        return value

    def iter(self, obj: fx.Proxy):
        raise fx.proxy.TraceError(
            'iterating over a traced value (e.g. a tuple input)'
        )


def _checkpoint_inline(function, *args, **kwargs):
    """Stand-in for ``torch.utils.checkpoint.checkpoint`` while tracing:
    checkpointing changes memory, not dataflow."""
    for key in (
        'use_reentrant',
        'context_fn',
        'determinism_check',
        'debug',
        'preserve_rng_state',
    ):
        kwargs.pop(key, None)
    return function(*args, **kwargs)


@contextlib.contextmanager
def _look_through_checkpoint():
    original = torch.utils.checkpoint.checkpoint
    torch.utils.checkpoint.checkpoint = _checkpoint_inline
    try:
        yield
    finally:
        torch.utils.checkpoint.checkpoint = original


_PLAIN_TYPES = (
    bool,
    int,
    float,
    str,
    type(None),
    enum.Enum,
    numpy.generic,
)
#: What an ``nn.Module`` itself keeps in its ``__dict__`` (not the frame's
#: own state: not put back after a trace, not searched for tensors)
_MODULE_KEYS = frozenset(nn.Module().__dict__)
#: How many plain items a list, tuple or dict attribute may hold to be
#: watched by value (``self.cfg['res']``)
_MAX_WATCHED_ITEMS = 32


def _is_plain(value) -> bool:
    """Whether ``value`` is a flag, number, string, enum member, None, a
    tuple of them (``torch.Size`` too), or a small list or dict of them:
    what a forward's Python may branch or index on."""
    if isinstance(value, _PLAIN_TYPES):
        return True
    if isinstance(value, dict):
        items = list(value.keys()) + list(value.values())
    elif isinstance(value, (tuple, list)):
        items = value
    else:
        return False
    return len(items) <= 2 * _MAX_WATCHED_ITEMS and all(
        isinstance(v, _PLAIN_TYPES) for v in items
    )


def _frozen(value):
    """A copy of a plain value that later changes of the attribute's
    contents (a dict entry set) cannot reach."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    return value


class _Unstable(Exception):
    """The forward changes an attribute of the frame that it reads."""


_SELF_LOADS = frozenset(
    ('LOAD_FAST', 'LOAD_DEREF', 'LOAD_FAST_CHECK', 'LOAD_FAST_BORROW')
)


def _loads_self(ins) -> bool:
    if ins.opname in _SELF_LOADS:
        return ins.argval == 'self'
    if ins.opname.startswith('LOAD_FAST_LOAD_FAST'):  # (a, b): b on top
        return isinstance(ins.argval, tuple) and ins.argval[-1] == 'self'
    return False


@functools.lru_cache(maxsize=1024)
def _module_of(filename: str) -> Optional[types.ModuleType]:
    """The module whose source file is ``filename`` (whose globals the code
    objects compiled from it read), or None."""
    return inspect.getmodule(None, filename)


def _read_names(
    frame: nn.Module, codes
) -> Tuple[Set[str], Set[Tuple[str, str]]]:
    """What ``codes`` (the frame's forward, its helpers) read: the
    attributes read as ``self.name``, and the module globals read by name
    (as ``(module name, global name)``); from their bytecode, nested
    functions and the frame's own methods and properties that they read
    included."""
    cls = type(frame)
    names: Set[str] = set()
    global_names: Set[Tuple[str, str]] = set()
    todo = [c for c in codes if isinstance(c, types.CodeType)]
    seen: Set[types.CodeType] = set()
    while todo:
        code = todo.pop()
        if code in seen:
            continue
        seen.add(code)
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        module = _module_of(code.co_filename)
        prev = before = None
        for ins in dis.get_instructions(code):
            if (
                ins.opname == 'LOAD_GLOBAL'
                and module is not None
                and isinstance(ins.argval, str)
            ):
                global_names.add((module.__name__, ins.argval))
            on_self = prev is not None and (
                _loads_self(prev)
                # self.n += 1: LOAD self, COPY, LOAD_ATTR n
                or (
                    prev.opname in ('COPY', 'DUP_TOP')
                    and before is not None
                    and _loads_self(before)
                )
            )
            if (
                ins.opname in ('LOAD_ATTR', 'LOAD_METHOD', 'STORE_ATTR')
                and on_self
                and isinstance(ins.argval, str)
                and ins.argval not in names
            ):
                name = ins.argval
                names.add(name)
                found = inspect.getattr_static(cls, name, None)
                if isinstance(found, property):
                    found = found.fget
                found = getattr(found, '__func__', found)
                if isinstance(found, types.FunctionType):
                    todo.append(inspect.unwrap(found).__code__)
            prev, before = ins, prev
    return names, global_names


_NO_VALUE = object()


def _global_values(
    keys: Set[Tuple[str, str]],
) -> Dict[Tuple[str, str], object]:
    """The plain values (:func:`_is_plain`) of the module globals ``keys``
    (``(module name, global name)``; left out: dunder names, and names the
    module does not have, such as builtins)."""
    values: Dict[Tuple[str, str], object] = {}
    for module_name, name in keys:
        module = sys.modules.get(module_name)
        if module is None or name.startswith('__'):
            continue
        value = module.__dict__.get(name, _NO_VALUE)
        if value is not _NO_VALUE and _is_plain(value):
            values[module_name, name] = _frozen(value)
    return values


def _watched_values(frame: nn.Module, names: Set[str]) -> Dict[str, object]:
    """The plain values of the attributes ``names`` (left out: what
    ``nn.Module`` itself defines, such as ``training``, and names the
    frame does not have)."""
    values: Dict[str, object] = {}
    for name in names:
        if (
            name.startswith('__')
            or name in _MODULE_KEYS
            or hasattr(nn.Module, name)
        ):
            continue
        try:
            value = getattr(frame, name)
        except Exception:  # noqa: BLE001 (a property that fails: unwatched)
            continue
        if _is_plain(value):
            values[name] = _frozen(value)
    return values


def same_value(a, b) -> bool:
    """Equal and of the same type (``1`` is not ``True``), item by item
    for lists, tuples and dicts."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(map(same_value, a, b))
    return a == b


_CONTAINERS = (list, dict, set, collections.deque)


def _frame_values(frame: nn.Module) -> Iterator[Tuple[object, int]]:
    """The values in the frame's own attributes, each with its level: the
    attributes at 0, the items of the lists, tuples, dicts, sets and deques
    among them down to level 3 (each container once)."""
    todo = [
        (value, 0)
        for key, value in frame.__dict__.items()
        if key not in _MODULE_KEYS
    ]
    seen: Set[int] = set()
    while todo:
        value, level = todo.pop()
        yield value, level
        if (
            isinstance(value, _CONTAINERS + (tuple,))
            and level < 3
            and id(value) not in seen
        ):
            seen.add(id(value))
            items = value.values() if isinstance(value, dict) else value
            todo.extend((item, level + 1) for item in list(items))


def _snapshot(frame: nn.Module) -> tuple:
    """The frame's attributes, and a copy of the contents of each mutable
    container among them (three levels)."""
    contents = {
        id(value): (value, copy.copy(value))
        for value, level in _frame_values(frame)
        if level < 3 and isinstance(value, _CONTAINERS)
    }
    return dict(frame.__dict__), list(contents.values())


def _restore(frame: nn.Module, snapshot: tuple) -> None:
    """Put the frame's attributes back as :func:`_snapshot` saw them, and
    the contents of the lists, dicts, sets and deques among them."""
    state, contents = snapshot
    attrs = frame.__dict__
    for key in [k for k in attrs if k not in state]:
        del attrs[key]
    attrs.update(state)
    for value, saved in contents:
        value.clear()
        if isinstance(value, dict) or isinstance(value, set):
            value.update(saved)
        else:
            value.extend(saved)


def _stored_proxies(frame: nn.Module) -> List[fx.Proxy]:
    """The traced values found in the frame's own attributes (and in the
    containers among them, three levels deep) after a trace, before
    :func:`_restore`."""
    return [
        value
        for value, _ in _frame_values(frame)
        if isinstance(value, fx.Proxy)
    ]


def _stored_calls(proxies: Sequence[fx.Proxy]) -> Set[str]:
    """The submodule calls whose outputs the stored ``proxies`` were
    computed from."""
    targets: Set[str] = set()
    todo = [p.node for p in proxies]
    seen: Set[fx.Node] = set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == 'call_module':
            targets.add(node.target)
        todo.extend(node.all_input_nodes)
    return targets


def _trace_all_paths(
    frame: nn.Module,
    chains: Dict[str, Set[Chain]],
    reads: Dict[str, object],
    global_reads: Dict[Tuple[str, str], object],
) -> List[Tuple[fx.Graph, Set[str]]]:
    """Graphs of ``frame.forward`` for every outcome of its branches, each
    with the submodule calls whose outputs the trace found stored on the
    frame; the call chains of each submodule are added to ``chains``, the
    plain attributes read to ``reads``, the plain module globals read to
    ``global_reads``."""
    graphs = []
    todo: List[List[bool]] = [[]]
    forward = inspect.unwrap(type(frame).forward)
    while todo:
        prefix = todo.pop()
        tracer = _FrameTracer(prefix)
        snapshot = _snapshot(frame)
        try:
            graph = tracer.trace(frame)
            stored = _stored_calls(_stored_proxies(frame))
            codes = [getattr(forward, '__code__', None)] + [
                code
                for found in tracer.chains.values()
                for chain in found
                for code in chain
            ]
            names, global_names = _read_names(frame, codes)
            after = _watched_values(frame, names)
        finally:
            _restore(frame, snapshot)
        before = _watched_values(frame, names)
        for name, value in before.items():
            if name in after and not same_value(after[name], value):
                raise _Unstable(
                    f'its forward changes the attribute {name!r} that it '
                    f'reads ({value!r}, then {after[name]!r})'
                )
        reads.update(before)
        global_reads.update(_global_values(global_names))
        graphs.append((graph, stored))
        for target, found in tracer.chains.items():
            chains[target] |= found
        for index in range(len(prefix), len(tracer.taken)):
            todo.append(tracer.taken[:index] + [True])
        if len(graphs) + len(todo) > MAX_PATHS_PER_FRAME:
            raise _TooManyPaths()
    return graphs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().split('\n', 1)[0]
    if len(text) > 160:
        text = text[:157] + '...'
    return f'{type(exc).__name__}: {text}' if text else type(exc).__name__


@dataclass
class Pair:
    """A conv and the BN it feeds, as found in one frame."""

    conv_name: str
    bn_name: str
    conv: nn.Module
    bn: nn.Module
    frame_name: str
    frame: nn.Module
    #: Set for pairs a frame handler (e.g. mmcv ConvModule) takes over.
    handler: Optional[FrameHandler] = None
    #: The call chains through which the traced frame called the conv
    #: (empty for handled pairs: their handler arms each call).
    chains: FrozenSet[Chain] = frozenset()
    #: The frame's plain attributes that its traced forward read, with
    #: their values then: the trace holds only while they do.
    frame_state: Tuple[Tuple[str, object], ...] = ()
    #: Likewise the plain module globals it read: ``(module name, global
    #: name, value)``.
    global_state: Tuple[Tuple[str, str, object], ...] = ()


@dataclass
class Analysis:
    """All that :func:`analyse` found."""

    pairs: List[Pair] = field(default_factory=list)
    skipped: List[SkipRecord] = field(default_factory=list)


class VerdictKind(enum.Enum):
    """What one traced path says about a BN."""

    #: Its input is the output of one conv, which nothing else uses.
    PAIR = 'pair'
    #: It cannot fold on this path.
    SKIP = 'skip'


@dataclass(frozen=True)
class Verdict:
    """What one traced path says about one BN: it pairs with the conv
    ``conv_name`` (:attr:`VerdictKind.PAIR`) or it cannot fold, for
    ``reason`` (:attr:`VerdictKind.SKIP`)."""

    kind: VerdictKind
    conv_name: Optional[str] = None
    reason: Optional[str] = None

    @classmethod
    def pair(cls, conv_name: str) -> 'Verdict':
        return cls(VerdictKind.PAIR, conv_name=conv_name)

    @classmethod
    def skip(cls, reason: str) -> 'Verdict':
        return cls(VerdictKind.SKIP, reason=reason)


class _Handled(NamedTuple):
    """A frame that a frame handler takes over, and what it found."""

    frame: nn.Module
    handler: FrameHandler
    found: HandledFrame


def _join(prefix: str, name: str) -> str:
    return f'{prefix}.{name}' if prefix else name


def resolve_roots(
    model: nn.Module, modules: Union[None, str, Sequence[str]]
) -> List[str]:
    """The qualified names of the submodules of ``model`` that ``modules``
    names (``['']``: the whole model), without names inside another.

    Raises:
        TypeError: ``modules`` is not None, a name or a list of names.
        ValueError: a name is not a submodule of ``model``.
    """
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


def find_pairs(
    model: nn.Module, modules: Union[None, str, Sequence[str]] = None
) -> Analysis:
    """Find the pairs below the submodules of ``model`` that ``modules``
    names (:func:`resolve_roots`; None: the whole model).

    Raises:
        TypeError, ValueError: as :func:`resolve_roots`.
    """
    return analyse(model, resolve_roots(model, modules))


def analyse(model: nn.Module, roots: Sequence[str]) -> Analysis:
    """Find the pairs below the named submodules of ``model``.

    Args:
        model (nn.Module): The model.
        roots (Sequence[str]): Qualified names of the submodules to cover
            (``''`` is the whole model), as :func:`resolve_roots` gives.

    Returns:
        Analysis: pairs found and what was skipped.
    """
    traces = _trace_frames(model, _frames(model, roots))
    # Each BN is decided once: those of handled frames first, then those
    # that traced frames call, then the ones that no traced frame calls.
    decide = _Decisions(model, traces)
    for frame_name, handled in traces.handled.items():
        decide.handled_frame(frame_name, handled)
    for bn_name, verdicts in traces.bn_verdicts.items():
        decide.traced_bn(bn_name, verdicts)
    for name, module in _modules_below(model, roots):
        if isinstance(module, _BatchNorm):
            decide.untraced_bn(name)
    return decide.analysis


def _modules_below(
    model: nn.Module, roots: Sequence[str]
) -> Iterator[Tuple[str, nn.Module]]:
    """``(qualified name, module)`` of the roots and of every module in
    them."""
    for root_name in roots:
        root = model.get_submodule(root_name) if root_name else model
        yield from root.named_modules(prefix=root_name)


def _frames(
    model: nn.Module, roots: Sequence[str]
) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` for every module below ``roots`` that calls
    submodules and has a BatchNorm below it, each module once."""
    frames = []
    seen: Set[int] = set()
    for name, module in _modules_below(model, roots):
        if id(module) in seen or not _is_frame(module):
            continue
        seen.add(id(module))
        frames.append((name, module))
    return frames


def _is_frame(module: nn.Module) -> bool:
    if not any(True for _ in module.children()):
        return False
    if not any(isinstance(m, _BatchNorm) for m in module.modules()):
        return False
    # containers such as ModuleList have no forward
    return type(module).forward is not nn.Module.forward


class _Traces:
    """What the frames showed, over all their paths: who calls each
    module, and each BN's verdict on each path."""

    def __init__(self):
        # id(module) -> frames that call it (by identity: a module shared
        # between two parents has two qualified names)
        self.call_sites: Dict[int, Set[str]] = defaultdict(set)
        # bn qualname -> its verdict on each path
        self.bn_verdicts: Dict[str, List[Verdict]] = defaultdict(list)
        # conv qualname -> the BN it fed on each path (None: something
        # else)
        self.conv_users: Dict[str, List[Optional[str]]] = defaultdict(list)
        # bn qualname -> the frame that calls it
        self.bn_frame: Dict[str, str] = {}
        # traced frame name -> the frame
        self.frames: Dict[str, nn.Module] = {}
        # traced frame name -> submodule target -> call chains
        self.chains: Dict[str, Dict[str, Set[Chain]]] = {}
        # frames that a frame handler takes over, by name
        self.handled: Dict[str, _Handled] = {}
        # frame name -> why it could not be traced
        self.failed: Dict[str, str] = {}
        # traced frame name -> the plain attributes its forward read
        self.reads: Dict[str, Tuple[Tuple[str, object], ...]] = {}
        # traced frame name -> the plain module globals its forward read
        self.global_reads: Dict[str, Tuple[Tuple[str, str, object], ...]] = {}

    def add_handled(self, frame_name: str, handled: _Handled) -> None:
        for callee in handled.found.callees:
            module = handled.frame.get_submodule(callee)
            self.call_sites[id(module)].add(frame_name)
        self.handled[frame_name] = handled

    def add_traced(
        self,
        frame_name: str,
        frame: nn.Module,
        graphs: List[Tuple[fx.Graph, Set[str]]],
        chains: Dict[str, Set[Chain]],
        reads: Dict[str, object],
        global_reads: Dict[Tuple[str, str], object],
    ) -> None:
        for graph, stored in graphs:
            self._scan(graph, frame, frame_name, stored)
        self.frames[frame_name] = frame
        self.chains[frame_name] = chains
        self.reads[frame_name] = tuple(sorted(reads.items()))
        self.global_reads[frame_name] = tuple(
            (module, name, value)
            for (module, name), value in sorted(global_reads.items())
        )

    def add_from_source(
        self, frame_name: str, frame: nn.Module, found: SourcePairs
    ) -> None:
        """The pairs that the source of an untraceable frame proves
        (:mod:`.source_pairs`): called at one place, through the chain the
        source shows (the forward's own code, or a helper's then the
        forward's)."""
        for callee in found.callees:
            self.call_sites[id(frame._modules[callee])].add(frame_name)
        chains = self.chains.setdefault(frame_name, {})
        for conv, bn in found.pairs:
            conv_name, bn_name = _join(frame_name, conv), _join(frame_name, bn)
            self.bn_verdicts[bn_name].append(Verdict.pair(conv_name))
            self.conv_users[conv_name].append(bn_name)
            self.bn_frame[bn_name] = frame_name
            chains[conv] = {found.chains[conv]}
        self.frames[frame_name] = frame

    def _scan(
        self,
        graph: fx.Graph,
        frame: nn.Module,
        frame_name: str,
        stored: Set[str],
    ):
        calls = Counter(
            node.target for node in graph.nodes if node.op == 'call_module'
        )
        for target in calls:
            self.call_sites[id(frame.get_submodule(target))].add(frame_name)
        for node in graph.nodes:
            if node.op != 'call_module':
                continue
            module = frame.get_submodule(node.target)
            name = _join(frame_name, node.target)
            if isinstance(module, _ConvNd):
                self.conv_users[name].append(
                    None
                    if node.target in stored
                    else _bn_fed_by(node, frame, frame_name)
                )
            if isinstance(module, _BatchNorm):
                self.bn_frame[name] = frame_name
                self.bn_verdicts[name].append(
                    _bn_verdict(node, frame, frame_name, calls)
                )


def _trace_frames(
    model: nn.Module, frames: Sequence[Tuple[str, nn.Module]]
) -> _Traces:
    """Trace each frame, or let its frame handler find its pair; the
    model's training flags are restored afterwards."""
    traces = _Traces()
    flags = {m: m.training for m in model.modules()}
    try:
        with _look_through_checkpoint(), _random_states_kept():
            for name, frame in frames:
                _trace_frame(model, name, frame, traces)
    finally:
        _set_training(model, flags)
    return traces


@contextlib.contextmanager
def _random_states_kept():
    """Traces run forwards that may draw random numbers (stochastic
    depth): Python's, numpy's and torch's generators are put back."""
    python, nump = random.getstate(), numpy.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python)
            numpy.random.set_state(nump)


def _trace_frame(
    model: nn.Module, name: str, frame: nn.Module, traces: _Traces
) -> None:
    """Add to ``traces`` what ``frame`` shows on every path, in both
    training modes (or what its handler found, or why it failed)."""
    handler = get_frame_handler(frame)
    if handler is not None:
        found = handler.find_pair(frame)
        traces.add_handled(name, _Handled(frame, handler, found))
        return
    fn = instance_forward(frame)
    if fn is not None and not is_mmtune_forward(fn):
        traces.failed[name] = (
            'it has a forward wrapper installed on the instance'
        )
        return
    graphs: List[Tuple[fx.Graph, Set[str]]] = []
    chains: Dict[str, Set[Chain]] = defaultdict(set)
    reads: Dict[str, object] = {}
    global_reads: Dict[Tuple[str, str], object] = {}
    try:
        for mode in (True, False):
            model.train(mode)
            graphs.extend(_trace_all_paths(frame, chains, reads, global_reads))
    except _Unstable as exc:
        traces.failed[name] = str(exc)
        return
    except _TooManyPaths:
        traces.failed[name] = (
            'its forward has more than '
            f'{MAX_PATHS_PER_FRAME} data-dependent branches'
        )
        return
    except Exception as exc:  # noqa: BLE001 (any trace failure)
        why = f'its forward could not be traced ({_first_line(exc)})'
        found = find_source_pairs(frame)
        if found is None:
            why += ' and its source uses dynamic access or cannot be read'
        elif found.pairs:
            traces.add_from_source(name, frame, found)
            why += ', and its source does not prove the pair'
        traces.failed[name] = why
        return
    traces.add_traced(name, frame, graphs, chains, reads, global_reads)


def _set_training(model: nn.Module, flags: Dict[nn.Module, bool]):
    for module, flag in flags.items():
        module.training = flag


def _bn_fed_by(
    node: fx.Node, frame: nn.Module, frame_name: str
) -> Optional[str]:
    """The BN to which the conv call ``node`` gives its output and to
    nothing else, or None."""
    bn_users = [
        user
        for user in node.users
        if user.op == 'call_module'
        and isinstance(frame.get_submodule(user.target), _BatchNorm)
    ]
    if len(node.users) == 1 and len(bn_users) == 1:
        return _join(frame_name, bn_users[0].target)
    return None


def _bn_verdict(
    node: fx.Node, frame: nn.Module, frame_name: str, calls: Dict[str, int]
) -> Verdict:
    """What the BN call ``node`` says on this path: the conv whose output
    it takes, alone, or why not (``calls``: how often this path calls each
    submodule)."""
    if calls[node.target] > 1:
        return Verdict.skip('the BN is applied more than once')
    inputs = list(node.args) + [
        node.kwargs[k] for k in node.kwargs if k == 'input'
    ]
    if len(inputs) != 1 or set(node.kwargs) - {'input'}:
        return Verdict.skip(
            'the BN is called with arguments besides its input'
        )
    src = inputs[0]
    if not isinstance(src, fx.Node) or src.op != 'call_module':
        return Verdict.skip('the BN input is not a conv output')
    conv = frame.get_submodule(src.target)
    if not isinstance(conv, _ConvNd):
        return Verdict.skip(
            'the BN input is not a conv output '
            f'(it comes from {type(conv).__name__})'
        )
    conv_name = _join(frame_name, src.target)
    if len(src.users) != 1:
        return Verdict.skip(
            f'the output of conv {conv_name} is used by '
            f'{len(src.users)} consumers'
        )
    if calls[src.target] > 1:
        return Verdict.skip(f'conv {conv_name} is called at several places')
    return Verdict.pair(conv_name)


class _Decisions:
    """Decides each BN once, from all that the frames showed: into a pair
    or a skip record of :attr:`analysis`."""

    def __init__(self, model: nn.Module, traces: _Traces):
        self.traces = traces
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.decided: Set[str] = set()
        self.analysis = Analysis()

    def handled_frame(self, frame_name: str, handled: _Handled) -> None:
        """The pair that a frame handler found, if it can fold."""
        found = handled.found
        if found.pair is None:
            names = [_join(frame_name, n) for n in found.callees]
            if found.reason is not None:
                self._skip(tuple(names) or (frame_name,), found.reason)
            self.decided.update(names)
            return
        conv_name, bn_name = (_join(frame_name, n) for n in found.pair)
        self.decided.update((conv_name, bn_name))
        reason = self._problem(conv_name, bn_name)
        if reason is not None:
            self._skip((conv_name, bn_name), reason)
            return
        self._accept(
            conv_name,
            bn_name,
            frame_name,
            handled.frame,
            handler=handled.handler,
        )

    def traced_bn(self, bn_name: str, verdicts: Sequence[Verdict]) -> None:
        """A BN that traced frames called: a pair if every path pairs it
        with the same conv, whose output goes only to it."""
        if bn_name in self.decided:
            return
        self.decided.add(bn_name)
        for verdict in verdicts:
            if verdict.kind is VerdictKind.SKIP:
                self._skip((bn_name,), verdict.reason)
                return
        convs = {verdict.conv_name for verdict in verdicts}
        if len(convs) != 1:
            self._skip(
                (bn_name,),
                'the BN input comes from different convs on different paths',
            )
            return
        conv_name = convs.pop()
        self.decided.add(conv_name)
        users = self.traces.conv_users[conv_name]
        if any(user != bn_name for user in users):
            self._skip(
                (conv_name, bn_name),
                'on some path the conv output is not used only by the BN',
            )
            return
        reason = self._problem(conv_name, bn_name)
        if reason is not None:
            self._skip((conv_name, bn_name), reason)
            return
        frame_name = self.traces.bn_frame[bn_name]
        local = conv_name[len(frame_name) + 1 :] if frame_name else conv_name
        self._accept(
            conv_name,
            bn_name,
            frame_name,
            self.traces.frames[frame_name],
            chains=frozenset(self.traces.chains[frame_name][local]),
            frame_state=self.traces.reads.get(frame_name, ()),
            global_state=self.traces.global_reads.get(frame_name, ()),
        )

    def untraced_bn(self, name: str) -> None:
        """A BN that no traced frame called, with the reason."""
        if name in self.decided:
            return
        self.decided.add(name)
        failed = self.traces.failed
        owner = _nearest_failed(name, failed)
        if owner is not None:
            reason = (
                f'it is called by {owner or "the model"}, where '
                f'{failed[owner]}'
            )
        else:
            reason = 'no traced forward calls the BN'
        self._skip((name,), reason)

    def _problem(self, conv_name: str, bn_name: str) -> Optional[str]:
        """Why a pair that the frames agree on still cannot fold."""
        return self._sites_problem(conv_name, bn_name) or pair_problem(
            self.modules[conv_name], self.modules[bn_name]
        )

    def _sites_problem(self, conv_name: str, bn_name: str) -> Optional[str]:
        for name in (conv_name, bn_name):
            module = self.modules[name]
            sites = self.traces.call_sites.get(id(module), set())
            if len(sites) > 1 and not (
                name == conv_name and self._armed_at_every_site(module, sites)
            ):
                where = ', '.join(sorted(s or '<model>' for s in sites))
                return f'{name} is called from several places ({where})'
        return None

    def _armed_at_every_site(self, conv: nn.Module, sites: Set[str]) -> bool:
        """Whether every frame that calls ``conv`` is a handled frame
        whose pair is ``conv`` and a BN of its own (a head's conv shared by
        the ``ConvModule`` of every level): each call is then armed by its
        frame, for its own BN (:class:`~.tune_mode.SharedConv`)."""
        for site in sites:
            handled = self.traces.handled.get(site)
            if handled is None or handled.found.pair is None:
                return False
            if handled.frame.get_submodule(handled.found.pair[0]) is not conv:
                return False
        return True

    def _accept(
        self,
        conv_name: str,
        bn_name: str,
        frame_name: str,
        frame: nn.Module,
        handler: Optional[FrameHandler] = None,
        chains: FrozenSet[Chain] = frozenset(),
        frame_state: Tuple[Tuple[str, object], ...] = (),
        global_state: Tuple[Tuple[str, str, object], ...] = (),
    ) -> None:
        self.analysis.pairs.append(
            Pair(
                conv_name,
                bn_name,
                self.modules[conv_name],
                self.modules[bn_name],
                frame_name,
                frame,
                handler,
                chains,
                frame_state,
                global_state,
            )
        )

    def _skip(self, modules: Tuple[str, ...], reason: str) -> None:
        self.analysis.skipped.append(SkipRecord(modules, reason))


def _nearest_failed(name: str, failed: Dict[str, str]) -> Optional[str]:
    parts = name.split('.')
    for cut in range(len(parts) - 1, -1, -1):
        candidate = '.'.join(parts[:cut])
        if candidate in failed:
            return candidate
    return None


__all__ = [
    'analyse',
    'find_pairs',
    'resolve_roots',
    'Analysis',
    'Pair',
    'Verdict',
    'VerdictKind',
    'Chain',
    'CHECKPOINT',
    'CHECKPOINT_FILE',
    'MAX_PATHS_PER_FRAME',
]
