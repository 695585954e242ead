# Copyright (c) mmtune contributors. All rights reserved.
"""Pairs folded together (FoldBatch): the same values and gradients as eval
mode, whatever the model does between and within steps: pairs not called,
two forwards before one backward, optimizer steps, checkpointing, no-grad
forwards, BN train/eval switches, deep copies."""

import copy

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import nn

import mmtune.rewrite.fold_batch as fold_batch
from mmtune import turn_on_fast_conv_bn_eval
from mmtune.testing import compare_models, randomize_bn


class Mixed(nn.Module):
    """Pairs of every kind in one chunk, one of them used only on demand,
    one behind a checkpoint."""

    def __init__(self, reentrant=None):
        super().__init__()
        self.reentrant = reentrant
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=True, groups=2)
        self.bn2 = nn.BatchNorm2d(6, affine=False, eps=1e-3)
        self.conv3 = nn.Conv2d(6, 5, 1)
        self.bn3 = nn.BatchNorm2d(5)
        self.conv4 = nn.Conv2d(6, 5, 1, bias=False)  # used on demand
        self.bn4 = nn.BatchNorm2d(5)
        self.conv5 = nn.Conv1d(5, 4, 3, padding=1)
        self.bn5 = nn.BatchNorm1d(4)

    def _block(self, x):
        return self.bn3(self.conv3(x)).relu()

    def forward(self, x, extra=False):
        x = self.bn1(self.conv1(x)).relu()
        x = self.bn2(self.conv2(x)).relu()
        if self.reentrant is None:
            y = self._block(x)
        else:
            y = cp.checkpoint(self._block, x, use_reentrant=self.reentrant)
        if extra:
            y = y + self.bn4(self.conv4(x))
        return self.bn5(self.conv5(y.mean(2)))


def _pair(reentrant=None, dtype=torch.float64):
    torch.manual_seed(0)
    ref = Mixed(reentrant)
    randomize_bn(ref, 1)
    ref = ref.to(dtype).eval()
    tuned = copy.deepcopy(ref)
    report = turn_on_fast_conv_bn_eval(tuned)
    assert len(report.converted) == 5, str(report)
    return ref, tuned


def _batch(model):
    return model.conv1.forward.__self__.fold_state.batch


def _step(model, x, extra, loss_scale=1.0):
    out = model(x, extra=extra)
    (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().mul(
        loss_scale
    ).backward()
    return out


def _grads(model):
    return {
        name: None if p.grad is None else p.grad.clone()
        for name, p in model.named_parameters()
    }


def _assert_same(ref, tuned, rtol=1e-10):
    for (name, a), (_, b) in zip(ref.items(), tuned.items()):
        assert (a is None) == (b is None), name
        if a is not None:
            err = (a - b).abs().max() / a.abs().max().clamp_min(1e-30)
            assert err < rtol, (name, float(err))


def test_all_pairs_share_one_batch_and_match_eval():
    ref, tuned = _pair()
    batch = _batch(tuned)
    assert batch is not None
    assert len(batch.members) == 5
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert compare_models(ref, tuned, [x], rtol=1e-10) == []
    assert batch.folds == 1


def test_unused_pair_gets_no_gradient_and_is_refolded_later():
    ref, tuned = _pair()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    opts = [
        torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1)
        for m in (ref, tuned)
    ]
    # step 1 without the extra pair: its parameters keep grad None, so
    # weight decay does not touch them; steps 2 and 3 accumulate two
    # forwards (the second one with the extra pair) into one update
    for extras in ([False], [False, True], [True, True]):
        for opt in opts:
            opt.zero_grad()
        for extra in extras:
            outs = [_step(m, x, extra) for m in (ref, tuned)]
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=0)
        _assert_same(_grads(ref), _grads(tuned))
        if extras == [False]:
            assert tuned.conv4.weight.grad is None
            assert tuned.bn4.weight.grad is None
            # the backward went through the fold: the entry never taken
            # (pair 4's) was dropped with it
            assert _batch(tuned).entries is None
        for opt in opts:
            opt.step()
    _assert_same(dict(ref.named_parameters()), dict(tuned.named_parameters()))
    assert _batch(tuned).folds >= 4


def test_two_forwards_then_one_backward():
    ref, tuned = _pair()
    x1 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    x2 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for model in (ref, tuned):
        (
            model(x1, extra=True).sum() + model(x2, extra=True).pow(2).sum()
        ).backward()
    _assert_same(_grads(ref), _grads(tuned))


@pytest.mark.parametrize('reentrant', [True, False])
def test_checkpoint(reentrant):
    ref, tuned = _pair(reentrant)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    for _ in range(2):
        for model in (ref, tuned):
            model.zero_grad()
            _step(model, x, extra=True)
        _assert_same(_grads(ref), _grads(tuned))


def test_no_grad_forwards_and_bn_switches_in_between():
    ref, tuned = _pair()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for model in (ref, tuned):
        with torch.no_grad():
            model(x, extra=True)
        _step(model, x, extra=True)
        model.bn3.train()  # normalise with batch statistics, update them
        _step(model, x, extra=True)
        model.bn3.eval()
        _step(model, x, extra=True)
    _assert_same(_grads(ref), _grads(tuned))
    torch.testing.assert_close(tuned.bn3.running_var, ref.bn3.running_var)
    x.requires_grad_()
    assert compare_models(ref, tuned, [x], rtol=1e-10) == []


def test_frozen_pairs_fold_alone():
    ref, tuned = _pair()
    for model in (ref, tuned):
        for module in (model.conv1, model.bn1):
            module.requires_grad_(False)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for model in (ref, tuned):
        _step(model, x, extra=True)
    _assert_same(_grads(ref), _grads(tuned))
    assert tuned.conv1.weight.grad is None


def test_deepcopy_folds_its_own_modules():
    ref, tuned = _pair()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert compare_models(ref, tuned, [x], rtol=1e-10) == []
    ema = copy.deepcopy(tuned)
    batch = _batch(ema)
    assert batch is not _batch(tuned) and batch.entries is None
    assert batch.members[0][0] is ema.conv1
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
        ema_ref = copy.deepcopy(ref)
        for p in ema_ref.parameters():
            p.mul_(0.5)
    assert compare_models(ema_ref, ema, [x], rtol=1e-10) == []
    assert batch.folds >= 1


def test_dtype_change_refolds():
    ref, tuned = _pair(dtype=torch.float32)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert compare_models(ref, tuned, [x], rtol=1e-5) == []
    ref.double()
    tuned.double()
    x = x.detach().double().requires_grad_()
    assert compare_models(ref, tuned, [x], rtol=1e-10) == []


def test_chunks(monkeypatch):
    monkeypatch.setattr(fold_batch, 'CHUNK_SIZE', 2)
    ref, tuned = _pair()
    convs = (tuned.conv1, tuned.conv2, tuned.conv3, tuned.conv4, tuned.conv5)
    batches = {id(c.forward.__self__.fold_state.batch) for c in convs}
    assert len(batches) == 3
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert compare_models(ref, tuned, [x], rtol=1e-10) == []
    monkeypatch.setattr(fold_batch, 'CHUNK_SIZE', 0)
    _, alone = _pair()
    assert _batch(alone) is None
    assert compare_models(ref, alone, [x], rtol=1e-10) == []
