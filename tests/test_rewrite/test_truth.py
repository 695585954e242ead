# Copyright (c) mmtune contributors. All rights reserved.
"""Tune mode folds exactly what it reports, and nothing it folds outlives
the values it came from: helper-method frames, writes through ``.data``,
keyword calls, hooks and modules changed after turn-on, the counters.

Every case compares outputs and all gradients with eval mode (float64,
random BN statistics) and counts ``F.batch_norm`` calls to tell whether the
pairs really folded."""

import collections
import copy
import enum
import pickle
import random
import warnings

import numpy
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmtune import turn_on_fast_conv_bn_eval
from mmtune.testing import (
    compare_models,
    count_batch_norm_calls,
    fold_batches,
    randomize_bn,
)

BATCH = [False, True]


def _x(*shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*(shape or (2, 3, 6, 6)), generator=gen).double()


def _prepare(model, seed=0):
    torch.manual_seed(seed)
    for m in model.modules():
        for p in m.parameters(recurse=False):
            with torch.no_grad():
                p.normal_(0, 0.5)
    randomize_bn(model, seed)
    return model.double().eval()


def _tuned(model, batch=False, expect=None):
    ref = copy.deepcopy(model)
    report = turn_on_fast_conv_bn_eval(model, batch=batch)
    if expect is not None:
        assert len(report.converted) == expect, str(report)
    return ref, model, report


def _check(ref, tuned, x, report, folded=True):
    """Outputs and all gradients equal eval mode's; every converted pair
    folded at every call (or, with ``folded=False``, none folded)."""
    report.reset_counts()
    assert compare_models(ref, tuned, [x], rtol=1e-10) == []
    with count_batch_norm_calls() as counter:
        tuned(x)
    counts = report.fold_counts()
    if folded:
        assert all(not c.computed and c.folded for c in counts.values()), (
            report.runtime_summary()
        )
        assert counter.calls == 0  # every BN of these models is a pair's
    return counter


