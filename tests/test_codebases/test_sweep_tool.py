# Copyright (c) mmtune contributors. All rights reserved.
"""``tools/analysis_tools/sweep_conv_bn_coverage.py``: its table, and rows
instead of crashes for models that cannot be built or run."""

import importlib.util
import io
import os
import os.path as osp

import pytest

pytest.importorskip('mmseg')

from mmtune.testing import run_python  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOL = osp.join(REPO, 'tools', 'analysis_tools', 'sweep_conv_bn_coverage.py')


def _tool():
    spec = importlib.util.spec_from_file_location('sweep_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_table(tmp_path):
    table = tmp_path / 'sweep.md'
    args = ['--codebase', 'mmseg', '--only', 'Fast-SCNN', 'CGNet']
    run_python(
        [TOOL, *args, '--out', str(table)],
        env=dict(os.environ),
        cwd=REPO,
        timeout=180,
    )
    out = table.read_text()
    lines = [line for line in out.splitlines() if line]
    # the file holds the tables alone, none of what the codebases log
    assert lines[0] == '### mmseg', out
    assert lines[1].startswith('mmseg 1.'), out
    assert all(line.startswith('| ') for line in lines[2:]), out
    rows = lines[2:]
    assert rows[0].startswith('| model (config) | oracle pairs |'), out
    assert len(rows) == 4, out  # header, separator, two models
    fast_scnn, cgnet = rows[2].split(' | '), rows[3].split(' | ')
    assert fast_scnn[1:5] == ['46', '46', '0', '46 of 46 called'], rows[2]
    assert cgnet[1:5] == ['27', '27', '0', '27 of 27 called'], rows[3]
    assert cgnet[5] == '27x the BN input is not a conv output', rows[3]


def test_failures_are_rows(monkeypatch):
    tool = _tool()
    models = {
        'mmseg': {
            'no such config': ('fcn/no_such_config.py', (64, 64), {}),
            # LRASPP pools with a 49x49 kernel: a 64x64 input fails
            'LRASPP too small': (
                'mobilenet_v3/mobilenet-v3-d8_lraspp_4xb4-320k_cityscapes-'
                '512x1024.py',
                (64, 64),
                {},
            ),
            'no BN': (None, 'nothing to fold'),
            'FCN R18-D8': (
                'fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py',
                (64, 64),
                {},
            ),
        }
    }
    monkeypatch.setattr(tool, 'CODEBASE_MODELS', models)
    out = io.StringIO()
    assert tool.sweep('mmseg', out=out) is False
    rows = [r for r in out.getvalue().splitlines() if r.startswith('| ')][2:]
    assert len(rows) == 4, out.getvalue()
    assert 'not built: FileNotFoundError' in rows[0], rows[0]
    assert 'failed: RuntimeError' in rows[1], rows[1]
    assert 'not built: nothing to fold' in rows[2], rows[2]
    assert rows[3].split(' | ')[1:5] == ['26', '26', '0', '26 of 26 called']
