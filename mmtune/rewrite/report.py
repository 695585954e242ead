# Copyright (c) mmtune contributors. All rights reserved.
"""What a rewrite did: the pairs it converted and what it left alone."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple


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
        runtimes (dict): The run-time object of each converted pair in
            tune mode, by ``(conv_name, bn_name)``, whose counters
            :meth:`fold_counts` reads.
    """

    mode: str = 'tune'
    converted: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[SkipRecord] = field(default_factory=list)
    already_on: int = 0
    seconds: float = 0.0
    runtimes: Dict[Tuple[str, str], Any] = field(
        default_factory=dict, repr=False
    )

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

    def fold_counts(self) -> Dict[Tuple[str, str], 'FoldCount']:
        """For each converted pair, how its calls went since turn-on (or
        :meth:`reset_counts`)."""
        return {
            pair: FoldCount(*runtime.counts())
            for pair, runtime in self.runtimes.items()
        }

    def reset_counts(self) -> None:
        """Start counting anew."""
        for runtime in self.runtimes.values():
            runtime.reset_counts()

    def never_folded(self) -> List[Tuple[str, str]]:
        """Converted pairs that were called and never folded."""
        return [
            pair
            for pair, count in self.fold_counts().items()
            if count.calls and not count.folded
        ]

    def runtime_summary(self) -> str:
        """One line (then one per pair that did not always fold) on how the
        converted pairs' calls went, e.g. ``53 of 53 converted pairs folded
        at every call``."""
        counts = self.fold_counts()
        called = {p: c for p, c in counts.items() if c.calls}
        always = [p for p, c in called.items() if not c.computed]
        line = (
            f'mmtune tune mode: {len(always)} of {len(counts)} converted '
            'pairs folded at every call'
        )
        if len(called) < len(counts):
            line += f'; {len(counts) - len(called)} were not called'
        lines = [line]
        for (conv, bn), count in called.items():
            if count.computed:
                reasons = '; '.join(
                    f'{n}: {why}' for why, n in sorted(count.computed.items())
                )
                lines.append(
                    f'  {conv} -> {bn}: folded {count.folded} of '
                    f'{count.calls} calls, computed as the modules do '
                    f'{sum(count.computed.values())} ({reasons})'
                )
        return '\n'.join(lines)


@dataclass(frozen=True)
class FoldCount:
    """How the calls of one converted pair went.

    Attributes:
        folded (int): Calls that folded.
        computed (dict[str, int]): Calls computed by the modules' own
            forwards, by reason.
    """

    folded: int
    computed: Dict[str, int]

    @property
    def calls(self) -> int:
        return self.folded + sum(self.computed.values())
