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
"""

import contextlib
import types
from collections import defaultdict
from dataclasses import dataclass, field
from typing import (
    Callable,
    Dict,
    FrozenSet,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
)

import torch
import torch.fx as fx
import torch.utils.checkpoint
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .handlers import get_frame_handler
from .report import SkipRecord

#: At most this many traced paths per frame and training mode.
MAX_PATHS_PER_FRAME = 64

_PLAIN_CONV_FORWARDS = {
    cls.forward
    for cls in (
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
    )
}
_PLAIN_CONV_FORWARD_IMPLS = {
    cls._conv_forward for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
}
_PLAIN_BN_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}


def instance_forward(module: nn.Module) -> Optional[Callable]:
    """The ``forward`` set on the instance (not its class), if any."""
    return module.__dict__.get('forward')


def is_mmtune_forward(fn: Optional[Callable]) -> bool:
    """Whether ``fn`` is a forward that mmtune installed."""
    owner = getattr(fn, '__self__', None)
    return bool(getattr(owner, '_mmtune_forward_owner', False))


def conv_problem(conv: nn.Module) -> Optional[str]:
    """Why ``conv`` cannot be folded into, or None when it can."""
    if not isinstance(conv, _ConvNd):
        return f'{type(conv).__name__} is not a convolution'
    cls = type(conv)
    if cls.forward not in _PLAIN_CONV_FORWARDS or (
        not conv.transposed
        and cls._conv_forward not in _PLAIN_CONV_FORWARD_IMPLS
    ):
        return (
            f'the conv type {cls.__name__} has its own forward (e.g. '
            'weight standardisation or adaptive padding)'
        )
    fn = instance_forward(conv)
    if fn is not None and not is_mmtune_forward(fn):
        return 'the conv has a forward wrapper installed on the instance'
    return None


def bn_problem(bn: nn.Module) -> Optional[str]:
    """Why ``bn`` cannot be folded, or None when it can."""
    cls = type(bn)
    if cls.forward not in _PLAIN_BN_FORWARDS:
        return f'the BN type {cls.__name__} has its own forward'
    if bn.running_mean is None or bn.running_var is None:
        return 'the BN has no running statistics (track_running_stats=False)'
    fn = instance_forward(bn)
    if fn is not None and not is_mmtune_forward(fn):
        return 'the BN has a forward wrapper installed on the instance'
    return None


def hooks_problem(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    """Why hooks make folding unsafe, or None.

    Hooks on the conv would see the folded output; hooks on the BN its
    folded input.
    """
    if (
        conv._forward_hooks
        or conv._backward_hooks
        or getattr(conv, '_backward_pre_hooks', None)
    ):
        return 'the conv has forward or backward hooks'
    if (
        bn._forward_pre_hooks
        or bn._forward_hooks
        or bn._backward_hooks
        or getattr(bn, '_backward_pre_hooks', None)
    ):
        return 'the BN has forward or backward hooks'
    return None


def frame_codes(frame_cls: type) -> FrozenSet[types.CodeType]:
    """Code objects that a frame's forward runs as its own: the forward
    (unwrapped from decorators) and the functions nested in it."""
    codes: Set[types.CodeType] = set()
    fn = frame_cls.forward
    while fn is not None:
        code = getattr(fn, '__code__', None)
        if code is not None:
            stack = [code]
            while stack:
                current = stack.pop()
                if current in codes:
                    continue
                codes.add(current)
                stack.extend(
                    c
                    for c in current.co_consts
                    if isinstance(c, types.CodeType)
                )
        fn = getattr(fn, '__wrapped__', None)
    return frozenset(codes)


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

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

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


def _trace_all_paths(frame: nn.Module) -> List[fx.Graph]:
    """Graphs of ``frame.forward`` for every outcome of its branches."""
    graphs = []
    todo: List[List[bool]] = [[]]
    while todo:
        prefix = todo.pop()
        tracer = _FrameTracer(prefix)
        graphs.append(tracer.trace(frame))
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
        if len(node.args) != 1 or node.kwargs:
            return ('no', 'the BN is called with more than one argument')
        src = node.args[0]
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
    frame_of: Dict[str, Tuple[nn.Module, str]] = {}
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
                try:
                    for mode in (True, False):
                        model.train(mode)
                        graphs.extend(_trace_all_paths(frame))
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
                frame_of[name] = (frame, name)
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
        ) or _modules_problem(modules[conv_name], modules[bn_name])
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
            reason = _modules_problem(modules[conv_name], modules[bn_name])
        if reason is not None:
            result.skipped.append(SkipRecord((conv_name, bn_name), reason))
            continue
        result.pairs.append(
            Pair(
                conv_name,
                bn_name,
                modules[conv_name],
                modules[bn_name],
                frame_name,
                frame_of[frame_name][0],
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


def _modules_problem(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    reason = conv_problem(conv) or bn_problem(bn) or hooks_problem(conv, bn)
    if reason is None and _out_channels(conv) != bn.num_features:
        reason = (
            f'the conv has {_out_channels(conv)} output channels but '
            f'the BN {bn.num_features} features'
        )
    return reason


def _out_channels(conv: _ConvNd) -> int:
    return conv.out_channels


def _nearest_failed(name: str, failed: Dict[str, str]) -> Optional[str]:
    parts = name.split('.')
    for cut in range(len(parts) - 1, -1, -1):
        candidate = '.'.join(parts[:cut])
        if candidate in failed:
            return candidate
    return None
