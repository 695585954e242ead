# Copyright (c) mmtune contributors. All rights reserved.
"""What a rewrite did: the pairs it converted and what it left alone."""

from dataclasses import dataclass, field
from typing import List, Tuple


@dataclass(frozen=True)
class SkipRecord:
    """Something found but left alone.

    Attributes:
        modules (tuple[str]): Qualified names of the modules concerned,
            relative to the model (``''`` is the model itself).
        reason (str): Why, in plain words.
    """

    modules: Tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        names = ' -> '.join(name or '<model>' for name in self.modules)
        return f'{names}: {self.reason}'


@dataclass
class ConvBNReport:
    """The result of :func:`turn_on_fast_conv_bn_eval` or
    :func:`fuse_conv_bn`.

    Attributes:
        mode (str): ``'tune'`` or ``'deploy'``.
        converted (list[tuple[str, str]]): ``(conv_name, bn_name)`` pairs
            now in that mode, names relative to the model.
        skipped (list[SkipRecord]): What was found but left alone, and why.
        already_on (int): How many of ``converted`` were already in tune mode
            before this call (they are not converted twice).
        seconds (float): Time the analysis and rewrite took.
    """

    mode: str = 'tune'
    converted: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[SkipRecord] = field(default_factory=list)
    already_on: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        title = {
            'tune': 'tune mode (fast_conv_bn_eval)',
            'deploy': 'deploy mode (conv+BN folded)',
        }.get(self.mode, self.mode)
        lines = [
            f'mmtune {title}: {len(self.converted)} Conv+BN pairs converted'
            f', {len(self.skipped)} skipped ({self.seconds:.2f} s)'
        ]
        if self.already_on:
            lines[0] += f'; {self.already_on} were already on'
        for conv, bn in self.converted:
            lines.append(f'  converted: {conv} -> {bn}')
        for record in self.skipped:
            lines.append(f'  skipped: {record}')
        return '\n'.join(lines)

    def summary(self) -> str:
        """The first line of ``str(report)``, for one-line logs."""
        return str(self).split('\n', 1)[0]
