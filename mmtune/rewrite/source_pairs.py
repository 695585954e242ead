# Copyright (c) mmtune contributors. All rights reserved.
"""Conv->BN pairs of a frame that torch.fx cannot trace, read from its
source code.

Some forwards cannot be traced symbolically: ``batch, c = x.shape[:2]``
iterates over a traced value, ``len(x)`` needs a real list (mmdet's ResNeSt
split attention, HRNet stems, DenseNet layers). Their pairs can still be
proved from the forward's source, for three forms in which the conv's
output cannot reach anything but the BN:

- ``self.bn(self.conv(...))``: the conv output is a temporary that only the
  BN call receives;
- two consecutive statements ``x = self.conv(...)`` and ``x = self.bn(x)``
  (the same local name, the second statement nothing but the BN call): the
  name is the only reference to the conv output, and it is rebound to the
  BN's output right away;
- a *helper method* that returns the conv's output, whose result the
  forward hands to the BN (DenseNet's ``bottleneck_fn``):
  ``self.bn(self.h(...))``, or ``v = self.h(...)`` followed by a statement
  that calls ``self.bn(v)`` before anything else can run (see below).

A pair is accepted only if the forward names its conv and its BN nowhere
else (an attribute of ``self`` that is, or holds, either module counts as
naming it: a ``ModuleList`` looped over, an alias; so does a string equal
to its name), and the forward uses no dynamic access that could reach them
unseen (``getattr``, ``attrgetter``, ``_modules``, ``children()``,
``locals()``, ``eval``, ...), rebinds no ``self``, and is no generator or
coroutine. One ``getattr`` is not dynamic: ``getattr(self, f'stage{i}')``,
an f-string that begins with a constant prefix, on a frame that looks
attributes up as ``nn.Module`` does, whose class has no attribute and whose
instance ``__dict__`` nothing but plain data beginning with that prefix
(HRNet's stages and transitions): it names every child whose name begins
with the prefix.

A helper ``h`` is a plain function of the frame's class
(``inspect.getattr_static(type(frame), 'h')`` is a ``types.FunctionType``:
no staticmethod, classmethod or property, no ``__wrapped__``, no decorator
in its source), not shadowed on the instance, not ``forward`` itself, with
readable source and the same checks as the forward. Its one ``return``
statement, which is not inside a ``try`` or ``with`` (whose exit code would
run after the conv), returns ``self.conv(...)``, or a local name whose only
store is ``name = self.conv(...)`` right before that ``return`` and whose
only load is the return. The helper names the conv exactly there and the BN
nowhere; the forward names the conv nowhere, the helper exactly once (an
attribute ``.h`` anywhere, an alias of the same code or a string ``'h'``
count), as ``self.bn(self.h(...))`` or as the whole right-hand side of
``v = self.h(...)``. In the second case the statement that runs next (the
next one, or the one after the ``if`` whose branch the assignment ends) must
call ``self.bn(v)`` before anything else: it is ``self.bn(v)``, or that
call is the first argument of calls of plain child modules (``y =
self.conv2(self.act(self.bn(v)))``), whose lookups run no code; ``self.bn``
is then a plain child too. Every load of ``v`` in the forward is that one
argument; every store is a plain ``v = ...``; ``v`` appears in no nested
function, lambda or comprehension, and neither statement is in a loop: the
BN runs at most once per call, right after the helper returned, so it
receives the conv's output while tune mode still holds it as pending.
Other assignments to ``v`` (another branch) reach only the BN, which then
computes as in eval mode.

Calls from any other code do not fold at run time: tune mode folds a call
only when it comes through the chain this module records for the pair, the
forward's own code object, or the helper's then the forward's (see
:func:`~mmtune.rewrite.tune_mode.chain_matches`). A helper reached another
way (through ``torch.utils.checkpoint``, a closure) computes as eval mode.
"""

import ast
import builtins
import functools
import inspect
import textwrap
import types
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

