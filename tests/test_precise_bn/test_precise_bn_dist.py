# Copyright (c) mmtune contributors. All rights reserved.
"""Precise BN in real processes (gloo): 2 and 3 ranks with unequal data.

Runs ``tools/analysis_tools/check_precise_bn_dist.py`` under torchrun; the
script checks that every rank ends with identical statistics equal to one
process running on every rank's batches (see its docstring).
"""

import os
import os.path as osp
import re
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SCRIPT = osp.join(REPO, 'tools', 'analysis_tools', 'check_precise_bn_dist.py')


def _torchrun(nproc, *args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = os.pathsep.join(
        [REPO] + [p for p in [env.get('PYTHONPATH')] if p]
    )
    cmd = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--standalone',
        f'--nproc_per_node={nproc}',
        SCRIPT,
        *args,
    ]
    # A hang (ranks running different numbers of iterations) times out.
    return subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )


@pytest.mark.parametrize('nproc', [2, 3])
def test_gloo_ranks_agree_with_one_process(nproc):
    result = _torchrun(nproc)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    lines = result.stdout.strip().splitlines()
    reports = [line for line in lines if line.startswith('[')]
    names = [line.split(']')[0][1:] for line in reports]
    assert names == [
        'batch_size',
        'batch_sampler',
        'no_len',
        'different_layers',
    ], out
    for line in reports:
        assert line.endswith(' PASS'), line
        assert f'world_size={nproc} ' in line
    for line in reports[:3]:
        assert 'max_abs_diff_across_ranks=0 ' in line
        iters, expected = re.search(
            r'iters=(\d+) \(expected (\d+)\)', line
        ).groups()
        assert iters == expected
    assert lines[-1] == 'PASS'


def test_checker_can_fail():
    """A tolerance nothing can meet makes the script report FAIL."""
    result = _torchrun(2, '--cases', 'no_len', '--tol', '-1')
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == 'FAIL'
