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
place. A frame that cannot be traced loses only the pairs it calls directly;
its children are frames of their own.

For every module call it traces, the analysis also records the call chain:
the code objects from the function that called the module up to the
frame's ``forward`` (helper methods, nested functions, decorators), or up
to a ``torch.utils.checkpoint`` call. Tune mode folds a call only when it
comes through one of the chains of its conv, so the run time folds exactly
where the trace looked.
"""

import contextlib
import os
import sys
import types
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.utils.checkpoint
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .guards import instance_forward, is_mmtune_forward, pair_problem
from .handlers import get_frame_handler
from .report import SkipRecord

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


def _trace_all_paths(
    frame: nn.Module, chains: Dict[str, Set[Chain]]
) -> List[fx.Graph]:
    """Graphs of ``frame.forward`` for every outcome of its branches; the
    call chains of each submodule are added to ``chains``."""
    graphs = []
    todo: List[List[bool]] = [[]]
    while todo:
        prefix = todo.pop()
        tracer = _FrameTracer(prefix)
        graphs.append(tracer.trace(frame))
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
    handler: Optional[object] = None
    #: The call chains through which the traced frame called the conv
    #: (empty for handled pairs: their handler arms each call).
    chains: FrozenSet[Chain] = frozenset()


@dataclass
class Analysis:
    """All that :func:`analyse` found."""

    pairs: List[Pair] = field(default_factory=list)
    skipped: List[SkipRecord] = field(default_factory=list)


def _join(prefix: str, name: str) -> str:
    return f'{prefix}.{name}' if prefix else name


class _Collector:
    """Gathers call sites and per-path verdicts over all frames."""

    def __init__(self):
        # id(module) -> frames that call it (by identity: a module shared
        # between two parents has two qualified names)
        self.call_sites: Dict[int, Set[str]] = defaultdict(set)
        # bn qualname -> verdicts: ('pair', conv_name) or ('no', reason)
        self.bn_verdicts: Dict[str, List[Tuple[str, str]]] = defaultdict(list)
        # conv qualname -> bn names it fed on each path (None: something
        # else)
        self.conv_users: Dict[str, List[Optional[str]]] = defaultdict(list)
        self.bn_frame: Dict[str, str] = {}

    def scan(self, graph: fx.Graph, frame: nn.Module, frame_name: str):
        calls: Dict[str, int] = defaultdict(int)
        for node in graph.nodes:
            if node.op == 'call_module':
                calls[node.target] += 1
        for target in calls:
            self.call_sites[id(frame.get_submodule(target))].add(frame_name)
        for node in graph.nodes:
            if node.op != 'call_module':
                continue
            module = frame.get_submodule(node.target)
            name = _join(frame_name, node.target)
            if isinstance(module, _ConvNd):
                bn_users = [
                    user
                    for user in node.users
                    if user.op == 'call_module'
                    and isinstance(
                        frame.get_submodule(user.target), _BatchNorm
                    )
                ]
                if len(node.users) == 1 and len(bn_users) == 1:
                    self.conv_users[name].append(
                        _join(frame_name, bn_users[0].target)
                    )
                else:
                    self.conv_users[name].append(None)
            if not isinstance(module, _BatchNorm):
                continue
            self.bn_frame[name] = frame_name
            self.bn_verdicts[name].append(
                self._verdict(node, frame, frame_name, calls)
            )

    @staticmethod
    def _verdict(
        node: fx.Node, frame: nn.Module, frame_name: str, calls: Dict[str, int]
    ) -> Tuple[str, str]:
        if calls[node.target] > 1:
            return ('no', 'the BN is applied more than once')
        inputs = list(node.args) + [
            node.kwargs[k] for k in node.kwargs if k == 'input'
        ]
        if len(inputs) != 1 or set(node.kwargs) - {'input'}:
            return ('no', 'the BN is called with arguments besides its input')
        src = inputs[0]
        if not isinstance(src, fx.Node) or src.op != 'call_module':
            return ('no', 'the BN input is not a conv output')
        conv = frame.get_submodule(src.target)
        if not isinstance(conv, _ConvNd):
            return (
                'no',
                'the BN input is not a conv output '
                f'(it comes from {type(conv).__name__})',
            )
        conv_name = _join(frame_name, src.target)
        if len(src.users) != 1:
            return (
                'no',
                f'the output of conv {conv_name} is used by '
                f'{len(src.users)} consumers',
            )
        if calls[src.target] > 1:
            return ('no', f'conv {conv_name} is called at several places')
        return ('pair', conv_name)

    def add_handled(
        self, frame: nn.Module, frame_name: str, callees: Sequence[str]
    ):
        for callee in callees:
            module = frame.get_submodule(callee)
            self.call_sites[id(module)].add(frame_name)


def _frames(root: nn.Module, prefix: str):
    """``(name, module)`` for every module of ``root`` that calls
    submodules and has a BatchNorm below it."""
    for name, module in root.named_modules(prefix=prefix):
        if not any(True for _ in module.children()):
            continue
        if not any(isinstance(m, _BatchNorm) for m in module.modules()):
            continue
        if type(module).forward is nn.Module.forward:
            continue  # containers such as ModuleList have no forward
        yield name, module


def _set_training(model: nn.Module, flags: Dict[nn.Module, bool]):
    for module, flag in flags.items():
        module.training = flag


def analyse(model: nn.Module, roots: Sequence[str]) -> Analysis:
    """Find the pairs below the named submodules of ``model``.

    Args:
        model (nn.Module): The model.
        roots (Sequence[str]): Qualified names of the submodules to cover
            (``''`` is the whole model).

    Returns:
        Analysis: pairs found and what was skipped.
    """
    result = Analysis()
    collector = _Collector()
    failed_frames: Dict[str, str] = {}
    frame_of: Dict[str, nn.Module] = {}
    # frame name -> submodule target -> call chains
    frame_chains: Dict[str, Dict[str, Set[Chain]]] = {}
    handled: Dict[str, Tuple[nn.Module, object, object]] = {}
    flags = {m: m.training for m in model.modules()}
    frames = []
    seen_frames = set()
    for root_name in roots:
        root = model.get_submodule(root_name) if root_name else model
        for name, frame in _frames(root, root_name):
            if id(frame) not in seen_frames:
                seen_frames.add(id(frame))
                frames.append((name, frame))
    try:
        with _look_through_checkpoint():
            for name, frame in frames:
                handler = get_frame_handler(frame)
                if handler is not None:
                    found = handler.find_pair(frame)
                    collector.add_handled(frame, name, found.callees)
                    handled[name] = (frame, handler, found)
                    continue
                fn = instance_forward(frame)
                if fn is not None and not is_mmtune_forward(fn):
                    failed_frames[name] = (
                        'it has a forward wrapper installed on the instance'
                    )
                    continue
                graphs = []
                chains: Dict[str, Set[Chain]] = defaultdict(set)
                try:
                    for mode in (True, False):
                        model.train(mode)
                        graphs.extend(_trace_all_paths(frame, chains))
                except _TooManyPaths:
                    failed_frames[name] = (
                        'its forward has more than '
                        f'{MAX_PATHS_PER_FRAME} data-dependent branches'
                    )
                    continue
                except Exception as exc:  # noqa: BLE001 (any trace failure)
                    failed_frames[name] = (
                        f'its forward could not be traced ({_first_line(exc)})'
                    )
                    continue
                for graph in graphs:
                    collector.scan(graph, frame, name)
                frame_of[name] = frame
                frame_chains[name] = chains
    finally:
        _set_training(model, flags)

    # Decide each BN's pair from all paths of all frames.
    modules = dict(model.named_modules(remove_duplicate=False))
    decided: Set[str] = set()
    for frame_name, (frame, handler, found) in handled.items():
        names = [_join(frame_name, n) for n in found.callees]
        if found.pair is None:
            if found.reason is not None:
                result.skipped.append(
                    SkipRecord(tuple(names) or (frame_name,), found.reason)
                )
            decided.update(names)
            continue
        conv_name, bn_name = (_join(frame_name, n) for n in found.pair)
        decided.update((conv_name, bn_name))
        reason = _sites_problem(
            collector, modules, conv_name, bn_name
        ) or pair_problem(modules[conv_name], modules[bn_name])
        if reason is None:
            result.pairs.append(
                Pair(
                    conv_name,
                    bn_name,
                    modules[conv_name],
                    modules[bn_name],
                    frame_name,
                    frame,
                    handler,
                )
            )
        else:
            result.skipped.append(SkipRecord((conv_name, bn_name), reason))

    for bn_name, verdicts in collector.bn_verdicts.items():
        if bn_name in decided:
            continue
        decided.add(bn_name)
        reasons = [why for kind, why in verdicts if kind == 'no']
        convs = {why for kind, why in verdicts if kind == 'pair'}
        if reasons:
            result.skipped.append(SkipRecord((bn_name,), reasons[0]))
            continue
        if len(convs) != 1:
            result.skipped.append(
                SkipRecord(
                    (bn_name,),
                    'the BN input comes from different convs on '
                    'different paths',
                )
            )
            continue
        conv_name = convs.pop()
        decided.add(conv_name)
        if any(user != bn_name for user in collector.conv_users[conv_name]):
            result.skipped.append(
                SkipRecord(
                    (conv_name, bn_name),
                    'on some path the conv output is not used only by the BN',
                )
            )
            continue
        reason = _sites_problem(collector, modules, conv_name, bn_name)
        frame_name = collector.bn_frame[bn_name]
        if reason is None:
            reason = pair_problem(modules[conv_name], modules[bn_name])
        if reason is not None:
            result.skipped.append(SkipRecord((conv_name, bn_name), reason))
            continue
        local = conv_name[len(frame_name) + 1 :] if frame_name else conv_name
        result.pairs.append(
            Pair(
                conv_name,
                bn_name,
                modules[conv_name],
                modules[bn_name],
                frame_name,
                frame_of[frame_name],
                chains=frozenset(frame_chains[frame_name][local]),
            )
        )

    # BNs that no traced frame called.
    for root_name in roots:
        root = model.get_submodule(root_name) if root_name else model
        for name, module in root.named_modules(prefix=root_name):
            if not isinstance(module, _BatchNorm) or name in decided:
                continue
            decided.add(name)
            owner = _nearest_failed(name, failed_frames)
            if owner is not None:
                reason = (
                    f'it is called by {owner or "the model"}, where '
                    f'{failed_frames[owner]}'
                )
            else:
                reason = 'no traced forward calls the BN'
            result.skipped.append(SkipRecord((name,), reason))
    return result


def _sites_problem(
    collector: _Collector,
    modules: Dict[str, nn.Module],
    conv_name: str,
    bn_name: str,
) -> Optional[str]:
    for name in (conv_name, bn_name):
        sites = collector.call_sites.get(id(modules[name]), set())
        if len(sites) > 1:
            where = ', '.join(sorted(s or '<model>' for s in sites))
            return f'{name} is called from several places ({where})'
    return None


def _nearest_failed(name: str, failed: Dict[str, str]) -> Optional[str]:
    parts = name.split('.')
    for cut in range(len(parts) - 1, -1, -1):
        candidate = '.'.join(parts[:cut])
        if candidate in failed:
            return candidate
    return None