#: Names whose use in a forward could reach a submodule unseen.
_DYNAMIC_NAMES = frozenset(
    {
        'getattr',
        'setattr',
        'delattr',
        'locals',
        'vars',
        'globals',
        'eval',
        'exec',
        'compile',
        '__import__',
        'attrgetter',
        'methodcaller',
    }
)
#: Attributes whose use could reach a submodule unseen.
_DYNAMIC_ATTRS = frozenset(
    {
        '_modules',
        '__dict__',
        'children',
        'named_children',
        'modules',
        'named_modules',
        'get_submodule',
        'apply',
        'attrgetter',
        'methodcaller',
        '__getattr__',
        '__getattribute__',
    }
)
#: Nodes that open a scope of their own.
_SCOPES = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.Lambda,
    ast.ClassDef,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
)
_LOOPS = (ast.For, ast.AsyncFor, ast.While)
#: Statements whose exit runs code after their body.
_EXITS = (ast.Try, ast.With, ast.AsyncWith) + (
    (ast.TryStar,) if hasattr(ast, 'TryStar') else ()
)


@dataclass
class SourcePairs:
    """What the source of a frame's forward shows.

    Attributes:
        pairs (list[tuple[str, str]]): ``(conv, bn)`` child names of the
            pairs proved from the source.
        callees (list[str]): Child names of every submodule the forward
            names, or a helper of a pair names.
        code (types.CodeType): The forward's code object.
        chains (dict[str, tuple]): Conv child name -> the call chain of
            its pair: ``(forward code,)``, or ``(helper code, forward
            code)``.
    """

    pairs: List[Tuple[str, str]] = field(default_factory=list)
    callees: List[str] = field(default_factory=list)
    code: Optional[types.CodeType] = None
    chains: Dict[str, Tuple[types.CodeType, ...]] = field(default_factory=dict)


def _parse(fn) -> Optional[ast.FunctionDef]:
    """The parsed definition of the plain function ``fn``, or None."""
    if not isinstance(fn, types.FunctionType) or hasattr(fn, '__wrapped__'):
        return None
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return None
    if not tree.body or not isinstance(tree.body[0], ast.FunctionDef):
        return None
    definition = tree.body[0]
    if definition.decorator_list or definition.name != fn.__name__:
        return None
    if not (definition.args.posonlyargs or definition.args.args):
        return None
    return definition


def _self_name(definition: ast.FunctionDef) -> str:
    return (definition.args.posonlyargs + definition.args.args)[0].arg


def _dynamic(definition: ast.FunctionDef, allowed=frozenset()) -> bool:
    """Whether the function uses dynamic access (``allowed``: ids of the
    ``getattr`` names of :func:`_prefixed_getattrs` found safe)."""
    for node in ast.walk(definition):
        if (
            isinstance(node, ast.Name)
            and node.id in _DYNAMIC_NAMES
            and id(node) not in allowed
        ):
            return True
        if isinstance(node, ast.Attribute) and node.attr in _DYNAMIC_ATTRS:
            return True
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            return True
    return False


def _inert(value, depth: int = 4) -> bool:
    """Whether ``value`` is plain data that reaches no module and runs no
    code: None, numbers, strings, and lists, tuples, sets and dicts of
    them (``depth`` levels)."""
    if value is None or type(value) in (bool, int, float, str, bytes):
        return True
    if (
        depth
        and isinstance(value, (list, tuple, set, frozenset, dict))
        and not callable(value)
    ):
        items = (
            list(value.keys()) + list(value.values())
            if isinstance(value, dict)
            else value
        )
        return all(_inert(v, depth - 1) for v in items)
    return False


