# Copyright (c) mmtune contributors. All rights reserved.
"""Conv->BN pairs of a frame that torch.fx cannot trace, read from its
source code.

Some forwards cannot be traced symbolically: ``batch, c = x.shape[:2]``
iterates over a traced value, ``len(x)`` needs a real list (mmdet's ResNeSt
split attention, HRNet stems, DenseNet layers). Their pairs can still be
proved from the forward's source, for two forms in which the conv's output
cannot reach anything but the BN:

- ``self.bn(self.conv(...))``: the conv output is a temporary that only the
  BN call receives;
- two consecutive statements ``x = self.conv(...)`` and ``x = self.bn(x)``
  (the same local name, the second statement nothing but the BN call): the
  name is the only reference to the conv output, and it is rebound to the
  BN's output right away.

A pair is accepted only if the forward names its conv and its BN nowhere
else (an attribute of ``self`` that is, or holds, either module counts as
naming it: a ``ModuleList`` looped over, an alias), and the forward uses no
dynamic access that could reach them unseen (``getattr``, ``_modules``,
``children()``, ``locals()``, ``eval``, ...). Calls from any other code
(helpers, nested functions) do not fold at run time: tune mode folds a call
only when the forward's own code object called the conv, the chain this
module records (see :func:`~mmtune.rewrite.tune_mode.chain_matches`).
"""

import ast
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
    }
)


@dataclass
class SourcePairs:
    """What the source of a frame's forward shows.

    Attributes:
        pairs (list[tuple[str, str]]): ``(conv, bn)`` child names of the
            pairs proved from the source.
        callees (list[str]): Child names of every submodule the forward
            names.
        code (types.CodeType): The forward's code object: the call chain
            of every pair.
    """

    pairs: List[Tuple[str, str]] = field(default_factory=list)
    callees: List[str] = field(default_factory=list)
    code: Optional[types.CodeType] = None


def _forward_source(frame: nn.Module):
    """The forward's function and its parsed definition, or None."""
    fn = type(frame).forward
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
    if definition.decorator_list or not definition.args.args:
        return None
    return fn, definition


def _dynamic(definition: ast.FunctionDef) -> bool:
    for node in ast.walk(definition):
        if isinstance(node, ast.Name) and node.id in _DYNAMIC_NAMES:
            return True
        if isinstance(node, ast.Attribute) and node.attr in _DYNAMIC_ATTRS:
            return True
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            return True
    return False


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
    for node in ast.walk(definition):
        for name in ('body', 'orelse', 'finalbody'):
            statements = getattr(node, name, None)
            if isinstance(statements, list) and statements:
                if isinstance(statements[0], ast.stmt):
                    yield statements
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                yield handler.body


def _patterns(definition: ast.FunctionDef, self_name: str):
    """``(conv attr, bn attr, conv attribute node, bn attribute node)`` of
    every occurrence of the two forms."""
    found = []
    for node in ast.walk(definition):  # self.bn(self.conv(...))
        bn = _bn_call_of(node, self_name)
        if bn is None:
            continue
        conv_attr = _called_attr(bn[1], self_name)
        if conv_attr is not None:
            found.append((conv_attr, bn[0], bn[1].func, node.func))
    for statements in _statement_lists(definition):
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


def find_source_pairs(frame: nn.Module) -> Optional[SourcePairs]:
    """The pairs that the source of ``frame``'s forward proves (see the
    module docstring), or None when the source cannot be read or uses
    dynamic access."""
    parsed = _forward_source(frame)
    if parsed is None:
        return None
    fn, definition = parsed
    if _dynamic(definition):
        return None
    self_name = definition.args.args[0].arg
    child_name = {id(m): n for n, m in frame._modules.items() if m is not None}
    # id(conv or BN child) -> the attribute nodes that name it (or a module
    # holding it)
    naming: Dict[int, List[ast.AST]] = {}
    callees: Set[str] = set()
    for node in ast.walk(definition):
        attr = _self_attr(node, self_name)
        if attr is None:
            continue
        module = _resolve(frame, attr)
        if module is None:
            continue
        if id(module) in child_name:
            callees.add(child_name[id(module)])
        for inner in module.modules():
            if id(inner) in child_name and isinstance(
                inner, (_ConvNd, _BatchNorm)
            ):
                naming.setdefault(id(inner), []).append(node)
    result = SourcePairs(callees=sorted(callees), code=fn.__code__)
    seen: Set[str] = set()
    for conv_attr, bn_attr, conv_node, bn_node in _patterns(
        definition, self_name
    ):
        conv, bn = _resolve(frame, conv_attr), _resolve(frame, bn_attr)
        if not (
            isinstance(conv, _ConvNd)
            and isinstance(bn, _BatchNorm)
            and id(conv) in child_name
            and id(bn) in child_name
        ):
            continue
        if naming.get(id(conv)) != [conv_node] or naming.get(id(bn)) != [
            bn_node
        ]:
            continue  # named elsewhere in the forward too
        pair = (child_name[id(conv)], child_name[id(bn)])
        if pair[1] not in seen:
            seen.add(pair[1])
            result.pairs.append(pair)
    return result
