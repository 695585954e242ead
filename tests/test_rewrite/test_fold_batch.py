# Copyright (c) mmtune contributors. All rights reserved.
"""Batched folding (mmtune.rewrite.fold_batch) is exact where it applies
and steps aside where it must: a model with many pairs, a pair called twice,
an unused branch, frozen pairs, different eps, optimizer steps with weight
decay, checkpointing, repeated forwards, state changes between forwards."""

import copy
import gc
import logging
import pickle
import types

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmtune import turn_on_fast_conv_bn_eval
from mmtune.rewrite.tune_mode import tune_pairs
from mmtune.testing import (
    compare_models,
    fold_batches,
    randomize_bn,
    run_isolated,
)

_batches = fold_batches


class Block(nn.Module):
    def __init__(self, cin, cout, eps=1e-5, bias=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(cout, eps=eps)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    """Seven pairs: a frozen stem, different eps, a conv bias, a block
    called twice per forward and a branch used only when ``aux`` is set."""

    def __init__(self):
        super().__init__()
        self.stem = Block(3, 8)
        self.b1 = Block(8, 8, eps=1e-3)
        self.b2 = Block(8, 16, bias=True)
        self.shared = Block(16, 16)
        self.aux = Block(16, 16)
        self.head = nn.Conv2d(16, 4, 1)
        self.use_aux = False
        for p in self.stem.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        x = self.b2(self.b1(self.stem(x)))
        x = self.shared(self.shared(x))
        if self.use_aux:
            x = x + self.aux(x)
        return self.head(x)


def _models(seed=0, batch=True):
    torch.manual_seed(seed)
    ref = Net().double()
    randomize_bn(ref, seed)
    ref.eval()
    tuned = copy.deepcopy(ref)
    report = turn_on_fast_conv_bn_eval(tuned, batch=batch)
    assert len(report.converted) == 5, str(report)
    return ref, tuned


def _x(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)


def _sgd(model):
    return torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1
    )