def _prefixed_getattrs(
    frame: nn.Module, definition: ast.FunctionDef
) -> List[Tuple[ast.Call, List[nn.Module]]]:
    """The calls ``getattr(self, f'prefix{...}')`` (HRNet's
    ``getattr(self, f'stage{i}')``) that can reach nothing but children of
    ``frame`` whose names begin with ``prefix``, each with those children:
    ``frame`` looks attributes up as ``nn.Module`` does, its class
    (methods, properties, class attributes) has no name beginning with
    ``prefix``, and its instance ``__dict__`` has none but plain data
    (HRNet's ``stage1_cfg``: numbers, strings, containers of them). Any
    other ``getattr`` stays dynamic access."""
    cls = type(frame)
    if (
        inspect.getattr_static(cls, '__getattr__', None)
        is not nn.Module.__getattr__
        or inspect.getattr_static(cls, '__getattribute__', None)
        is not object.__getattribute__
    ):
        return []
    self_name = _self_name(definition)
    found = []
    for node in ast.walk(definition):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == 'getattr'
            and len(node.args) == 2
            and not node.keywords
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id == self_name
            and isinstance(node.args[1], ast.JoinedStr)
            and node.args[1].values
            and isinstance(node.args[1].values[0], ast.Constant)
            and isinstance(node.args[1].values[0].value, str)
            and node.args[1].values[0].value
        ):
            continue
        prefix = node.args[1].values[0].value
        if any(n.startswith(prefix) for n in dir(cls)) or any(
            n.startswith(prefix) and not _inert(v)
            for n, v in frame.__dict__.items()
        ):
            continue
        targets = [
            m
            for n, m in frame._modules.items()
            if n.startswith(prefix) and m is not None
        ]
        found.append((node, targets))
    return found


def _parse_safe(frame: nn.Module, fn):
    """``(definition, safe prefixed getattrs)`` of ``frame``'s function
    ``fn`` when its source can be read and it is not :func:`_unsafe`, or
    None."""
    definition = _parse(fn)
    if definition is None:
        return None
    prefixed = _prefixed_getattrs(frame, definition)
    if _unsafe(definition, prefixed):
        return None
    return definition, prefixed


def _unsafe(definition: ast.FunctionDef, prefixed=()) -> bool:
    """Whether the function uses dynamic access (other than the safe
    ``prefixed`` getattrs), rebinds or shadows its ``self``, or is a
    generator (or coroutine)."""
    if _dynamic(definition, {id(call.func) for call, _ in prefixed}):
        return True
    self_name = _self_name(definition)
    first = (definition.args.posonlyargs + definition.args.args)[0]
    for node in ast.walk(definition):
        if isinstance(node, (ast.Yield, ast.YieldFrom, ast.Await)):
            return True
        if isinstance(node, ast.Name) and node.id == self_name:
            if not isinstance(node.ctx, ast.Load):
                return True
        elif isinstance(node, ast.arg) and node.arg == self_name:
            if node is not first:
                return True
        elif isinstance(node, ast.ExceptHandler) and node.name == self_name:
            return True
        elif isinstance(node, ast.alias) and self_name in (
            node.name,
            node.asname,
        ):
            return True
        elif (
            isinstance(node, (ast.FunctionDef, ast.ClassDef))
            and node is not definition
            and node.name == self_name
        ):
            return True
    return False


def _strings(definition: ast.FunctionDef) -> Set[str]:
    return {
        node.value
        for node in ast.walk(definition)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def _parents(definition: ast.FunctionDef) -> Dict[int, ast.AST]:
    """id(node) -> its parent node."""
    return {
        id(child): node
        for node in ast.walk(definition)
        for child in ast.iter_child_nodes(node)
    }


def _self_attr(node, self_name: str) -> Optional[str]:
    """``X`` if ``node`` is ``self.X``."""
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == self_name
    ):
        return node.attr
    return None


def _resolve(frame: nn.Module, attr: str) -> Optional[nn.Module]:
    """The module ``frame.<attr>`` gives: a registered child, or a
    property's value; None for anything else."""
    child = frame._modules.get(attr)
    if child is not None:
        return child
    if isinstance(inspect.getattr_static(type(frame), attr, None), property):
        try:
            value = getattr(frame, attr)
        except Exception:  # noqa: BLE001 (a property that fails: no module)
            return None
        return value if isinstance(value, nn.Module) else None
    return None


