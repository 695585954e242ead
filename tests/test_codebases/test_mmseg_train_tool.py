# Copyright (c) mmtune contributors. All rights reserved.
"""mmtune through mmseg's own installed ``tools/train.py``, the way an mmseg
user adds it to a config: FCN R18-D8 (mmseg's config, its backbone's BN
frozen with ``norm_eval=True``) on a tiny generated dataset, 3 iterations
on the CPU, in subprocesses with a timeout."""

import os
import os.path as osp
import re

import numpy as np
import pytest

pytest.importorskip('mmseg')

from mmtune.testing import run_python  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
BASE_TUNE = osp.join(REPO, 'configs', '_base_', 'fast_conv_bn_eval.py')

# A user's config on top of mmseg's own FCN R18-D8: fine-tuning with the
# backbone's BN frozen, a 2-class dataset of 64x64 PNGs, no validation, no
# checkpoints, a fixed seed and 8 digits in the log.
USER_CONFIG = """
_base_ = ['mmseg::fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py']
crop_size = (64, 64)
model = dict(
    data_preprocessor=dict(size=crop_size),
    pretrained=None,
    backbone=dict(norm_eval=True),
    decode_head=dict(num_classes=2),
    auxiliary_head=dict(num_classes=2),
)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    _delete_=True,
    batch_size=2,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='BaseSegDataset',
        data_root={data!r},
        data_prefix=dict(img_path='img', seg_map_path='ann'),
        img_suffix='.png',
        seg_map_suffix='.png',
        metainfo=dict(
            classes=('background', 'object'),
            palette=[[0, 0, 0], [255, 0, 0]],
        ),
        pipeline=train_pipeline,
    ),
)
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = None
test_cfg = None
test_evaluator = None
train_cfg = dict(type='IterBasedTrainLoop', max_iters=3, val_interval=1000)
param_scheduler = []
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(interval=-1, save_last=False),
)
log_processor = dict(window_size=1, num_digits=8)
randomness = dict(seed=0)
"""

# ResNetV1c-18 (3 stem convs, 8 basic blocks, 3 downsamples) and the FCN
# decode (2 convs + conv_cat) and auxiliary (1 conv) heads
BACKBONE_PAIRS, HEAD_PAIRS = 22, 4


def _train_py():
    import mmseg

    path = osp.join(osp.dirname(mmseg.__file__), '.mim', 'tools', 'train.py')
    if not osp.isfile(path):
        pytest.skip(f'mmseg ships no {path}')
    return path


def _make_data(root, n=4, size=64):
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(osp.join(root, 'img'))
    os.makedirs(osp.join(root, 'ann'))
    for i in range(n):
        label = np.zeros((size, size), np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        label[y : y + size // 2, x : x + size // 2] = 1
        img = rng.integers(0, 100, (size, size, 3)).astype(np.uint8)
        img[label == 1] += 120
        Image.fromarray(img).save(osp.join(root, 'img', f'{i:03d}.png'))
        Image.fromarray(label).save(osp.join(root, 'ann', f'{i:03d}.png'))


def _losses(log):
    return [
        float(v)
        for v in re.findall(
            r'Iter\(train\) \[\s*\d+/\d+\].*? loss: ([\d.]+)', log
        )
    ]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """mmseg's train.py on four configs: without mmtune; mmtune through
    ``custom_imports`` and ``custom_hooks``; through mmtune's ``_base_``
    fragment (restricted to the backbone); mmtune imported and
    ``fast_conv_bn_eval=True`` but no hook."""
    tmp = tmp_path_factory.mktemp('mmseg_train')
    _make_data(str(tmp / 'data'))
    user = tmp / 'user.py'
    user.write_text(USER_CONFIG.format(data=str(tmp / 'data')))
    configs = {
        'plain': f'_base_ = [{str(user)!r}]\n',
        'hooks': (
            f'_base_ = [{str(user)!r}]\n'
            "custom_imports = dict(imports=['mmtune'])\n"
            "custom_hooks = [dict(type='mmtune.FastConvBNEvalHook')]\n"
        ),
        'base': (
            f'_base_ = [{str(user)!r}, {BASE_TUNE!r}]\n'
            "fast_conv_bn_eval_modules = ['backbone']\n"
        ),
        'keys_only': (
            f'_base_ = [{str(user)!r}]\n'
            "custom_imports = dict(imports=['mmtune'])\n"
            'fast_conv_bn_eval = True\n'
        ),
    }
    env = dict(os.environ)
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    train = _train_py()
    logs = {}
    for name, text in configs.items():
        path = tmp / f'{name}.py'
        path.write_text(text)
        logs[name] = run_python(
            [train, str(path), '--work-dir', str(tmp / name)],
            env=env,
            cwd=str(tmp),
            timeout=240,
        )
    return logs


def test_tune_mode_through_custom_hooks(runs):
    log = runs['hooks']
    total = BACKBONE_PAIRS + HEAD_PAIRS
    assert (
        f'mmtune tune mode (fast_conv_bn_eval): {total} Conv+BN pairs '
        'converted, 0 skipped'
    ) in log, log[-3000:]
    # the heads' BNs train (mmseg heads have no norm_eval): those pairs
    # compute as the modules do, and the log says so
    assert (
        f'mmtune tune mode: {BACKBONE_PAIRS} of {total} converted pairs '
        'folded at every call'
    ) in log, log[-3000:]
    computed = re.findall(
        r'folded 0 of 1 calls, computed as the modules do 1 '
        r'\(1: the BN is in train mode\)',
        log,
    )
    assert len(computed) == HEAD_PAIRS, log[-3000:]


def test_tune_mode_through_the_base_config(runs):
    log = runs['base']
    assert (
        f'mmtune tune mode: {BACKBONE_PAIRS} of {BACKBONE_PAIRS} converted '
        'pairs folded at every call'
    ) in log, log[-3000:]


@pytest.mark.parametrize('name', ['hooks', 'base', 'keys_only'])
def test_losses_equal_eval_mode(runs, name):
    plain, other = _losses(runs['plain']), _losses(runs[name])
    assert len(plain) == len(other) == 3, runs[name][-3000:]
    assert other == pytest.approx(plain, rel=1e-5, abs=1e-6)


def test_keys_without_a_hook_get_a_warning(runs):
    log = runs['keys_only']
    assert 'mmtune: the config sets fast_conv_bn_eval but its' in log
    assert 'list no mmtune hook that reads it' in log
    assert 'Conv+BN pairs converted' not in log
    # without mmtune: neither
    assert 'mmtune tune mode' not in runs['plain']
    assert 'list no mmtune hook' not in runs['plain']
