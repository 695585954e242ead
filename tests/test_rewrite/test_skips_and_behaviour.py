# Copyright (c) mmtune contributors. All rights reserved.
"""What cannot be done exactly is skipped and reported; everything else
about the model keeps working after the rewrite."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

from mmtune import (
    fuse_conv_bn,
    turn_off_fast_conv_bn_eval,
    turn_on_fast_conv_bn_eval,
)
from mmtune.testing import compare_models, randomize_bn


def _prepare(model, seed=0):
    torch.manual_seed(seed)
    randomize_bn(model, seed)
    return model.eval()


def _x(*shape, seed=3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _check_exact(model, inputs, rtol=1e-5):
    ref = copy.deepcopy(model)
    report = turn_on_fast_conv_bn_eval(model)
    assert compare_models(ref, model, inputs, rtol=rtol) == []
    return report


def _reasons(report):
    return {name: rec.reason for rec in report.skipped for name in rec.modules}


# ----------------------------------------------------------------- skips
class TwoConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class BNTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.bn(self.conv(x)))


class ConvTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(torch.relu(self.conv(x))))


class NotFromConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


class NoRunningStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


class WSConv2d(nn.Conv2d):
    """Weight standardisation: a conv subclass with its own forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (
            w.std((1, 2, 3), keepdim=True) + 1e-5
        )
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class OwnForwardConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = WSConv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class SharedConv(nn.Module):
    """The same conv called from two different modules."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Sequential(conv, nn.BatchNorm2d(4))
        self.b = nn.Sequential(conv, nn.BatchNorm2d(4))

    def forward(self, x):
        return self.a(x) + self.b(x)


SKIP_CASES = [
    (TwoConsumers, 'bn', 'used by 2 consumers'),
    (BNTwice, 'bn', 'applied more than once'),
    (ConvTwice, 'bn', 'called at several places'),
    (NotFromConv, 'bn', 'not a conv output'),
    (NoRunningStats, 'bn', 'no running statistics'),
    (OwnForwardConv, 'bn', 'has its own forward'),
    (SharedConv, 'a.1', 'called from several places'),
]


@pytest.mark.parametrize(
    'cls,bn_name,reason', SKIP_CASES, ids=[c[0].__name__ for c in SKIP_CASES]
)
def test_unsafe_pairs_are_skipped_and_reported(cls, bn_name, reason):
    model = _prepare(cls())
    inputs = [_x(2, 4 if cls is ConvTwice else 3, 6, 6)]
    report = _check_exact(model, inputs)
    assert report.converted == []
    assert reason in _reasons(report)[bn_name], str(report)
    assert 'skipped' in str(report)


class Untraceable(nn.Module):
    """Its forward loops over a tensor; its child is still covered, its own
    pairs are proved from its source where the source can prove them."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.inner(x)
        for _ in range(int(y.shape[0])):
            pass
        parts = [p for p in y]  # iterating a tensor cannot be traced
        y = self.bn(self.conv(torch.stack(parts)))
        z = self.conv2(y)
        return self.bn2(z) + z  # the conv output reaches more than the BN


def test_untraceable_frame_falls_back_to_children_and_its_source():
    model = _prepare(Untraceable())
    report = _check_exact(model, [_x(2, 3, 5, 5)])
    assert sorted(report.converted) == [('conv', 'bn'), ('inner.0', 'inner.1')]
    reason = _reasons(report)['bn2']
    assert 'could not be traced' in reason
    assert 'its source does not prove the pair' in reason


def test_transposed_conv_is_converted_exactly():
    model = _prepare(
        nn.Sequential(
            nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)
        )
    )
    report = _check_exact(model, [_x(2, 4, 5, 5)])
    assert report.converted == [('0', '1')]


def test_hooks_prevent_folding_and_keep_working():
    model = _prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    report = _check_exact(model, [_x(2, 3, 6, 6)])
    assert report.converted == []
    assert 'hooks' in _reasons(report)['1']
    # a hook added after turning on is honoured at run time
    model2 = _prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    ref = copy.deepcopy(model2)
    turn_on_fast_conv_bn_eval(model2)
    expected = ref[0](_x(2, 3, 6, 6))
    got = []
    model2[0].register_forward_hook(lambda m, i, o: got.append(o))
    model2(_x(2, 3, 6, 6))
    torch.testing.assert_close(got[0], expected)