_MISSING = object()


def _plain_child(frame: nn.Module, attr: Optional[str]) -> bool:
    """Whether looking up ``frame.<attr>`` gives a registered child by
    ``nn.Module.__getattr__``, running no other code."""
    cls = type(frame)
    return (
        attr is not None
        and frame._modules.get(attr) is not None
        and attr not in frame.__dict__
        and inspect.getattr_static(cls, attr, _MISSING) is _MISSING
        and inspect.getattr_static(cls, '__getattr__', None)
        is nn.Module.__getattr__
        and inspect.getattr_static(cls, '__getattribute__', None)
        is object.__getattribute__
    )


def _called_attr(node, self_name: str) -> Optional[str]:
    """``X`` if ``node`` is a call ``self.X(...)``."""
    if isinstance(node, ast.Call):
        return _self_attr(node.func, self_name)
    return None


def _bn_call_of(node, self_name: str) -> Optional[Tuple[str, ast.AST]]:
    """``(X, arg)`` if ``node`` is ``self.X(arg)``: one positional
    argument, nothing else."""
    attr = _called_attr(node, self_name)
    if attr is None or node.keywords or len(node.args) != 1:
        return None
    if isinstance(node.args[0], ast.Starred):
        return None
    return attr, node.args[0]


def _statement_lists(definition: ast.FunctionDef):
    """``(owner, statements)`` of every statement list."""
    for node in ast.walk(definition):
        for name in ('body', 'orelse', 'finalbody'):
            statements = getattr(node, name, None)
            if isinstance(statements, list) and statements:
                if isinstance(statements[0], ast.stmt):
                    yield node, statements
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                yield handler, handler.body


def _naming(
    frame: nn.Module, definition: ast.FunctionDef, prefixed=()
) -> Tuple[Dict[int, List[ast.AST]], Set[str]]:
    """``(naming, callees)``: id(conv or BN child) -> the attribute nodes
    of ``definition`` that name it (or a module holding it), and the
    ``prefixed`` getattr calls that can reach it; the child names of the
    modules it names."""
    self_name = _self_name(definition)
    child_name = {id(m): n for n, m in frame._modules.items() if m is not None}
    naming: Dict[int, List[ast.AST]] = {}
    callees: Set[str] = set()
    named = []
    for node in ast.walk(definition):
        attr = _self_attr(node, self_name)
        module = None if attr is None else _resolve(frame, attr)
        if module is not None:
            named.append((node, module))
    named += [(call, m) for call, targets in prefixed for m in targets]
    for node, module in named:
        if id(module) in child_name:
            callees.add(child_name[id(module)])
        for inner in module.modules():
            if id(inner) in child_name and isinstance(
                inner, (_ConvNd, _BatchNorm)
            ):
                naming.setdefault(id(inner), []).append(node)
    return naming, callees


def _patterns(definition: ast.FunctionDef, self_name: str):
    """``(conv attr, bn attr, conv attribute node, bn attribute node)`` of
    every occurrence of the first two forms."""
    found = []
    for node in ast.walk(definition):  # self.bn(self.conv(...))
        bn = _bn_call_of(node, self_name)
        if bn is None:
            continue
        conv_attr = _called_attr(bn[1], self_name)
        if conv_attr is not None:
            found.append((conv_attr, bn[0], bn[1].func, node.func))
    for _, statements in _statement_lists(definition):
        for first, second in zip(statements, statements[1:]):
            if not (
                isinstance(first, ast.Assign)
                and isinstance(second, ast.Assign)
                and len(first.targets) == 1
                and len(second.targets) == 1
                and isinstance(first.targets[0], ast.Name)
                and isinstance(second.targets[0], ast.Name)
                and first.targets[0].id == second.targets[0].id
            ):
                continue
            name = first.targets[0].id
            conv_attr = _called_attr(first.value, self_name)
            bn = _bn_call_of(second.value, self_name)
            if (
                conv_attr is None
                or bn is None
                or not isinstance(bn[1], ast.Name)
                or bn[1].id != name
            ):
                continue
            found.append(
                (conv_attr, bn[0], first.value.func, second.value.func)
            )
    return found


