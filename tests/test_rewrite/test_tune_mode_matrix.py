# Copyright (c) mmtune contributors. All rights reserved.
"""Tune mode equals eval mode: outputs, every gradient, an optimizer step
and a second forward, over conv types, bias, affine, groups, padding modes,
transposed convs and autocast; plus run-time train/eval switches."""

import copy
import itertools

import pytest
import torch
from torch import nn

from mmtune import turn_off_fast_conv_bn_eval, turn_on_fast_conv_bn_eval
from mmtune.testing import (
    compare_models,
    forward_backward,
    max_relative_error,
    randomize_bn,
)

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TCONVS = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BNS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class ConvBNAct(nn.Module):
    def __init__(self, dim, bias, affine, groups, padding_mode, transposed):
        super().__init__()
        if transposed:
            self.conv = TCONVS[dim](
                4, 6, 3, stride=2, padding=1, groups=groups, bias=bias
            )
        else:
            self.conv = CONVS[dim](
                4,
                6,
                3,
                padding=1,
                groups=groups,
                bias=bias,
                padding_mode=padding_mode,
            )
        self.bn = BNS[dim](6, affine=affine)
        self.head = CONVS[dim](6, 3, 1)

    act = staticmethod(torch.relu)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))))


def _cases():
    for dim, bias, affine, groups, transposed in itertools.product(
        (1, 2, 3), (True, False), (True, False), (1, 2), (False, True)
    ):
        modes = ('zeros',) if transposed else ('zeros', 'reflect', 'circular')
        for padding_mode in modes:
            yield dim, bias, affine, groups, padding_mode, transposed


CASES = list(_cases())


def _build(case, seed=0):
    torch.manual_seed(seed)
    model = ConvBNAct(*case)
    randomize_bn(model, seed)
    with torch.no_grad():
        if model.conv.bias is not None:
            model.conv.bias.normal_()
    return model


