# Copyright (c) mmtune contributors. All rights reserved.
"""Tune-mode coverage of real models of mmdet, mmseg, mmpretrain and
mmpose, built from each codebase's own installed configs.

    python tools/analysis_tools/sweep_conv_bn_coverage.py
    python tools/analysis_tools/sweep_conv_bn_coverage.py --codebase mmseg
    python tools/analysis_tools/sweep_conv_bn_coverage.py --out sweep.md

For one model per BN backbone family (``mmtune.testing.CODEBASE_MODELS``):
the model is built with ``init_cfg=None`` everywhere, random non-trivial
BN statistics, in float64 on the CPU and in eval mode; the Conv->BN pairs
that a forward really computes (a BN receiving exactly a conv's output)
are the oracle; tune mode is turned on for the whole model
(``mmtune.turn_on_fast_conv_bn_eval``) and one forward of every head runs
(``mmtune.testing.tensor_forward``). One markdown table per codebase:
oracle pairs; pairs converted; oracle pairs missed, with the report's skip
reasons that name their modules; converted pairs that folded at every call
of that forward (``report.fold_counts()``); the other skip reasons; the
largest absolute difference of the outputs from eval mode. Reasons are
grouped, with module names replaced by their class names. A model that
cannot be built or run gets a row that says why. Exit status 1 when a
model failed, an oracle pair was missed, a converted pair did not fold at
every call or an output differs by more than ``--rtol`` (relative to the
largest output magnitude, at least 1). With ``--out`` the tables go to
that file alone and what the codebases log stays on the terminal.
"""

import argparse
import importlib.util
import sys
import time
import traceback

import torch

from mmtune.testing import (
    CODEBASE_MODELS,
    CODEBASES,
    build_codebase_model,
    import_without_torchvision,
    randomize_bn,
    tensor_forward,
    tune_mode_coverage,
)

HEADER = (
    '| model (config) | oracle pairs | converted | missed (skips naming '
    'them) | folded at every call | other skips | max abs diff (of max abs '
    'output) | s |\n'
    '| --- | --- | --- | --- | --- | --- | --- | --- |'
)


def _cell(text: str) -> str:
    return text.replace('|', '\\|').replace('\n', ' ')


def _reasons(counter) -> str:
    return '; '.join(f'{n}x {why}' for why, n in sorted(counter.items()))


def _error(exc: BaseException) -> str:
    line = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return line[:300]


def sweep_model(codebase, name, spec, rtol):
    """One table row for one model, and whether it is all right."""
    if spec[0] is None:
        return (
            f'| {name} | - | - | - | - | not built: {spec[1]} | - | - |',
            True,
        )
    config, size, overrides = spec
    label = f'{name} (`{config.rsplit("/", 1)[-1]}`)'
    start = time.perf_counter()
    try:
        model = build_codebase_model(codebase, config, overrides)
    except Exception as exc:  # a row, never a crash
        row = f'| {label} | - | - | - | - | not built: {_cell(_error(exc))} '
        return row + '| - | - |', False
    try:
        randomize_bn(model)
        model = model.double()
        x = torch.randn(1, 3, *size, dtype=torch.float64)
        found = tune_mode_coverage(model, [x], tensor_forward(codebase))
    except Exception as exc:
        seconds = time.perf_counter() - start
        row = f'| {label} | - | - | - | - | failed: {_cell(_error(exc))} '
        return row + f'| - | {seconds:.1f} |', False
    seconds = time.perf_counter() - start
    report = found['report']
    called = len(report.converted) - len(found['not_called'])
    folded = f'{len(found["always_folded"])} of {called} called'
    if found['not_called']:
        folded += f' ({len(found["not_called"])} not called)'
    for (conv, bn), count in found['partly_folded'].items():
        why = ', '.join(f'{n}x {r}' for r, n in sorted(count.computed.items()))
        folded += f'; {conv} -> {bn}: {count.folded} of {count.calls} ({why})'
    missed = str(len(found['missed']))
    if found['missed']:
        why = _reasons(found['missed_reasons']) or 'no skip record names them'
        missed += f': {why}'
    ok = (
        not found['missed']
        and not found['partly_folded']
        and found['max_abs_diff'] <= rtol * max(found['max_abs_output'], 1.0)
    )
    return (
        f'| {label} | {len(found["oracle"])} | {len(report.converted)} '
        f'| {_cell(missed)} | {_cell(folded)} '
        f'| {_cell(_reasons(found["skip_reasons"]))} '
        f'| {found["max_abs_diff"]:.1e} (of {found["max_abs_output"]:.0e}) '
        f'| {seconds:.1f} |'
    ), ok


def sweep(codebase, rtol=1e-9, only=None, out=sys.stdout):
    """Print the table of ``codebase``; return whether every row is all
    right."""
    print(f'\n### {codebase}\n', file=out)
    try:
        _, stood_in = import_without_torchvision(f'{codebase}.models')
    except Exception as exc:
        print(f'{codebase}.models cannot be imported: {_error(exc)}', file=out)
        return False
    version = getattr(sys.modules[codebase], '__version__', '?')
    note = f'{codebase} {version}, torch {torch.__version__}'
    if stood_in:
        note += (
            '; torchvision is not installed: stand-ins for '
            f'{", ".join(stood_in)} while {codebase}.models was imported'
        )
    print(note + '\n', file=out)
    print(HEADER, file=out)
    all_ok = True
    for name, spec in CODEBASE_MODELS[codebase].items():
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        row, ok = sweep_model(codebase, name, spec, rtol)
        all_ok &= ok
        print(row, file=out, flush=True)
    return all_ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--codebase',
        nargs='+',
        choices=CODEBASES,
        help='codebases to sweep (default: every one installed)',
    )
    parser.add_argument(
        '--only',
        nargs='+',
        help='only the models whose name contains one of these words',
    )
    parser.add_argument(
        '--rtol',
        type=float,
        default=1e-9,
        help='largest output difference accepted, relative to the largest '
        'output magnitude (at least 1) (default 1e-9)',
    )
    parser.add_argument(
        '--threads', type=int, help='torch.set_num_threads (default: torch)'
    )
    parser.add_argument(
        '--out',
        help='write the tables to this file, not to stdout (the codebases '
        'log to stdout; default: stdout)',
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    codebases = args.codebase or [
        c for c in CODEBASES if importlib.util.find_spec(c) is not None
    ]
    out = open(args.out, 'w') if args.out else sys.stdout
    ok = True
    try:
        for codebase in codebases:
            ok &= sweep(codebase, args.rtol, args.only, out)
    finally:
        if args.out:
            out.close()
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