# ------------------------------------------------------ control flow
class Dynamic(nn.Module):
    """Branches on self.training, requires_grad, a per-call argument and
    stochastic depth; checkpointing when asked."""

    def __init__(self, with_cp=False):
        super().__init__()
        self.with_cp = with_cp
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.drop_prob = 0.5

    def forward(self, x, scale=None):
        def inner(x):
            out = torch.relu(self.bn1(self.conv1(x)))
            if self.training and torch.rand(1).item() < self.drop_prob:
                return out  # stochastic depth
            out = self.bn2(self.conv2(out))
            if scale is not None:
                out = out * scale
            return out

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(inner, x, use_reentrant=False)
        return inner(x)


@pytest.mark.parametrize('with_cp', [False, True])
def test_control_flow_keeps_working(with_cp):
    model = _prepare(Dynamic(with_cp))
    ref = copy.deepcopy(model)
    report = turn_on_fast_conv_bn_eval(model)
    assert len(report.converted) == 2, str(report)
    x = [_x(2, 3, 6, 6)]
    assert compare_models(ref, model, x, rtol=1e-5) == []
    torch.testing.assert_close(model(x[0], scale=2.0), ref(x[0], scale=2.0))
    for mode in (True, False):  # train mode: stochastic depth, BN stats
        ref.train(mode)
        model.train(mode)
        for seed in range(4):
            torch.manual_seed(seed)
            expected = ref(x[0])
            torch.manual_seed(seed)
            torch.testing.assert_close(model(x[0]), expected)


class FrameWithWrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_instance_forward_wrappers_stay_in_effect():
    model = _prepare(FrameWithWrapper())
    calls = []
    original = model.forward

    def wrapper(x):
        calls.append(1)
        return original(x) * 2

    model.forward = wrapper
    ref = copy.deepcopy(model)
    report = turn_on_fast_conv_bn_eval(model)
    assert report.converted == []
    assert 'wrapper' in _reasons(report)['bn']
    torch.testing.assert_close(model(_x(1, 3, 5, 5)), ref(_x(1, 3, 5, 5)))
    assert calls

    conv_wrapped = _prepare(FrameWithWrapper())
    conv_wrapped.conv.forward = (
        lambda x: nn.Conv2d.forward(conv_wrapped.conv, x) + 1
    )
    report = turn_on_fast_conv_bn_eval(conv_wrapped)
    assert report.converted == []
    assert conv_wrapped.conv.forward(torch.zeros(1, 3, 3, 3)).min() > 0


# ------------------------------------------------ the model stays whole
def _resnetish():
    return _prepare(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
        )
    )


def test_state_dict_and_parameters_unchanged():
    model = _resnetish()
    keys = list(model.state_dict())
    params = list(model.parameters())
    turn_on_fast_conv_bn_eval(model)
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))
    # an optimizer built before the rewrite keeps training the model
    opt = torch.optim.SGD(params, lr=0.1)
    model(_x(1, 3, 5, 5)).sum().backward()
    before = params[0].detach().clone()
    opt.step()
    assert not torch.equal(before, params[0])


def test_idempotent():
    model = _resnetish()
    first = turn_on_fast_conv_bn_eval(model)
    forward = model[0].forward
    second = turn_on_fast_conv_bn_eval(model)
    assert second.converted == first.converted
    assert second.already_on == len(first.converted) == 2
    assert model[0].forward == forward