def _input(dim, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((2, 4) + (5,) * dim, generator=gen)


def _step(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.step()


@pytest.mark.parametrize('batch', [False, True], ids=['alone', 'batched'])
@pytest.mark.parametrize(
    'case', CASES, ids=['-'.join(map(str, c)) for c in CASES]
)
def test_forward_backward_step_matches_eval(case, batch):
    ref = _build(case).eval()
    tuned = copy.deepcopy(ref)
    report = turn_on_fast_conv_bn_eval(tuned, batch=batch)
    assert report.converted == [('conv', 'bn')], str(report)
    x = [_input(case[0])]
    assert compare_models(ref, tuned, x, rtol=1e-5) == []
    _step(ref)
    _step(tuned)
    # second forward after an optimizer step (weights changed in place)
    assert compare_models(ref, tuned, x, rtol=1e-5) == []


AUTOCAST_CASES = [
    # dim, bias, affine, groups, padding_mode, transposed
    (2, True, True, 1, 'zeros', False),
    (1, False, True, 1, 'zeros', False),
    (2, False, False, 2, 'reflect', False),
    (3, True, False, 1, 'zeros', False),
    (2, False, True, 1, 'zeros', True),
    (2, True, True, 2, 'zeros', True),
]


@pytest.mark.parametrize('batch', [False, True], ids=['alone', 'batched'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    'case',
    AUTOCAST_CASES,
    ids=['-'.join(map(str, c)) for c in AUTOCAST_CASES],
)
def test_autocast_matches_eval(case, dtype, batch):
    """Under autocast tune mode is as accurate as eval mode.

    Both round differently in low precision, so each is compared with
    the float64 result: tune mode's error may not exceed three times eval
    mode's, or the dtype's floor where eval mode happens to be closer.
    """
    if dtype == torch.float16 and not _cpu_autocast_supports(dtype):
        pytest.skip('this torch has no float16 CPU autocast')
    ref = _build(case).eval()
    # A smooth activation: at a ReLU, a pre-activation within rounding of
    # zero flips its gradient mask in one mode and not in the other, an
    # error of order one in either mode (seen with bf16 in eval mode and
    # with fp16 in tune mode) that says nothing about the fold.
    ref.act = torch.tanh
    tuned = copy.deepcopy(ref)
    turn_on_fast_conv_bn_eval(tuned, batch=batch)
    truth = copy.deepcopy(ref).double()
    x = _input(case[0])
    expected = _results(truth, x.double(), None)
    evals = _results(ref, x, dtype)
    tunes = _results(tuned, x, dtype)
    floor = 3e-2 if dtype == torch.bfloat16 else 2e-2
    assert expected.keys() == tunes.keys() == evals.keys()
    for name, want in expected.items():
        err_eval = max_relative_error(evals[name], want)
        err_tune = max_relative_error(tunes[name], want)
        assert err_tune <= max(3 * err_eval, floor), (name, err_tune, err_eval)


def _results(model, x, dtype):
    """Output, parameter and input gradients, under autocast if dtype."""
    with torch.autocast(
        'cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None
    ):
        outs, grads, input_grads = forward_backward(model, [x])
    results = {'grad of ' + name: g for name, g in grads.items()}
    results.update(output=outs[0], input_grad=input_grads[0])
    return results


def test_inference_mode_then_training():
    """Tensors made under inference_mode must not leak into training."""
    case = (2, False, True, 1, 'zeros', False)
    ref = _build(case).eval()
    tuned = copy.deepcopy(ref)
    turn_on_fast_conv_bn_eval(tuned)
    x = [_input(2)]
    with torch.inference_mode():
        torch.testing.assert_close(tuned(x[0]), ref(x[0]))
    assert compare_models(ref, tuned, x, rtol=1e-5) == []
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert compare_models(ref, tuned, x, rtol=3e-2) == []


def _cpu_autocast_supports(dtype):
    try:
        with torch.autocast('cpu', dtype=dtype):
            return True
    except (RuntimeError, AssertionError):
        return False


def test_train_eval_switches_at_run_time():
    case = (2, False, True, 1, 'zeros', False)
    ref = _build(case)
    tuned = copy.deepcopy(ref)
    turn_on_fast_conv_bn_eval(tuned)  # turned on in train mode
    x = [_input(2)]
    for mode in (True, False, True, False):
        ref.train(mode)
        tuned.train(mode)
        assert compare_models(ref, tuned, x, rtol=1e-5) == [], mode
        # in train mode the BN updates its running statistics as usual
        torch.testing.assert_close(tuned.bn.running_mean, ref.bn.running_mean)
        torch.testing.assert_close(tuned.bn.running_var, ref.bn.running_var)
        assert tuned.bn.num_batches_tracked == ref.bn.num_batches_tracked
    # only the BN switched back to train mode (norm_eval style, inverted)
    ref.eval()
    tuned.eval()
    ref.bn.train()
    tuned.bn.train()
    assert compare_models(ref, tuned, x, rtol=1e-5) == []


def test_conv_output_not_kept_for_backward():
    """The point of tune mode: autograd no longer saves the conv output."""
    case = (2, False, True, 1, 'zeros', False)
    model = _build(case).eval()
    x = torch.randn(2, 4, 16, 16, requires_grad=True)

    def saved_activations(m):
        """Distinct saved tensors of the conv output's size."""
        saved = {}

        def pack(t):
            if t.shape == (2, 6, 16, 16):
                saved[t.data_ptr()] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x).sum()
        return len(saved)

    eval_count = saved_activations(model)
    turn_on_fast_conv_bn_eval(model)
    # eval mode keeps the conv output (for the BN) and the ReLU output;
    # tune mode only the ReLU output
    assert saved_activations(model) == eval_count - 1


def test_turn_off_restores_original_behaviour():
    case = (2, True, True, 1, 'zeros', False)
    ref = _build(case).eval()
    tuned = copy.deepcopy(ref)
    turn_on_fast_conv_bn_eval(tuned)
    assert 'forward' in tuned.conv.__dict__
    assert turn_off_fast_conv_bn_eval(tuned) == 2
    assert 'forward' not in tuned.conv.__dict__
    assert 'forward' not in tuned.bn.__dict__
    x = [_input(2)]
    assert compare_models(ref, tuned, x, rtol=0) == []


def test_no_grad_cache_follows_weight_changes():
    case = (2, True, True, 1, 'zeros', False)
    ref = _build(case).eval()
    tuned = copy.deepcopy(ref)
    turn_on_fast_conv_bn_eval(tuned)
    x = _input(2)
    for _ in range(2):
        with torch.no_grad():
            torch.testing.assert_close(tuned(x), ref(x))
            for model in (ref, tuned):
                model.conv.weight.mul_(1.5)
                model.bn.running_var.add_(0.25)
                model.bn.weight.add_(0.1)
    ref.bn.running_mean = torch.randn(6)
    tuned.bn.running_mean = ref.bn.running_mean.clone()
    with torch.no_grad():
        torch.testing.assert_close(tuned(x), ref(x))