def test_training_steps_match_eval_and_fold_once_per_step():
    ref, tuned = _models()
    (batch,) = _batches(tuned)
    opt_ref, opt_tuned = _sgd(ref), _sgd(tuned)
    x = [_x()]
    for step in range(4):
        tuned.use_aux = ref.use_aux = step % 2 == 1
        assert compare_models(ref, tuned, x, rtol=1e-10) == [], step
        if not ref.use_aux:
            # an unused pair gets no gradient: weight decay and momentum
            # leave it alone, as in eval mode
            assert all(p.grad is None for p in tuned.aux.parameters())
        opt_ref.step()
        opt_tuned.step()
    assert batch.folds == 4
    for (name, a), b in zip(
        ref.state_dict().items(), tuned.state_dict().values()
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_channels_last_weights_batch_and_match_eval(monkeypatch):
    from mmtune.rewrite.fold_batch import FoldBatch

    taken = []
    take = FoldBatch.take

    def counting(self, index):
        fold = take(self, index)
        taken.append(fold is not None)
        if fold is not None:
            assert fold.weight.is_contiguous(memory_format=torch.channels_last)
        return fold

    monkeypatch.setattr(FoldBatch, 'take', counting)
    ref, tuned = _models()
    for model in (ref, tuned):
        model.to(memory_format=torch.channels_last)
    assert not tuned.b1.conv.weight.is_contiguous()
    opt_ref, opt_tuned = _sgd(ref), _sgd(tuned)
    x = [_x().to(memory_format=torch.channels_last)]
    for step in range(3):
        taken.clear()
        assert compare_models(ref, tuned, x, rtol=1e-10) == [], step
        # stem, b1, b2 and the first call of shared batch; its second call
        # folds alone
        assert taken.count(True) >= 4 and taken.count(False) >= 1, taken
        opt_ref.step()
        opt_tuned.step()


def test_two_forwards_one_backward_and_retain_graph():
    ref, tuned = _models()
    (batch,) = _batches(tuned)
    x1, x2 = _x(1), _x(2)

    def grads(model, retain):
        model.zero_grad(set_to_none=True)
        loss = model(x1).square().sum() + model(x2).sum()
        loss.backward(retain_graph=retain)
        if retain:
            loss.backward()
        return [
            p.grad.clone() for p in model.parameters() if p.grad is not None
        ]

    for retain in (False, True):
        for a, b in zip(grads(ref, retain), grads(tuned, retain)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert batch.folds == 4  # one per call of the model


def test_entries_taken_once_and_a_second_call_folds_alone():
    """A pair takes its entry once (the group's folded tensors are freed
    once every pair has run); a pair called again in the same forward
    folds alone, without folding the batch again; nothing folded outlives
    the call of the model."""
    ref, tuned = _models()
    ref.use_aux = tuned.use_aux = True
    (batch,) = _batches(tuned)
    seen = []

    def inspect(module, args, output):
        (folded,) = batch._folded.values()
        seen.append(dict(folded.entries))

    tuned.aux.register_forward_hook(inspect)  # a frame's hook: no effect
    assert compare_models(ref, tuned, [_x()], rtol=1e-10) == []
    assert seen == [{}]  # stem (frozen), b1, b2, shared, aux: all taken
    assert batch.folds == 1
    assert batch._folded == {}  # let go when the model returned
    assert tuned.shared.bn.weight.grad is not None


def test_forward_without_backward_then_training():
    ref, tuned = _models()
    x = [_x()]
    tuned(_x(3))  # graph never used
    assert compare_models(ref, tuned, x, rtol=1e-10) == []


def test_changes_between_forwards_are_seen():
    """No backward in between, so only the stamps can tell."""
    ref, tuned = _models()
    x = [_x()]
    tuned(_x(3))
    new_state = _models(seed=5)[0].state_dict()
    ref.load_state_dict(new_state)
    tuned.load_state_dict(new_state)
    assert compare_models(ref, tuned, x, rtol=1e-10) == []
    tuned(_x(3))
    for model in (ref, tuned):  # BN statistics change in train mode
        model.b1.train()
        model(_x(4))
        model.b1.eval()
        model.b1.bn.eps = 1e-2
    assert compare_models(ref, tuned, x, rtol=1e-10) == []
    tuned(_x(3))
    mean = torch.randn_like(ref.b1.bn.running_mean)
    for model in (ref, tuned):
        # a buffer replaced by a new tensor, a conv frozen
        model.b1.bn.running_mean = mean.clone()
        model.b1.conv.weight.requires_grad_(False)
    assert compare_models(ref, tuned, x, rtol=1e-10) == []
    assert tuned.b1.conv.weight.grad is None


def test_weight_changed_before_backward_is_refused_as_in_eval_mode():
    _, tuned = _models()
    loss = tuned(_x()).sum()
    with torch.no_grad():
        tuned.b1.conv.weight.mul_(2)
    with pytest.raises(RuntimeError, match='modified by an inplace'):
        loss.backward()


@pytest.mark.parametrize('reentrant', [True, False])
def test_checkpointing_folds_pairs_alone_and_matches(reentrant):
    ref, tuned = _models()
    for model in (ref, tuned):
        forward = model.forward

        def checkpointed(x, model=model):
            x = model.b1(model.stem(x))
            x = checkpoint(
                lambda t: model.shared(model.b2(t)),
                x,
                use_reentrant=reentrant,
            )
            return model.head(model.shared(x))

        model.forward = checkpointed
    x = [_x().requires_grad_()]
    assert compare_models(ref, tuned, x, rtol=1e-10) == []
    del forward


def test_no_grad_and_frozen_pairs_fold_in_a_batch_without_autograd():
    ref, tuned = _models()
    (batch,) = _batches(tuned)
    with torch.no_grad():
        torch.testing.assert_close(tuned(_x()), ref(_x()))
    assert batch.folds == 1
    for model in (ref, tuned):
        for p in model.parameters():
            p.requires_grad_(False)
    out = tuned(_x())
    assert out.grad_fn is None
    torch.testing.assert_close(out, ref(_x()))
    assert batch.folds == 2


def test_batch_false_and_auto_on_cpu_fold_pairs_alone():
    for batch_arg in (False, 'auto'):
        ref, tuned = _models(batch=batch_arg)
        batches = _batches(tuned)
        assert compare_models(ref, tuned, [_x()], rtol=1e-10) == []
        assert all(b.folds == 0 for b in batches)


def test_bad_batch_argument_is_named():
    with pytest.raises(ValueError, match="got 'yes'"):
        turn_on_fast_conv_bn_eval(Net(), batch='yes')


def _members(batch):
    return {(id(conv), id(bn)) for conv, bn, _ in batch.members}


@pytest.mark.parametrize('how', ['deepcopy', 'pickle'])
def test_a_copy_has_its_own_batch_of_its_own_pairs_and_stays_exact(how):
    ref, tuned = _models()
    if how == 'deepcopy':
        copied = copy.deepcopy(tuned)
    else:
        copied = pickle.loads(pickle.dumps(tuned))
    (batch,) = _batches(copied)
    assert batch is not _batches(tuned)[0]
    copied_pairs = {
        (id(m.conv), id(m.bn))
        for m in copied.modules()
        if isinstance(m, Block)
    }
    assert _members(batch) == copied_pairs  # the aux pair too
    for conv, bn, _ in batch.members:
        (pair,) = [p for p in tune_pairs(copied) if p.conv is conv]
        assert batch.members[pair.index][:2] == (conv, bn)
    assert compare_models(ref, copied, [_x()], rtol=1e-10) == []
    assert batch.folds == 1
    assert compare_models(ref, tuned, [_x()], rtol=1e-10) == []


@pytest.mark.parametrize('how', ['deepcopy', 'pickle'])
def test_a_copy_of_one_block_holds_that_block_not_the_model(how):
    ref, tuned = _models()
    if how == 'deepcopy':
        block = copy.deepcopy(tuned.b1)
    else:
        block = pickle.loads(pickle.dumps(tuned.b1))
    (pair,) = tune_pairs(block)
    assert pair.batch.members == [(block.conv, block.bn, 'b1.conv')]
    assert pair.index == 0
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(block(x), ref.b1(x), rtol=1e-12, atol=1e-12)
    (count,) = [pair.counts()[0]]
    assert count == 1  # a block called alone folds alone


def _ddp_hook_batching(tmp):
    from torch.nn.parallel import DistributedDataParallel

    from mmtune.engine.hooks.fast_conv_bn_eval_hook import (
        FastConvBNEvalHook,
    )

    dist.init_process_group(
        'gloo', init_method=f'file://{tmp}/store', rank=0, world_size=1
    )
    for find_unused, expected in ((True, 0), (False, 1)):
        model = Net()
        wrapped = DistributedDataParallel(
            model, find_unused_parameters=find_unused
        )
        runner = types.SimpleNamespace(
            model=wrapped, logger=logging.getLogger('test')
        )
        hook = FastConvBNEvalHook()
        hook.before_train(runner)
        assert len(hook.report.converted) == 5
        assert len(_batches(model)) == expected
        del wrapped, runner, hook
    gc.collect()  # the reducers go before the group
    dist.destroy_process_group()


def test_hook_turns_batching_off_for_ddp_looking_for_unused(tmp_path):
    run_isolated(_ddp_hook_batching, str(tmp_path))


def test_hook_refuses_a_bad_batch_value():
    from mmtune.engine.hooks.fast_conv_bn_eval_hook import (
        FastConvBNEvalHook,
    )

    with pytest.raises(ValueError, match="got 'sometimes'"):
        FastConvBNEvalHook(batch='sometimes')
