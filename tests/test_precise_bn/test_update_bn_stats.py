# Copyright (c) mmtune contributors. All rights reserved.
"""``update_bn_stats`` in one process: closed forms and edge cases.

``mmtune.update_bn_stats`` is :func:`mmtune.engine.precise_bn.update_bn_stats`
(mmengine is installed here), which feeds mmengine models their way and
everything else to the torch-only :func:`mmtune.precise_bn.update_bn_stats`.
"""

import itertools
import logging
import subprocess
import sys

import pytest
import torch
from mmengine.model import BaseModel, ImgDataPreprocessor
from mmengine.model.utils import _BatchNormXd
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mmtune import precise_bn, update_bn_stats


def _pooled(*xs):
    """Per-channel mean and unbiased variance of all values of ``xs``."""
    flat = torch.cat(
        [x.double().transpose(0, 1).reshape(x.shape[1], -1) for x in xs], 1
    )
    return flat.mean(1), flat.var(1, unbiased=True)


def _data(shape, seed=0, dtype=torch.float32):
    """Random data with per-channel means far from 0 and unequal spreads."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    view = (1, -1) + (1,) * (len(shape) - 2)
    scale = torch.linspace(0.5, 3, shape[1], dtype=torch.float64).view(view)
    shift = torch.linspace(-4, 20, shape[1], dtype=torch.float64).view(view)
    return (x * scale + shift).to(dtype)


def _randomize(model):
    """Non-trivial running statistics and affine values."""
    gen = torch.Generator().manual_seed(123)
    for m in model.modules():
        if getattr(m, 'running_mean', None) is not None:
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen))
            m.running_var.copy_(1 + torch.rand(m.num_features, generator=gen))
            m.num_batches_tracked.fill_(5)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            m.weight.data.uniform_(0.5, 2, generator=gen)
            m.bias.data.uniform_(-1, 1, generator=gen)
    return model


def _check_stats(bn, *xs, rtol=1e-6):
    mean, var = _pooled(*xs)
    torch.testing.assert_close(
        bn.running_mean.double(), mean, rtol=rtol, atol=rtol
    )
    torch.testing.assert_close(
        bn.running_var.double(), var, rtol=rtol, atol=rtol
    )


def test_closed_form_sequence():
    """0..11 in batches: mean 5.5 and unbiased variance 13, whatever the
    (uneven) split. Averaging the batch variances (mmpretrain, fvcore)
    would give 1 for batches of 3."""
    data = torch.arange(12.0).view(12, 1)
    for sizes in [(3, 3, 3, 3), (2, 5, 3, 2), (12,)]:
        bn = nn.BatchNorm1d(1)
        summary = update_bn_stats(bn, data.split(sizes), 12, progress=False)
        assert bn.running_mean.item() == pytest.approx(5.5)
        assert bn.running_var.item() == pytest.approx(13.0)
        assert bn.running_var.item() == pytest.approx(
            torch.var(data, unbiased=True).item()
        )
        assert summary == {
            'num_layers': 1,
            'num_samples': 12,
            'num_iters': len(sizes),
            'not_updated': [],
        }


BN_TYPES = [
    (nn.BatchNorm1d, (30, 4)),
    (nn.BatchNorm1d, (30, 4, 5)),
    (nn.BatchNorm2d, (30, 4, 3, 5)),
    (nn.BatchNorm3d, (30, 4, 2, 3, 2)),
    (nn.SyncBatchNorm, (30, 4, 3, 5)),
    (_BatchNormXd, (30, 4, 3, 5)),
]


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('bn_type,shape', BN_TYPES)
def test_pooled_statistics(bn_type, shape, dtype):
    """Every BN type, uneven batches: the statistics of all the data, the
    same for any split."""
    x = _data(shape, dtype=dtype)
    results = []
    for sizes in [(2, 7, 5, 16), (10, 10, 10), (30,)]:
        bn = _randomize(bn_type(shape[1]).to(dtype))
        update_bn_stats(bn, x.split(sizes), 1000, progress=False)
        _check_stats(bn, x, rtol=1e-6 if dtype == torch.float32 else 1e-12)
        assert bn.running_mean.dtype == dtype
        results.append(torch.cat([bn.running_mean, bn.running_var]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0], results[2], rtol=1e-6, atol=1e-6)


def test_large_mean_is_stable():
    """Means 1e8 times the spread: float64 sums of squares would lose every
    digit of the variance; the pooled moments keep all but the ones the
    data itself lacks (float64 holds 1e8 + x to about 1e-8)."""
    x = 1e8 + torch.randn(64, 3, 4, 4, dtype=torch.float64)
    bn = nn.BatchNorm2d(3).double()
    update_bn_stats(bn, x.split(5), 64, progress=False)
    _check_stats(bn, x, rtol=1e-7)


def test_num_samples_rounds_up_to_whole_batches():
    x = _data((20, 3, 2, 2))
    loader = DataLoader(TensorDataset(x), batch_size=4)
    bn = nn.BatchNorm2d(3)
    summary = update_bn_stats(bn, loader, 6, progress=False)
    assert (summary['num_iters'], summary['num_samples']) == (2, 8)
    _check_stats(bn, x[:8])
    # Fewer samples than one batch: one whole batch.
    bn = nn.BatchNorm2d(3)
    summary = update_bn_stats(bn, loader, 1, progress=False)
    assert (summary['num_iters'], summary['num_samples']) == (1, 4)
    _check_stats(bn, x[:4])


def test_short_loader_uses_all_data_and_warns(caplog):
    x = _data((10, 3, 2, 2))
    bn = nn.BatchNorm2d(3)
    with caplog.at_level(logging.WARNING, logger='mmtune.precise_bn'):
        summary = update_bn_stats(
            bn, DataLoader(TensorDataset(x), batch_size=4), 8192
        )
    assert summary['num_samples'] == 10
    assert 'ran out after 10 of the 8192 samples' in caplog.text
    _check_stats(bn, x)


def test_batch_sampler_without_batch_size():
    x = _data((11, 3, 2, 2))
    loader = DataLoader(
        TensorDataset(x),
        batch_sampler=[[0, 1], [2, 3, 4], [5, 6, 7, 8], [9, 10]],
    )
    assert loader.batch_size is None
    bn = nn.BatchNorm2d(3)
    summary = update_bn_stats(bn, loader, 5, progress=False)
    assert (summary['num_iters'], summary['num_samples']) == (2, 5)
    _check_stats(bn, x[:5])


def test_iterables_without_len():
    x = _data((12, 3, 2, 2))
    bn = nn.BatchNorm2d(3)
    update_bn_stats(bn, (b for b in x.split(4)), 100, progress=False)
    _check_stats(bn, x)
    # An endless iterator stops at num_samples.
    bn = nn.BatchNorm2d(3)
    summary = update_bn_stats(
        bn, itertools.cycle(x.split(4)), 20, progress=False
    )
    assert summary['num_iters'] == 5
    _check_stats(bn, x, x[:8])


def test_tuple_batches_use_their_first_element():
    """The ``swa_utils.update_bn`` convention; ``device`` moves the input."""
    x = _data((12, 3, 2, 2))
    batches = [(b, 'label') for b in x.split(3)]
    bn = nn.BatchNorm2d(3)
    update_bn_stats(bn, batches, 12, device=torch.device('cpu'))
    _check_stats(bn, x)


class _Shared(nn.Module):
    """``bn`` is called twice per forward; ``bn_odd`` only for batches of
    odd size; ``bn_never`` never."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.bn_odd = nn.BatchNorm2d(3)
        self.bn_never = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(x) + self.bn(x[:, :, :1] * 3 + 1)
        if x.shape[0] % 2:
            y = y + self.bn_odd(x)
        return y