def test_deepcopy_and_pickle_and_dtype_moves():
    model = _resnetish()
    ref = copy.deepcopy(model)
    turn_on_fast_conv_bn_eval(model)
    x = _x(2, 3, 5, 5)
    ema = copy.deepcopy(model)  # e.g. an EMA copy
    assert ema[0].forward.__self__.conv is ema[0]
    assert compare_models(ref, ema, [x], rtol=1e-5) == []
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert compare_models(ref, loaded, [x], rtol=1e-5) == []
    loaded2 = pickle.loads(pickle.dumps(model))
    assert compare_models(ref, loaded2, [x], rtol=1e-5) == []
    for convert in (
        lambda m: m.double(),
        lambda m: m.float(),
        lambda m: m.to(torch.float64),
    ):
        convert(model)
        convert(ref)
        xx = x.to(next(ref.parameters()).dtype)
        assert compare_models(ref, model, [xx], rtol=1e-5) == []
    model.half()
    ref.half()
    with torch.no_grad():
        torch.testing.assert_close(
            model(x.half()).float(),
            ref(x.half()).float(),
            rtol=2e-2,
            atol=2e-2,
        )


def test_unknown_module_names():
    model = _resnetish()
    with pytest.raises(ValueError, match=r"\['nope'\].*valid top-level"):
        turn_on_fast_conv_bn_eval(model, ['nope'])
    with pytest.raises(TypeError, match='module name'):
        turn_on_fast_conv_bn_eval(model, 3)


def test_submodule_selection():
    model = _prepare(
        nn.ModuleDict(
            dict(
                a=nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)),
                b=nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)),
            )
        )
    )
    assert turn_on_fast_conv_bn_eval(model, 'a').converted == [('a.0', 'a.1')]
    assert 'forward' not in model['b'][0].__dict__


def _ddp_single_process(tmp):
    import gc

    import torch.distributed as dist

    dist.init_process_group(
        'gloo', init_method=f'file://{tmp}/store', rank=0, world_size=1
    )
    model = _resnetish()
    ref = copy.deepcopy(model)
    turn_on_fast_conv_bn_eval(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    ref_ddp = nn.parallel.DistributedDataParallel(ref)
    assert compare_models(ref_ddp, ddp, [_x(2, 3, 5, 5)], rtol=1e-5) == []
    del ddp, ref_ddp, model, ref
    gc.collect()  # the reducers go before the group
    dist.destroy_process_group()


def test_ddp_single_process(tmp_path):
    from mmtune.testing import run_isolated

    run_isolated(_ddp_single_process, str(tmp_path))


# ------------------------------------------------------------- deploy
def test_fuse_conv_bn_follows_real_call_order():
    """Modules defined in one order, called in another: folding must
    follow the calls (mmcv's fuse_conv_bn follows definition order)."""

    class Crossed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
            self.conv_b = nn.Conv2d(3, 4, 1)
            self.bn_a = nn.BatchNorm2d(4)
            self.bn_b = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn_a(self.conv_b(x)) + self.bn_b(self.conv_a(x))

    model = _prepare(Crossed())
    x = _x(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
        report = fuse_conv_bn(model)
        assert sorted(report.converted) == [
            ('conv_a', 'bn_b'),
            ('conv_b', 'bn_a'),
        ]
        assert isinstance(model.bn_a, nn.Identity)
        torch.testing.assert_close(model(x), expected)


def test_fuse_after_tune_mode():
    model = _resnetish()
    x = _x(2, 3, 5, 5)
    with torch.no_grad():
        expected = model(x)
    turn_on_fast_conv_bn_eval(model)
    report = fuse_conv_bn(model)
    assert len(report.converted) == 2
    assert turn_off_fast_conv_bn_eval(model) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_torch_compile_traces_through_without_breaks():
    import torch._dynamo as dynamo

    from mmtune.testing import forward_backward

    model = _resnetish()
    ref = copy.deepcopy(model)
    turn_on_fast_conv_bn_eval(model)
    x = _x(2, 3, 6, 6)
    dynamo.reset()
    assert dynamo.explain(model)(x).graph_break_count == 0
    compiled = torch.compile(model, backend='aot_eager')
    out_ref, grads_ref, _ = forward_backward(ref, [x])
    out, grads, _ = forward_backward(compiled, [x])
    torch.testing.assert_close(out[0], out_ref[0])
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads['_orig_mod.' + name], grad)