@dataclass
class _Helper:
    """A helper method that returns a conv's output."""

    attr: str
    fn: types.FunctionType
    definition: ast.FunctionDef
    conv_attr: str
    conv_node: ast.AST  # the ``self.conv`` attribute node of its call
    naming: Dict[int, List[ast.AST]]
    callees: Set[str]


def _inside(node, parents: Dict[int, ast.AST], definition, kinds) -> bool:
    """Whether ``node`` is inside a node of ``kinds`` within
    ``definition``."""
    parent = parents.get(id(node))
    while parent is not None and parent is not definition:
        if isinstance(parent, kinds):
            return True
        parent = parents.get(id(parent))
    return False


def _helper_function(
    frame: nn.Module, attr: str, forward
) -> Optional[types.FunctionType]:
    """The plain function of the frame's class that ``frame.<attr>``
    binds, or None."""
    cls = type(frame)
    if (
        attr in frame.__dict__
        or attr in frame._modules
        or attr in frame._parameters
        or attr in frame._buffers
        or inspect.getattr_static(cls, '__getattribute__', None)
        is not object.__getattribute__
    ):
        return None
    fn = inspect.getattr_static(cls, attr, None)
    if not isinstance(fn, types.FunctionType) or fn is forward:
        return None
    return fn


def _returned_name_call(definition, parents, ret) -> Optional[ast.AST]:
    """The value of ``name = <value>`` if ``ret`` is ``return name``, right
    after that statement, and ``name`` is stored and loaded nowhere
    else."""
    name = ret.value.id
    params = {n.arg for n in ast.walk(definition) if isinstance(n, ast.arg)}
    named = [
        n
        for n in ast.walk(definition)
        if isinstance(n, ast.Name) and n.id == name
    ]
    stores = [n for n in named if not isinstance(n.ctx, ast.Load)]
    if name in params or len(named) != 2 or len(stores) != 1:
        return None
    assign = parents.get(id(stores[0]))
    if not (
        isinstance(assign, ast.Assign)
        and len(assign.targets) == 1
        and assign.targets[0] is stores[0]
    ):
        return None
    for _, statements in _statement_lists(definition):
        for first, second in zip(statements, statements[1:]):
            if first is assign and second is ret:
                return assign.value
    return None


def _helper(frame: nn.Module, attr: str, forward) -> Optional[_Helper]:
    """The helper ``frame.<attr>`` if it returns a conv's output and
    nothing else (see the module docstring), or None."""
    fn = _helper_function(frame, attr, forward)
    checked = None if fn is None else _parse_safe(frame, fn)
    if checked is None:
        return None
    definition, prefixed = checked
    parents = _parents(definition)
    returns = [n for n in ast.walk(definition) if isinstance(n, ast.Return)]
    if len(returns) != 1 or returns[0].value is None:
        return None
    ret = returns[0]
    if _inside(ret, parents, definition, _SCOPES + _EXITS):
        return None  # another function's return, or code runs after it
    call = ret.value
    if isinstance(call, ast.Name):
        call = _returned_name_call(definition, parents, ret)
    conv_attr = _called_attr(call, _self_name(definition))
    if conv_attr is None:
        return None
    naming, callees = _naming(frame, definition, prefixed)
    return _Helper(attr, fn, definition, conv_attr, call.func, naming, callees)


