# Copyright (c) mmtune contributors. All rights reserved.
"""The benchmark tool with one more mode, ``tune-plain-fold``.

A developer tool: ``tune-plain-fold`` is tune mode with the batch-norm
kernel fold (used under autocast) turned off, so that every pair folds with
plain tensor operations. It measures the choice that
:class:`mmtune.rewrite.tune_mode.FoldState` makes, side by side with the
other modes. Arguments are those of ``benchmark_fast_conv_bn_eval.py``::

    python tools/analysis_tools/benchmark_fold_variants.py CONFIG \\
        --modes eval tune tune-plain-fold mmengine --amp bf16
"""

import importlib.util
import os.path as osp
import sys

import mmtune.rewrite.tune_mode as tune_mode

MODE = 'tune-plain-fold'


def _load_benchmark_tool():
    path = osp.join(osp.dirname(__file__), 'benchmark_fast_conv_bn_eval.py')
    spec = importlib.util.spec_from_file_location('benchmark_tool', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    bench = _load_benchmark_tool()
    bn_fold_applies = tune_mode._bn_fold_applies
    setup_mode, train_step = bench.setup_mode, bench.train_step

    def setup_variant(run, cfg, args, batch):
        if run.mode != MODE:
            return setup_mode(run, cfg, args, batch)
        run.mode = 'tune'
        try:
            setup_mode(run, cfg, args, batch)
        finally:
            run.mode = MODE

    def train_variant(run, seed):
        plain = run.mode == MODE
        tune_mode._bn_fold_applies = (
            (lambda *args: False) if plain else bn_fold_applies
        )
        try:
            train_step(run, seed)
        finally:
            tune_mode._bn_fold_applies = bn_fold_applies

    bench.MODES = bench.MODES + (MODE,)
    bench.setup_mode, bench.train_step = setup_variant, train_variant
    return bench.main(argv)


if __name__ == '__main__':
    sys.exit(main())