def test_bn_called_twice_or_not_at_all(caplog):
    model = _randomize(_Shared())
    never = {k: v.clone() for k, v in model.bn_never.state_dict().items()}
    x = _data((15, 3, 2, 2))
    batches = list(x.split([2, 3, 4, 5, 1]))[:4]
    with caplog.at_level(logging.WARNING, logger='mmtune.precise_bn'):
        summary = update_bn_stats(model, batches, 100, progress=False)
    # A BN called twice pools both inputs of every forward.
    _check_stats(model.bn, *batches, *[b[:, :, :1] * 3 + 1 for b in batches])
    # A BN called in some forwards only: the inputs it received.
    _check_stats(model.bn_odd, batches[1], batches[3])
    # A BN never called keeps its statistics and is reported.
    for k, v in model.bn_never.state_dict().items():
        assert torch.equal(v, never[k])
    assert summary['not_updated'] == ['bn_never']
    assert summary['num_layers'] == 2
    assert 'bn_never' in caplog.text


class _Everything(nn.Module):
    """BNs with momentum 0.1 and None, frozen, without running statistics,
    without affine; frozen parameters; a module keeping state in a buffer;
    a dropout in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.bn_none = nn.BatchNorm2d(4, momentum=None)
        self.bn_frozen = nn.BatchNorm2d(4)
        self.bn_no_stats = nn.BatchNorm2d(4, track_running_stats=False)
        self.bn_no_affine = nn.BatchNorm2d(4, affine=False)
        self.drop = nn.Dropout(0.5)
        self.register_buffer('calls', torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        x = self.bn_none(self.bn(self.conv(x)))
        x = self.bn_no_affine(self.bn_no_stats(self.bn_frozen(x)))
        return self.drop(x)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_nothing_else_changes():
    model = _randomize(_Everything())
    model.bn_frozen.eval()
    model.drop.eval()
    model.conv.weight.requires_grad_(False)
    before = _state(model)
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    momenta = {n: getattr(m, 'momentum', 0) for n, m in model.named_modules()}

    x = _data((16, 3, 2, 2))
    summary = update_bn_stats(model, x.split(4), 16, progress=False)
    assert summary['num_layers'] == 3
    after = _state(model)

    updated = {
        f'{n}.running_{s}'
        for n in ['bn', 'bn_none', 'bn_no_affine']
        for s in ['mean', 'var']
    }
    for k in before:
        if k in updated:
            assert not torch.equal(before[k], after[k]), k
        else:  # weights, frozen BN, num_batches_tracked, other buffers
            assert torch.equal(before[k], after[k]), k
    assert model.bn_no_stats.running_mean is None
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {
        n: getattr(m, 'momentum', 0) for n, m in model.named_modules()
    } == momenta
    assert model.bn_none.momentum is None
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()
    with torch.no_grad():
        _check_stats(model.bn, model.conv(x))


def test_error_in_forward_changes_nothing():
    model = _randomize(_Everything())
    before = _state(model)
    x = _data((12, 3, 2, 2))
    batches = [x[:4], x[4:8], 'not a tensor']
    with pytest.raises(TypeError):
        update_bn_stats(model, batches, 12, progress=False)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(m.training for m in model.modules())


def test_empty_loader_and_no_bn(caplog):
    model = _randomize(_Everything())
    before = _state(model)
    with caplog.at_level(logging.WARNING, logger='mmtune.precise_bn'):
        summary = update_bn_stats(model, [], 100, progress=False)
    assert summary['num_layers'] == 0 and summary['num_iters'] == 0
    assert len(summary['not_updated']) == 4
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert 'ran out after 0 of the 100 samples' in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='mmtune.precise_bn'):
        summary = update_bn_stats(model.eval(), [torch.ones(2, 3, 2, 2)])
    assert summary['num_layers'] == 0
    assert 'no BatchNorm layer in training mode' in caplog.text


@pytest.mark.parametrize(
    'bad,error',
    [
        (0, ValueError),
        (-5, ValueError),
        (2.5, TypeError),
        (True, TypeError),
        ('8', TypeError),
    ],
)
def test_bad_num_samples(bad, error):
    bn = nn.BatchNorm1d(2)
    with pytest.raises(error, match='num_samples'):
        update_bn_stats(bn, [torch.ones(2, 2)], bad)


def test_wrappers_are_unwrapped():
    x = _data((8, 3, 2, 2))
    bn = nn.BatchNorm2d(3)
    update_bn_stats(nn.DataParallel(bn), x.split(4), 8, progress=False)
    _check_stats(bn, x)


def test_progress_bar_and_log_line(capsys, caplog):
    x = _data((12, 3, 2, 2))
    bn = nn.BatchNorm2d(3)
    with caplog.at_level(logging.INFO, logger='mmtune.precise_bn'):
        update_bn_stats(bn, DataLoader(TensorDataset(x), batch_size=4), 12)
    assert 'precise BN: 3/3 iterations' in capsys.readouterr().err
    assert (
        'recomputed the statistics of 1 BatchNorm layers from 12 '
        'samples (3 iterations on 1 process)'
    ) in caplog.text


class _MMModel(BaseModel):
    """An mmengine model whose BN sees the normalised images."""

    def __init__(self):
        super().__init__(
            data_preprocessor=ImgDataPreprocessor(
                mean=[10.0, 20.0, 30.0], std=[2.0, 4.0, 8.0]
            )
        )
        self.bn = nn.BatchNorm2d(3)
        self.modes = []

    def forward(self, inputs, data_samples=None, mode='tensor'):
        self.modes.append(mode)
        return self.bn(inputs)


def test_mmengine_model_uses_preprocessor_and_tensor_mode():
    images = _data((10, 3, 4, 4)) * 5 + 20
    batches = [
        {'inputs': list(images[i : i + 5]), 'data_samples': None}
        for i in (0, 5)
    ]
    model = _MMModel()
    summary = update_bn_stats(model, batches, 10, progress=False)
    assert (summary['num_iters'], summary['num_samples']) == (2, 10)
    assert model.modes == ['tensor', 'tensor']
    mean = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1)
    std = torch.tensor([2.0, 4.0, 8.0]).view(1, 3, 1, 1)
    _check_stats(model.bn, (images - mean) / std, rtol=1e-5)


def test_mmengine_model_inside_a_wrapper():
    """The wrapper is taken off before the model is recognised."""
    from mmtune.engine import precise_bn as engine_precise_bn

    assert update_bn_stats is engine_precise_bn.update_bn_stats
    images = _data((10, 3, 4, 4)) * 5 + 20
    batches = [{'inputs': list(images[i : i + 5])} for i in (0, 5)]
    model = _MMModel()
    update_bn_stats(nn.DataParallel(model), batches, 10, progress=False)
    assert model.modes == ['tensor', 'tensor']


def test_prepare_says_how_a_batch_reaches_the_model():
    """The torch-only function with its own ``prepare``: each batch is
    prepared when read and run after; ``n`` counts its samples."""
    x = _data((12, 3, 2, 2))
    bn = nn.BatchNorm2d(3)
    calls = []

    def prepare(batch):
        calls.append('prepare')

        def run():
            calls.append('run')
            return bn(input=batch['image'] * 2)

        return run, len(batch['image'])

    batches = [{'image': b} for b in x.split(4)]
    summary = precise_bn.update_bn_stats(
        bn, batches, 8, prepare=prepare, progress=False
    )
    assert calls == ['prepare', 'run'] * 2
    assert (summary['num_iters'], summary['num_samples']) == (2, 8)
    _check_stats(bn, x[:8] * 2)
    with pytest.raises(ValueError, match='device=.*cpu.*prepare'):
        precise_bn.update_bn_stats(
            bn, batches, 8, prepare=prepare, device=torch.device('cpu')
        )


def test_count_samples():
    count = precise_bn.count_samples
    assert count(torch.ones(5, 3)) == 5
    assert count(torch.tensor(2.0)) == 1
    assert count([torch.ones(3)] * 4) == 4
    assert count({'inputs': torch.ones(6, 1), 'labels': [0]}) == 6
    assert count({'image': torch.ones(7, 1)}) == 7
    with pytest.raises(TypeError, match='type str'):
        count('abc')


def test_the_maths_needs_torch_only():
    """With mmengine, mmcv and mmdet unimportable, ``mmtune.precise_bn``
    imports and works, and ``mmtune.update_bn_stats`` is its function."""
    code = (
        'import sys\n'
        "for name in ('mmengine', 'mmcv', 'mmdet'):\n"
        '    sys.modules[name] = None\n'
        'import torch\n'
        'import mmtune\n'
        'from mmtune.precise_bn import update_bn_stats\n'
        'assert mmtune.update_bn_stats is update_bn_stats\n'
        'bn = torch.nn.BatchNorm1d(2)\n'
        'x = torch.arange(8.0).view(4, 2)\n'
        'print(update_bn_stats(bn, x.split(2), 4, progress=False))\n'
        'print(bn.running_mean.tolist())\n'
    )
    out = subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split('\n')[-2] == '[3.0, 4.0]', out.stdout
