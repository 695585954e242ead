# Copyright (c) mmtune contributors. All rights reserved.
"""The transfer-learning tool, in its quick setting (one seed, 8x8 images,
2 + 3 epochs): it runs, writes its table, tune mode converts every pair and
matches eval mode."""

import importlib.util
import json
import os.path as osp

import pytest

pytest.importorskip('sklearn')

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOL = osp.join(REPO, 'tools', 'analysis_tools', 'transfer_digits.py')


def _load_tool():
    spec = importlib.util.spec_from_file_location('transfer_digits', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transfer_digits_quick(tmp_path, capsys):
    tool = _load_tool()
    out = tool.main(['--quick', '--seeds', '3', '--out-dir', str(tmp_path)])

    printed = capsys.readouterr().out
    table = (tmp_path / 'transfer_digits.md').read_text()
    for text in (printed, table):
        assert '| mode | target test acc |' in text
        for mode in ('eval (', 'tune (', 'deploy (', 'scratch ('):
            assert f'| {mode}' in text
    assert json.loads((tmp_path / 'transfer_digits.json').read_text()) == (
        json.loads(json.dumps(out))
    )

    (result,) = out['seeds']
    assert result['seed'] == 3
    pairs = [
        ['backbone.0', 'backbone.1'],
        ['backbone.3', 'backbone.4'],
        ['backbone.7', 'backbone.8'],
        ['backbone.11', 'backbone.12'],
    ]
    assert result['converted'] == {'tune': pairs, 'deploy': pairs}
    # Eval, tune and deploy start from the same function.
    assert result['tune_first_logit_diff'] < 1e-4
    assert result['deploy_first_logit_diff'] < 1e-4
    # Tune mode matches eval mode: the same accuracy, at most one test
    # image apart (float32 rounding).
    one_image = 100.0 / result['n_target_test']
    assert abs(result['tune_acc'] - result['eval_acc']) <= one_image + 1e-9
    assert result['tune_disagree'] <= 1
    for mode in ('eval', 'tune', 'deploy', 'scratch'):
        assert 0.0 <= result[f'{mode}_acc'] <= 100.0


def test_transfer_digits_float64_exact(tmp_path):
    """In float64, tune mode is eval mode to ~1e-12 after fine-tuning."""
    tool = _load_tool()
    out = tool.main(
        ['--quick', '--dtype', 'float64', '--out-dir', str(tmp_path)]
    )
    (result,) = out['seeds']
    assert result['tune_logit_diff'] < 1e-9
    assert result['tune_acc'] == result['eval_acc']


def test_transfer_digits_rejects_bad_epochs(tmp_path):
    tool = _load_tool()
    with pytest.raises(SystemExit):
        tool.main(['--finetune-epochs', '0', '--out-dir', str(tmp_path)])