class TorchvisionStyle(nn.Module):
    """``forward -> self._forward_impl``, as torchvision's ResNet."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def _forward_impl(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(x))

    def forward(self, x):
        return self._forward_impl(x)


class TimmStyle(nn.Module):
    """``forward -> self.forward_features`` and ``forward_head``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward_features(self, x):
        return torch.tanh(self.norm(self.stem(x)))

    def forward_head(self, x):
        return self.head(x.mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@pytest.mark.parametrize('batch', BATCH)
@pytest.mark.parametrize('cls', [TorchvisionStyle, TimmStyle])
def test_helper_method_frames_fold(cls, batch):
    ref, tuned, report = _tuned(_prepare(cls()), batch)
    assert report.converted
    counter = _check(ref, tuned, _x(), report)
    assert counter.calls == 0
    assert report.runtime_summary().startswith(
        f'mmtune tune mode: {len(report.converted)} of '
        f'{len(report.converted)} converted pairs folded at every call'
    )


class ConstantArgHelper(nn.Module):
    """The helper's BN depends on an argument that forward passes as a
    constant: the trace sees only ``use_bn=True``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def _impl(self, x, use_bn):
        y = self.conv(x)
        return self.bn(y) if use_bn else y

    def forward(self, x):
        return self._impl(x, True)


def test_helper_called_from_elsewhere_computes_as_the_modules_do():
    ref, tuned, report = _tuned(_prepare(ConstantArgHelper()), expect=1)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(tuned._impl(x, False), ref._impl(x, False))
        torch.testing.assert_close(tuned._impl(x, True), ref._impl(x, True))
        torch.testing.assert_close(tuned(x), ref(x))
    (count,) = report.fold_counts().values()
    assert count.folded == 1
    assert count.computed == {
        'called from outside the forward that the analysis traced': 2
    }
    assert report.never_folded() == []


class Block(nn.Module):
    def __init__(self, cin=3, cout=4):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = Block(3, 4)
        self.trained = Block(4, 4)
        for p in self.frozen.parameters():
            p.requires_grad_(False)  # like frozen_stages

    def forward(self, x):
        return self.trained(self.frozen(x))


def _writes():
    """In-place writes that no version counter sees, and replacements."""

    def conv_mul(m):
        m.conv.weight.data.mul_(torch.rand_like(m.conv.weight) > 0.3)

    def conv_copy(m):
        m.conv.weight.data.copy_(torch.randn_like(m.conv.weight))

    def conv_assign(m):
        m.conv.weight.data = torch.randn_like(m.conv.weight)

    def conv_set(m):
        with torch.no_grad():
            m.conv.weight.set_(torch.randn_like(m.conv.weight))

    def bn_weight(m):
        m.bn.weight.data.add_(0.7)

    def running_var(m):
        m.bn.running_var.data.mul_(3.0)

    def running_mean_assign(m):
        m.bn.running_mean.data = torch.randn_like(m.bn.running_mean)

    return [
        conv_mul,
        conv_copy,
        conv_assign,
        conv_set,
        bn_weight,
        running_var,
        running_mean_assign,
    ]


@pytest.mark.parametrize('batch', BATCH)
@pytest.mark.parametrize('write', _writes(), ids=lambda f: f.__name__)
def test_writes_through_data_are_seen_by_the_next_forward(write, batch):
    ref, tuned, report = _tuned(_prepare(Net()), batch, expect=2)
    x = _x()
    # training steps (a frozen pair and a trained one), then validation
    for step in range(2):
        _check(ref, tuned, x, report)
        with torch.no_grad():
            torch.testing.assert_close(tuned(x), ref(x))
        torch.manual_seed(step)
        for model in (ref, tuned):
            torch.manual_seed(step)
            write(model.frozen)
            torch.manual_seed(step + 10)
            write(model.trained)
    with torch.no_grad():
        torch.testing.assert_close(tuned(x), ref(x))
    _check(ref, tuned, x, report)


class Keywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2)
        self.bn_up = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(input=self.conv(input=x))
        size = (2 * y.shape[-2] + 1, 2 * y.shape[-1] + 1)
        return self.bn_up(self.up(input=y, output_size=size))


@pytest.mark.parametrize('batch', BATCH)
def test_keyword_calls_fold(batch):
    ref, tuned, report = _tuned(_prepare(Keywords()), batch, expect=2)
    assert _check(ref, tuned, _x(), report).calls == 0


def test_conv_called_with_bad_arguments_raises_as_without_mmtune():
    ref, tuned, _ = _tuned(_prepare(Block()), expect=1)
    for model in (ref, tuned):
        with pytest.raises(TypeError):
            model.conv(_x(), 3)
        with pytest.raises(TypeError):
            model.conv(inputs=_x())


def _after_turn_on_changes():
    def bn_replaced(m):
        new = nn.BatchNorm2d(4).double().eval()
        randomize_bn(new, 7)
        m.block.bn = new

    def conv_replaced(m):
        torch.manual_seed(3)
        m.block.conv = nn.Conv2d(3, 4, 3, padding=1).double()

    def conv_retyped(m):
        class Doubled(nn.Conv2d):
            def forward(self, x):
                return super().forward(x) * 2

        m.block.conv.__class__ = Doubled

    def bn_wrapped(m):
        bn = m.block.bn
        inner = bn.forward
        bn.forward = lambda x: inner(x * 0.5)

    def conv_forward_hook(m):
        m.block.conv.register_forward_hook(lambda mod, i, o: o * 3)

    def bn_pre_hook(m):
        m.block.bn.register_forward_pre_hook(lambda mod, i: (i[0] + 1,))

    def bn_backward_hook(m):
        m.block.bn.register_full_backward_hook(
            lambda mod, gi, go: (gi[0] * 2,)
        )

    return [
        bn_replaced,
        conv_replaced,
        conv_retyped,
        bn_wrapped,
        conv_forward_hook,
        bn_pre_hook,
        bn_backward_hook,
    ]


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        return self.block(x)


@pytest.mark.parametrize('batch', BATCH)
@pytest.mark.parametrize(
    'change', _after_turn_on_changes(), ids=lambda f: f.__name__
)
def test_changes_after_turn_on_compute_as_the_modules_do(change, batch):
    ref, tuned, report = _tuned(_prepare(Holder()), batch, expect=1)
    _check(ref, tuned, _x(), report)
    for model in (ref, tuned):
        change(model)
    with _no_warning():
        _check(ref, tuned, _x(), report, folded=False)
    (count,) = report.fold_counts().values()
    assert count.folded == 0
    if count.calls:  # a replaced conv is not called any more
        assert report.never_folded() == [('block.conv', 'block.bn')]


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter('error', RuntimeWarning)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


@pytest.mark.parametrize('batch', BATCH)
def test_global_hooks_stop_folding_while_registered(batch):
    from torch.nn.modules.module import register_module_forward_hook

    ref, tuned, report = _tuned(_prepare(Holder()), batch, expect=1)
    seen = []
    handle = register_module_forward_hook(
        lambda mod, i, o: seen.append(type(mod).__name__)
    )
    try:
        _check(ref, tuned, _x(), report, folded=False)
        assert 'Conv2d' in seen and 'BatchNorm2d' in seen
        assert report.never_folded() == [('block.conv', 'block.bn')]
    finally:
        handle.remove()
    _check(ref, tuned, _x(), report)


@pytest.mark.parametrize('batch', BATCH)
@pytest.mark.parametrize('style', ['old', 'parametrize'])
def test_weight_norm_on_the_conv_still_folds_exactly(style, batch):
    """A conv forward pre-hook (old weight_norm) or a parametrized weight
    (new weight_norm), before or after turn-on: the fold reads the weight
    the conv's own forward would read."""
    if style == 'old':
        wn = torch.nn.utils.weight_norm
    else:
        wn = torch.nn.utils.parametrizations.weight_norm
    for when in ('before', 'after'):
        # two equal models (old-style weight norm cannot be deep-copied)
        ref, tuned = _prepare(Holder()), _prepare(Holder())
        if when == 'before':
            wn(ref.block.conv)
            wn(tuned.block.conv)
        report = turn_on_fast_conv_bn_eval(tuned, batch=batch)
        assert report.converted == [('block.conv', 'block.bn')]
        if when == 'after':
            wn(ref.block.conv)
            wn(tuned.block.conv)
        _check(ref, tuned, _x(), report)


def test_an_interrupted_forward_leaves_nothing_behind():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.fail = False

        def forward(self, x):
            y = self.conv(x)
            if self.fail:
                raise MemoryError('out of memory (simulated)')
            return self.bn(y)

    ref, tuned, report = _tuned(_prepare(Fails()), expect=1)
    tuned.fail = True
    with pytest.raises(MemoryError):
        tuned(_x())
    tuned.fail = False
    with _no_warning():
        _check(ref, tuned, _x(), report)


@pytest.mark.parametrize('batch', BATCH)
@pytest.mark.parametrize('reentrant', [True, False])
def test_checkpointed_helpers_fold_in_both_passes(reentrant, batch):
    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Block(3, 4)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def _inner(self, x):
            return torch.relu(self.bn(self.conv(x)))

        def forward(self, x):
            x = self.a(x)
            return checkpoint(self._inner, x, use_reentrant=reentrant)

    ref, tuned, report = _tuned(_prepare(Checkpointed()), batch, expect=2)
    x = _x().requires_grad_()
    _check(ref, tuned, x, report)
    counts = report.fold_counts()
    # forward and recomputation, then _check's counting forward
    assert counts[('conv', 'bn')].folded == 3


def test_train_mode_calls_are_counted_with_their_reason():
    ref, tuned, report = _tuned(_prepare(Holder()), expect=1)
    for model in (ref, tuned):
        model.train()
    x = _x()
    assert compare_models(ref, tuned, [x], rtol=1e-10) == []
    summary = report.runtime_summary()
    assert summary.splitlines()[0] == (
        'mmtune tune mode: 0 of 1 converted pairs folded at every call'
    )
    assert 'the BN is in train mode' in summary
    report.reset_counts()
    assert report.runtime_summary().endswith('1 were not called')


@pytest.mark.parametrize('batch', BATCH)
def test_pickled_and_deep_copied_models_fold(batch):
    _, tuned, _ = _tuned(_prepare(TorchvisionStyle()), batch, expect=2)
    for copied in (pickle.loads(pickle.dumps(tuned)), copy.deepcopy(tuned)):
        ref = copy.deepcopy(_prepare(TorchvisionStyle()))
        ref.load_state_dict(copied.state_dict())
        report = turn_on_fast_conv_bn_eval(copied, batch=batch)
        assert report.already_on == 2
        _check(ref, copied, _x(), report)
        if batch:
            (fold_batch,) = fold_batches(copied)
            assert fold_batch.folds >= 1


@pytest.mark.parametrize('batch', BATCH)
def test_a_model_on_the_meta_device_folds_as_eval_mode_runs(batch):
    """A device type without autocast (``'meta'``, for shape inference):
    torch raises on asking whether autocast is on there, so tune mode must
    not ask."""
    ref = TorchvisionStyle().to('meta').eval()
    tuned = copy.deepcopy(ref)
    report = turn_on_fast_conv_bn_eval(tuned, batch=batch)
    x = torch.empty(2, 3, 6, 6, device='meta', requires_grad=True)
    outs = [model(x) for model in (ref, tuned)]
    assert outs[1].shape == outs[0].shape and outs[1].is_meta
    outs[1].sum().backward()
    assert tuned.conv1.weight.grad.shape == tuned.conv1.weight.shape
    assert tuned.bn2.weight.grad.shape == (4,)
    counts = report.fold_counts()
    assert all(c.folded == 1 and not c.computed for c in counts.values())


class _ConvBN(nn.Module):
    """A conv and its BN, for the forwards below to use as they like."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)


# --------------------------- Python state the trace could not see through
class DomainBN(nn.Module):
    """The BN is chosen by an attribute (domain-specific BN)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bns = nn.ModuleList([nn.BatchNorm2d(4), nn.BatchNorm2d(4)])
        self.domain = 0

    def forward(self, x):
        return self.bns[self.domain](self.conv(x))


class Flags(_ConvBN):
    """Branches on attributes that can change after turn-on."""

    def __init__(self):
        super().__init__()
        self.scale_pre = False
        self.return_pre = False

    def forward(self, x):
        z = self.conv(x)
        if self.scale_pre:
            z = z * 2
        y = self.bn(z)
        return (y, z) if self.return_pre else y


def _computed_reasons(report):
    return [r for c in report.fold_counts().values() for r in c.computed]


@pytest.mark.parametrize('batch', BATCH)
def test_a_bn_chosen_by_an_attribute_folds_only_while_it_is_traced_one(
    batch,
):
    ref, tuned, report = _tuned(_prepare(DomainBN()), batch, expect=1)
    assert report.converted == [('conv', 'bns.0')]
    x = _x()
    _check(ref, tuned, x, report)
    ref.domain = tuned.domain = 1
    report.reset_counts()
    assert compare_models(ref, tuned, [x], rtol=1e-10) == []
    (reason,) = set(_computed_reasons(report))
    assert "attribute 'domain' is 1" in reason and 'traced with 0' in reason
    ref.domain = tuned.domain = 0
    _check(ref, tuned, x, report)


@pytest.mark.parametrize('batch', BATCH)
@pytest.mark.parametrize('flag', ['scale_pre', 'return_pre'])
def test_flags_changed_after_turn_on_compute_as_the_modules_do(flag, batch):
    ref, tuned, report = _tuned(_prepare(Flags()), batch, expect=1)
    x = _x()
    for model in (ref, tuned):
        setattr(model, flag, True)
    report.reset_counts()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no divergence: not folded at all
        outs = [model(x) for model in (ref, tuned)]
    for a, b in zip(*[o if isinstance(o, tuple) else (o,) for o in outs]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert compare_models(ref, tuned, [x], rtol=1e-10) == []
    assert all(flag in r for r in _computed_reasons(report))
    for model in (ref, tuned):
        setattr(model, flag, False)
    _check(ref, tuned, x, report)


class Stores(nn.Module):
    """Keeps the conv output (or a value computed from it) on itself,
    where the traced dataflow does not show it."""

    def __init__(self, how):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.feats = []
        self.how = how

    def forward(self, x):
        x = self.conv(x)
        if self.how == 'append':
            self.feats.append(x)
        elif self.how == 'derived':
            self.feats.append(x.detach().mean())
        else:
            self.pre = x
        return self.bn(x)


@pytest.mark.parametrize('how', ['append', 'derived', 'attribute'])
def test_a_conv_output_stored_on_the_frame_is_not_paired(how):
    model = _prepare(Stores(how))
    report = turn_on_fast_conv_bn_eval(model)
    assert report.converted == [] and len(report.skipped) == 1
    # the analysis's traces left the frame as they found it
    assert model.feats == [] and 'pre' not in model.__dict__
    ref = _prepare(Stores(how))
    ref.load_state_dict(model.state_dict())
    assert compare_models(ref, model, [_x()], rtol=1e-12) == []


class Counts(_ConvBN):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.bn(self.conv(x))


def test_a_forward_that_changes_what_it_reads_is_skipped_and_left_alone():
    model = _prepare(Counts())
    report = turn_on_fast_conv_bn_eval(model)
    assert report.converted == []
    assert "changes the attribute 'calls'" in str(report)
    assert model.calls == 0


@pytest.mark.parametrize('batch', BATCH)
def test_an_unbatched_input_computes_as_the_modules_do(batch):
    """An unbatched ``(C, L)`` input of a Conv1d: its BatchNorm1d takes the
    conv's output channels for a batch, which folding cannot reproduce."""

    class Seq1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 5, 3, padding=1)
            self.bn = nn.BatchNorm1d(5)

        def forward(self, x):
            return self.bn(self.conv(x))

    ref, tuned, report = _tuned(_prepare(Seq1d()), batch, expect=1)
    x = _x(3, 5)
    assert compare_models(ref, tuned, [x], rtol=1e-12) == []
    assert all('unbatched' in r for r in _computed_reasons(report))
    _check(ref, tuned, _x(2, 3, 5), report)  # a batch folds
    # where eval mode raises, tune mode raises the same
    ref2, tuned2, _ = _tuned(_prepare(TorchvisionStyle()), batch, expect=2)
    for model in (ref2, tuned2):
        with pytest.raises(ValueError, match='expected 4D input'):
            model(_x(3, 6, 6))


@pytest.mark.parametrize('batch', BATCH)
def test_a_model_made_under_inference_mode_runs_there(batch):
    with torch.inference_mode():
        ref = _prepare(TorchvisionStyle())
        tuned = copy.deepcopy(ref)
        report = turn_on_fast_conv_bn_eval(tuned, batch=batch)
        torch.testing.assert_close(tuned(_x()), ref(_x()))
    counts = report.fold_counts()
    assert all(c.folded == 1 for c in counts.values())


class ClampsInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        with torch.no_grad():  # in place, after the batch folded
            self.conv2.weight.clamp_(-0.2, 0.2)
            self.bn2.weight.clamp_(-0.9, 0.9)
        return self.bn2(self.conv2(x))


@pytest.mark.parametrize('batch', BATCH)
def test_parameters_changed_in_place_inside_the_forward(batch):
    ref, tuned, report = _tuned(_prepare(ClampsInForward()), batch, expect=2)
    _check(ref, tuned, _x(), report)


class Interrupted(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.interrupt = False

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        if self.interrupt:
            raise KeyboardInterrupt  # Ctrl-C: no forward hook runs
        return self.bn2(self.conv2(x))


def _interrupt_then_write(ref, tuned, pair_of):
    """Interrupt a call of ``tuned``, then write the conv weight and BN
    variance that ``pair_of(model)`` gives of both models through ``.data``
    (an EMA-style swap: it bumps no version, only a new fold sees it)."""
    tuned.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        tuned(_x())
    tuned.interrupt = False
    with torch.no_grad():
        for model in (ref, tuned):
            conv, bn = pair_of(model)
            conv.weight.data.mul_(-2.0)
            bn.running_var.data.mul_(3.0)


@pytest.mark.parametrize('batch', BATCH)
def test_a_call_interrupted_by_keyboard_interrupt_leaves_nothing_stale(
    batch,
):
    ref, tuned, report = _tuned(_prepare(Interrupted()), batch, expect=2)
    _interrupt_then_write(ref, tuned, lambda m: (m.conv2, m.bn2))
    _check(ref, tuned, _x(), report)
    if batch:
        (fold_batch,) = fold_batches(tuned)
        assert fold_batch.folds >= 2  # the next calls batch again


class InterruptedBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1, self.block2 = Block(), Block(4, 4)
        self.interrupt = False

    def forward(self, x):
        x = self.block1(x)
        if self.interrupt:
            raise KeyboardInterrupt  # after the batch folded block2 too
        return self.block2(x)


@pytest.mark.parametrize('batch', BATCH)
def test_a_block_called_alone_after_an_interrupted_call_takes_nothing_of_it(
    batch,
):
    ref, tuned, report = _tuned(_prepare(InterruptedBlocks()), batch, expect=2)
    _interrupt_then_write(ref, tuned, lambda m: (m.block2.conv, m.block2.bn))
    x = _x(2, 4, 6, 6)
    torch.testing.assert_close(
        tuned.block2(x), ref.block2(x), rtol=1e-12, atol=1e-12
    )
    _check(ref, tuned, _x(), report)


_GLOBAL_FLAGS = {'skip_bn': False}
_RETURN_PRE = False


class GlobalBranch(_ConvBN):
    """Branches on a module global (a dict's item)."""

    def forward(self, x):
        z = self.conv(x)
        return z if _GLOBAL_FLAGS['skip_bn'] else self.bn(z)


class GlobalReturn(_ConvBN):
    """Returns the conv output beside the BN's when a global flag is set:
    its BN still receives the conv output, so only the watched global can
    tell that the folded output would be returned."""

    def forward(self, x):
        z = self.conv(x)
        y = self.bn(z)
        return (y, z) if _RETURN_PRE else y


@pytest.mark.parametrize('batch', BATCH)
@pytest.mark.parametrize('cls', [GlobalBranch, GlobalReturn])
def test_globals_changed_after_turn_on_compute_as_the_modules_do(cls, batch):
    global _RETURN_PRE
    ref, tuned, report = _tuned(_prepare(cls()), batch, expect=1)
    x = _x()
    _check(ref, tuned, x, report)
    _GLOBAL_FLAGS['skip_bn'] = _RETURN_PRE = True
    try:
        report.reset_counts()
        with _no_warning():
            outs = [model(x) for model in (ref, tuned)]
            for a, b in zip(
                *[o if isinstance(o, tuple) else (o,) for o in outs]
            ):
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
            assert compare_models(ref, tuned, [x], rtol=1e-10) == []
        (reason,) = set(_computed_reasons(report))
        assert f'the global {__name__}.' in reason and 'traced with' in reason
    finally:
        _GLOBAL_FLAGS['skip_bn'] = _RETURN_PRE = False
    _check(ref, tuned, x, report)  # traced values again: folds again


class _State:
    skip_bn = False


_STATE = _State()


class ObjectBranch(_ConvBN):
    """Branches on an attribute of an object that no analysis watches."""

    def forward(self, x):
        z = self.conv(x)
        return z if _STATE.skip_bn else self.bn(z)


@pytest.mark.parametrize('batch', BATCH)
def test_a_call_that_returns_before_the_bn_is_warned_about_and_stops_it(
    batch,
):
    """The known limit: a branch on another object's attribute is decided
    at trace time. A call that returns while a conv's output never reached
    its BN is reported (that call's value was folded) and the pair stops
    folding."""
    ref, tuned, report = _tuned(_prepare(ObjectBranch()), batch, expect=1)
    _STATE.skip_bn = True
    try:
        with pytest.warns(RuntimeWarning, match='never reached bn'):
            tuned(_x())
        assert compare_models(ref, tuned, [_x()], rtol=1e-12) == []
    finally:
        _STATE.skip_bn = False
    report.reset_counts()
    assert compare_models(ref, tuned, [_x()], rtol=1e-12) == []
    assert all('diverged' in r for r in _computed_reasons(report))


def test_pickled_pairs_keep_watching_globals():
    ref, tuned, report = _tuned(_prepare(GlobalReturn()), False, expect=1)
    (pair,) = report.runtimes.values()
    assert pair.global_state == ((__name__, '_RETURN_PRE', False),)
    for copied in (pickle.loads(pickle.dumps(tuned)), copy.deepcopy(tuned)):
        (pair,) = [
            m.forward.__self__ for m in copied.modules() if m is copied.conv
        ]
        assert pair.global_state == ((__name__, '_RETURN_PRE', False),)


def _replicate(module, scale=1.5):
    """What ``nn.parallel.replicate`` does to each module, with the
    replica's own parameter copies (scaled, to tell which are used)."""
    modules = list(module.modules())
    replicas = [m._replicate_for_data_parallel() for m in modules]
    index = {id(m): i for i, m in enumerate(modules)}
    for m, r in zip(modules, replicas):
        for key, child in m._modules.items():
            r._modules[key] = replicas[index[id(child)]]
        for key, p in m._parameters.items():
            r._parameters[key] = None if p is None else p.detach() * scale
        for key, b in m._buffers.items():
            r._buffers[key] = None if b is None else b.clone()
    return replicas[0]


@pytest.mark.parametrize('batch', BATCH)
def test_data_parallel_replicas_compute_from_their_own_tensors(batch):
    ref, tuned, report = _tuned(_prepare(TorchvisionStyle()), batch, 2)
    replica = _replicate(tuned)
    assert not any('forward' in m.__dict__ for m in replica.modules())
    torch.testing.assert_close(_replicate(tuned)(_x()), _replicate(ref)(_x()))
    _check(ref, tuned, _x(), report)  # the original still folds
    from mmtune import turn_off_fast_conv_bn_eval

    turn_off_fast_conv_bn_eval(tuned)
    assert not any(
        '_replicate_for_data_parallel' in m.__dict__ for m in tuned.modules()
    )


class _Mode(enum.Enum):
    PLAIN = 'plain'
    TWICE = 'twice'


class EnumBranch(Flags):
    def __init__(self):
        super().__init__()
        self.mode = _Mode.PLAIN

    def forward(self, x):
        z = self.conv(x)
        if self.mode is _Mode.TWICE:
            z = z * 2
        return self.bn(z)


@pytest.mark.parametrize('batch', BATCH)
def test_an_enum_attribute_is_watched_like_a_flag(batch):
    ref, tuned, report = _tuned(_prepare(EnumBranch()), batch, expect=1)
    for model in (ref, tuned):
        model.mode = _Mode.TWICE
    report.reset_counts()
    assert compare_models(ref, tuned, [_x()], rtol=1e-10) == []
    assert all("'mode'" in r for r in _computed_reasons(report))


class TypeCheck(_ConvBN):
    """``type(self)`` must stay the frame's class while it is traced."""

    def forward(self, x):
        z = self.conv(x)
        y = self.bn(z)
        if type(self) is TypeCheck:
            y = y + z  # the conv output has a second consumer
        return y


_REGISTRY = []


class Registered(nn.Module):
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY.append(cls.__name__)


class RegisteredBlock(Registered):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.res = False

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.res and x.requires_grad:  # a traced branch
            y = y + x.mean()
        return y


class Stochastic(_ConvBN):
    """Draws random numbers in its forward (stochastic depth)."""

    def forward(self, x):
        y = self.bn(self.conv(x))
        drop = random.random() + numpy.random.rand() + torch.rand(1).item()
        return y if drop < 10 else y * 0


def test_the_analysis_leaves_classes_and_random_states_alone():
    report = turn_on_fast_conv_bn_eval(_prepare(TypeCheck()))
    assert report.converted == []  # type(self) is TypeCheck was traced
    before = list(_REGISTRY)
    stochastic, registered = Stochastic(), _prepare(RegisteredBlock())

    def seed_and_draw():
        random.seed(3)
        numpy.random.seed(3)
        torch.manual_seed(3)
        return random.random(), numpy.random.rand(), torch.rand(1).item()

    drawn = seed_and_draw()
    random.seed(3)
    numpy.random.seed(3)
    torch.manual_seed(3)
    report = turn_on_fast_conv_bn_eval(stochastic, batch=False)
    assert report.converted == [('conv', 'bn')]
    assert (random.random(), numpy.random.rand(), torch.rand(1).item()) == (
        drawn
    )
    report = turn_on_fast_conv_bn_eval(registered)
    assert report.converted == [('conv', 'bn')]
    assert _REGISTRY == before  # no subclass made


class Unusual(_ConvBN):
    """State the forward reads or keeps, of less common types."""

    def __init__(self):
        super().__init__()
        self.np_flag = numpy.bool_(False)
        self.size = torch.Size([4])
        self.cfg = {'res': False}
        self.k = 1
        self.od = collections.OrderedDict()
        self.dd = collections.defaultdict(list)
        self.nested = {'inputs': []}

    def forward(self, x):
        self.od['in'] = x
        self.dd['in'].append(x)
        self.nested['inputs'].append(x)
        z = self.conv(x)
        y = self.bn(z)
        if self.np_flag or len(self.size) == 2 or self.cfg['res']:
            y = y + z
        if self.k is True:
            y = y + z
        return y


@pytest.mark.parametrize(
    'change',
    [
        lambda m: setattr(m, 'np_flag', numpy.bool_(True)),
        lambda m: setattr(m, 'size', torch.Size([4, 4])),
        lambda m: m.cfg.__setitem__('res', True),
        lambda m: setattr(m, 'k', True),  # equal to 1, not the same
    ],
    ids=['numpy', 'size', 'dict-entry', 'one-to-true'],
)
def test_numpy_sizes_dicts_and_types_of_values_are_watched(change):
    ref, tuned, report = _tuned(_prepare(Unusual()), False, expect=1)
    # the traces put the containers back as they were
    assert not tuned.od and not tuned.dd and tuned.nested == {'inputs': []}
    for model in (ref, tuned):
        change(model)
    report.reset_counts()
    assert compare_models(ref, tuned, [_x()], rtol=1e-10) == []
    assert _computed_reasons(report)


class KeepsInDeque(_ConvBN):
    def __init__(self):
        super().__init__()
        self.recent = collections.deque(maxlen=2)

    def forward(self, x):
        z = self.conv(x)
        self.recent.append(z)
        return self.bn(z)


def test_a_conv_output_kept_in_a_deque_is_not_paired():
    model = _prepare(KeepsInDeque())
    assert turn_on_fast_conv_bn_eval(model).converted == []
    assert not model.recent


class Catches(nn.Module):
    """A model that catches a submodule's error, and falls back or
    retries."""

    def __init__(self, retry):
        super().__init__()
        self.inner = _Inner()
        self.retry = retry

    def forward(self, x, extra):
        try:
            return self.inner(x, extra)
        except RuntimeError:
            if self.retry:
                return self.inner(x, extra[..., :5])
            return x


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.lin = nn.Linear(5, 5)

    def forward(self, x, extra):
        z = self.conv(x)
        w = self.lin(extra)  # raises for an extra of the wrong width
        return self.bn(z) + w.mean()


@pytest.mark.parametrize('retry', [False, True])
def test_an_error_the_model_catches_is_no_divergence(retry):
    ref = _prepare(Catches(retry))
    tuned = copy.deepcopy(ref)
    report = turn_on_fast_conv_bn_eval(tuned, batch=False)
    x, good, bad = _x(2, 4, 5, 5), _x(2, 5, seed=2), _x(2, 7, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for extra in (bad, good, good):
            torch.testing.assert_close(tuned(x, extra), ref(x, extra))
    (count,) = report.fold_counts().values()
    assert not count.computed and count.folded == (4 if retry else 3)