def _code_of(obj) -> Optional[types.CodeType]:
    """The code object that calling ``obj`` runs, when it is a function,
    or a method, staticmethod, classmethod or partial of one."""
    for _ in range(4):
        if isinstance(obj, types.FunctionType):
            return obj.__code__
        if isinstance(obj, (types.MethodType, staticmethod, classmethod)):
            obj = obj.__func__
        elif isinstance(obj, functools.partial):
            obj = obj.func
        else:
            return None
    return None


def _references(
    frame: nn.Module, forward, definition, helper: _Helper
) -> List[ast.AST]:
    """The nodes of the forward that may reach the helper's code: every
    attribute ``.<helper name>``, and every name, ``self.X`` or ``G.X`` (of
    a global or closure variable ``G``) whose value runs the same code."""
    code = helper.fn.__code__
    self_name = _self_name(definition)
    scope = dict(vars(builtins))
    scope.update(forward.__globals__)
    for name, cell in zip(
        forward.__code__.co_freevars, forward.__closure__ or ()
    ):
        try:
            scope[name] = cell.cell_contents
        except ValueError:  # an empty cell
            pass
    found = []
    for node in ast.walk(definition):
        if isinstance(node, ast.Attribute):
            if node.attr == helper.attr:
                found.append(node)
                continue
            base, owner = node.value, None
            if isinstance(base, ast.Name):
                if base.id == self_name:
                    owner = type(frame)
                elif base.id in scope:
                    owner = scope[base.id]
            if owner is not None:
                try:
                    value = inspect.getattr_static(owner, node.attr, None)
                except Exception:  # noqa: BLE001 (cannot tell: it may)
                    found.append(node)
                    continue
                if _code_of(value) is code:
                    found.append(node)
        elif isinstance(node, ast.Name) and node.id in scope:
            if _code_of(scope[node.id]) is code:
                found.append(node)
    return found


def _successor(stmt, definition, positions) -> Optional[ast.stmt]:
    """The statement that runs right after ``stmt`` completes: the next
    one in its list, or, at the end of a branch of an ``if``, the one after
    the ``if``; None in any other case (a loop, ``try`` or ``with`` runs
    code in between; the end of the function)."""
    while True:
        position = positions.get(id(stmt))
        if position is None:
            return None
        owner, statements, index = position
        if index + 1 < len(statements):
            return statements[index + 1]
        if not isinstance(owner, ast.If):
            return None
        stmt = owner


def _bn_right_after(
    frame: nn.Module, definition, parents, assign: ast.Assign
) -> Optional[Tuple[str, ast.AST]]:
    """``(bn attr, bn attribute node)`` if the statement that runs right
    after ``v = self.h(...)`` calls ``self.bn(v)`` before anything else, and
    ``v`` reaches nothing else (see the module docstring)."""
    self_name = _self_name(definition)
    name = assign.targets[0].id
    positions = {
        id(stmt): (owner, statements, index)
        for owner, statements in _statement_lists(definition)
        for index, stmt in enumerate(statements)
    }
    after = _successor(assign, definition, positions)
    if (
        not isinstance(after, (ast.Assign, ast.Expr, ast.Return))
        or after.value is None
        or _inside(assign, parents, definition, _LOOPS + _SCOPES)
        or _inside(after, parents, definition, _LOOPS + _SCOPES)
    ):
        return None
    expr = after.value  # the first call evaluated must be the BN's
    while True:
        bn = _bn_call_of(expr, self_name)
        if bn is not None and isinstance(bn[1], ast.Name):
            if bn[1].id == name and _plain_child(frame, bn[0]):
                break
        if not (
            isinstance(expr, ast.Call)
            and _plain_child(frame, _self_attr(expr.func, self_name))
            and expr.args
            and not isinstance(expr.args[0], ast.Starred)
        ):
            return None
        expr = expr.args[0]
    for node in ast.walk(definition):
        if not (isinstance(node, ast.Name) and node.id == name):
            continue
        if isinstance(node.ctx, ast.Load):
            if node is not bn[1]:
                return None  # the value reaches something else
        elif isinstance(node.ctx, ast.Store):
            target_of = parents.get(id(node))
            if not (
                isinstance(target_of, ast.Assign)
                and len(target_of.targets) == 1
                and target_of.targets[0] is node
            ):
                return None
        else:
            return None  # del
        if _inside(node, parents, definition, _SCOPES):
            return None
    return bn[0], expr.func


