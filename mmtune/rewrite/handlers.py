# Copyright (c) mmtune contributors. All rights reserved.
"""Frame handlers: module types whose forward mmtune replaces as a whole
instead of tracing it (mmcv ``ConvModule``, whose graph depends on per-call
arguments). The handler's forward decides per call whether the conv may
fold and arms the pair's :class:`~mmtune.rewrite.tune_mode.TunePair` for
that call; the conv and the BN are then called as modules, as the original
forward calls them, so their hooks run and their checks are the same as
for a traced frame.

The rewrite layer knows no such type itself. The engine layer registers its
handlers; they are loaded the first time a model is analysed after the
library that defines the type has been imported, so ``import mmtune`` stays
free of mmcv.
"""

import importlib
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from torch import nn


@dataclass
class HandledFrame:
    """What a handler found in one module.

    Attributes:
        pair (tuple[str, str], optional): Local ``(conv, bn)`` names of the
            pair it can take over, or None.
        callees (Sequence[str]): Local names of the submodules its forward
            calls (for the several-call-sites check).
        reason (str, optional): Why there is no pair, when it is worth
            reporting.
    """

    pair: Optional[Tuple[str, str]]
    callees: Sequence[str]
    reason: Optional[str] = None


class FrameHandler:
    """Interface of a frame handler."""

    def matches(self, module: nn.Module) -> bool:
        """Whether this handler owns ``module``."""
        raise NotImplementedError

    def find_pair(self, module: nn.Module) -> HandledFrame:
        """The pair ``module`` computes, if it can be taken over."""
        raise NotImplementedError

    def turn_on(self, module: nn.Module) -> bool:
        """Put ``module`` in tune mode; False if it already was."""
        raise NotImplementedError

    def turn_off(self, module: nn.Module) -> bool:
        """Undo :meth:`turn_on`; False if it was not on."""
        raise NotImplementedError

    def attach(self, module: nn.Module, runtime) -> None:
        """Give the module's tune-mode forward the pair's
        :class:`~mmtune.rewrite.tune_mode.TunePair`, whose ``armed`` flag
        it sets around each conv call that may fold."""
        raise NotImplementedError


_HANDLERS: List[FrameHandler] = []
#: (library that must be imported, module that registers its frame handler
#: or its foldable conv types)
_PROVIDERS = [
    ('mmcv', 'mmtune.engine.conv_module'),
    ('mmcv', 'mmtune.engine.mmcv_convs'),
]


def register_frame_handler(handler: FrameHandler) -> FrameHandler:
    """Add a handler; later registrations are consulted first."""
    _HANDLERS.insert(0, handler)
    return handler


def _load_providers() -> None:
    for library, provider in list(_PROVIDERS):
        if library in sys.modules:
            _PROVIDERS.remove((library, provider))
            importlib.import_module(provider)


def get_frame_handler(module: nn.Module) -> Optional[FrameHandler]:
    """The handler that owns ``module``, if any."""
    if _PROVIDERS:
        _load_providers()
    for handler in _HANDLERS:
        if handler.matches(module):
            return handler
    return None