def _helper_patterns(frame: nn.Module, forward, definition):
    """``(helper, bn attr, bn attribute node)`` of every occurrence of the
    helper form."""
    self_name = _self_name(definition)
    parents = _parents(definition)
    for node in ast.walk(definition):
        attr = _called_attr(node, self_name)
        if attr is None or _resolve(frame, attr) is not None:
            continue
        helper = _helper(frame, attr, forward)
        if helper is None:
            continue
        if _references(frame, forward, definition, helper) != [node.func]:
            continue  # named, or reachable, more than once
        parent = parents.get(id(node))
        bn = _bn_call_of(parent, self_name)
        if bn is not None and bn[1] is node:  # self.bn(self.h(...))
            yield helper, bn[0], parent.func
        elif (
            isinstance(parent, ast.Assign)
            and parent.value is node
            and len(parent.targets) == 1
            and isinstance(parent.targets[0], ast.Name)
        ):  # v = self.h(...)
            found = _bn_right_after(frame, definition, parents, parent)
            if found is not None:
                yield (helper,) + found


def find_source_pairs(frame: nn.Module) -> Optional[SourcePairs]:
    """The pairs that the source of ``frame``'s forward proves (see the
    module docstring), or None when the source cannot be read or uses
    dynamic access."""
    fn = type(frame).forward
    checked = _parse_safe(frame, fn)
    if checked is None:
        return None
    definition, prefixed = checked
    self_name = _self_name(definition)
    child_name = {id(m): n for n, m in frame._modules.items() if m is not None}
    naming, callees = _naming(frame, definition, prefixed)
    strings = _strings(definition)
    # ((conv, bn) modules, their attributes, chain, helper or None)
    candidates = []
    for conv_attr, bn_attr, conv_node, bn_node in _patterns(
        definition, self_name
    ):
        conv, bn = _resolve(frame, conv_attr), _resolve(frame, bn_attr)
        if naming.get(id(conv)) == [conv_node] and naming.get(id(bn)) == [
            bn_node
        ]:
            candidates.append(
                (conv, bn, {conv_attr, bn_attr}, (fn.__code__,), None)
            )
    for helper, bn_attr, bn_node in _helper_patterns(frame, fn, definition):
        conv, bn = _resolve(frame, helper.conv_attr), _resolve(frame, bn_attr)
        if (
            id(conv) not in naming
            and naming.get(id(bn)) == [bn_node]
            and helper.naming.get(id(conv)) == [helper.conv_node]
            and id(bn) not in helper.naming
        ):
            candidates.append(
                (
                    conv,
                    bn,
                    {helper.conv_attr, bn_attr, helper.attr},
                    (helper.fn.__code__, fn.__code__),
                    helper,
                )
            )
    result = SourcePairs(code=fn.__code__)
    for conv, bn, attrs, chain, helper in candidates:
        if not (
            isinstance(conv, _ConvNd)
            and isinstance(bn, _BatchNorm)
            and id(conv) in child_name
            and id(bn) in child_name
        ):
            continue
        pair = (child_name[id(conv)], child_name[id(bn)])
        seen = strings | (_strings(helper.definition) if helper else set())
        if seen & (attrs | set(pair)):
            continue  # a string could name a module: getattr's kin
        if any(pair[0] == p[0] or pair[1] == p[1] for p in result.pairs):
            continue
        result.pairs.append(pair)
        result.chains[pair[0]] = chain
        if helper is not None:
            callees |= helper.callees
    result.callees = sorted(callees)
    return result
