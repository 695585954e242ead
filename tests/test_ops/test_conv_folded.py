# Copyright (c) mmtune contributors. All rights reserved.
"""conv_forward_folded keeps a recipe, not the folded weight, for the
backward: values and every gradient are those of the convolution with the
folded weight, bit for bit; the folded weight is freed after the forward;
other saved-tensor hooks, checkpointing, double backward and in-place writes
behave as without it; whole models keep no more than eval mode."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmtune import turn_on_fast_conv_bn_eval
from mmtune.ops import (
    conv_forward_folded,
    conv_forward_with,
    fold_modules,
    observe_saved_tensors,
)
from mmtune.testing import randomize_bn

CONVS = {
    'conv2d': lambda: nn.Conv2d(4, 6, 3, padding=1, bias=False),
    'conv2d_bias_groups': lambda: nn.Conv2d(4, 6, 3, groups=2, bias=True),
    'conv2d_reflect': lambda: nn.Conv2d(
        4, 6, 3, padding=1, padding_mode='reflect'
    ),
    'conv1d': lambda: nn.Conv1d(4, 6, 3),
    'conv3d': lambda: nn.Conv3d(4, 6, 3, padding=1),
    'deconv2d_groups': lambda: nn.ConvTranspose2d(
        4, 6, 3, stride=2, groups=2, output_padding=1
    ),
}
SPATIAL = {'conv1d': (9,), 'conv3d': (4, 5, 5)}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _pair(kind, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    conv = CONVS[kind]().to(dtype)
    dims = conv.weight.dim() - 2
    bn = BN[dims](6).to(dtype).eval()
    randomize_bn(bn, seed)
    x = torch.randn(
        (2, 4) + SPATIAL.get(kind, (7, 8)), dtype=dtype, requires_grad=True
    )
    return conv, bn, x


def _grads(conv, bn, x, run):
    out = run()
    torch.manual_seed(5)
    g = torch.randn_like(out)
    leaves = [x, conv.weight, bn.weight, bn.bias]
    if conv.bias is not None:
        leaves.append(conv.bias)
    return [out] + list(torch.autograd.grad(out, leaves, g))


@pytest.mark.parametrize('kind', sorted(CONVS))
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_bitwise_equal_to_keeping_the_folded_weight(kind, dtype):
    conv, bn, x = _pair(kind, dtype)

    def kept():
        w, b, _, _ = fold_modules(conv, bn)
        return conv_forward_with(conv, x, w, b)

    def recomputed():
        return conv_forward_folded(conv, x, fold_modules(conv, bn))

    for a, b in zip(
        _grads(conv, bn, x, kept), _grads(conv, bn, x, recomputed)
    ):
        assert torch.equal(a, b)
    # and eval mode's values
    ref = bn(conv(x))
    torch.testing.assert_close(recomputed(), ref, rtol=1e-5, atol=1e-5)


def test_bitwise_equal_under_autocast():
    conv, bn, x = _pair('conv2d', torch.float32)

    def run(fn):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            return fn()

    def kept():
        w, b, _, _ = fold_modules(conv, bn)
        return conv_forward_with(conv, x, w, b)

    def recomputed():
        return conv_forward_folded(conv, x, fold_modules(conv, bn))

    a = _grads(conv, bn, x, lambda: run(kept))
    b = _grads(conv, bn, x, lambda: run(recomputed))
    assert a[0].dtype == b[0].dtype == torch.bfloat16
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def _saved_bytes(run, *modules):
    """Bytes autograd keeps for the backward of ``run()``, the modules'
    parameters and buffers excluded (as the benchmark counts)."""
    own = {
        t.untyped_storage().data_ptr()
        for m in modules
        for t in list(m.parameters()) + list(m.buffers())
    }
    seen = {}

    def note(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()

    with observe_saved_tensors(note):
        out = run()
    return out, sum(seen.values())


def test_the_folded_weight_is_freed_after_the_forward():
    conv, bn, x = _pair('conv2d')
    fold = fold_modules(conv, bn)
    alive = weakref.ref(fold.weight)
    out = conv_forward_folded(conv, x, fold)
    del fold
    gc.collect()
    assert alive() is None
    out.sum().backward()  # recomputed here
    assert conv.weight.grad is not None and x.grad is not None


def test_kept_bytes_are_the_input_and_per_channel_vectors():
    conv, bn, x = _pair('conv2d')
    for frozen in (False, True):
        # a frozen pair's input still needs the weight for its gradient
        conv.weight.requires_grad_(not frozen)
        _, folded = _saved_bytes(
            lambda: conv_forward_folded(conv, x, fold_modules(conv, bn)),
            conv,
            bn,
        )
        _, kept = _saved_bytes(
            lambda: conv_forward_with(conv, x, *fold_modules(conv, bn)[:2]),
            conv,
            bn,
        )
        x_bytes = x.numel() * x.element_size()
        weight_bytes = conv.weight.numel() * conv.weight.element_size()
        assert kept >= x_bytes + weight_bytes
        # the input and a few (6,) vectors: the scale, the BN's 1/std
        assert x_bytes <= folded < x_bytes + weight_bytes // 4


def test_other_saved_tensor_hooks_see_the_folded_weight():
    conv, bn, x = _pair('conv2d')
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = conv_forward_folded(conv, x, fold_modules(conv, bn))
    assert conv.weight.shape in packed
    ref = conv_forward_with(conv, x, *fold_modules(conv, bn)[:2])
    assert torch.equal(out, ref)


@pytest.mark.parametrize('reentrant', [False, True])
def test_checkpoint(reentrant):
    conv, bn, x = _pair('conv2d')

    def fn(inp):
        return conv_forward_folded(conv, inp, fold_modules(conv, bn)).tanh()

    def grads(out):
        conv.zero_grad(set_to_none=True)
        bn.zero_grad(set_to_none=True)
        x.grad = None
        out.square().sum().backward()
        return [t.grad for t in (x, conv.weight, bn.weight, bn.bias)]

    a = grads(checkpoint(fn, x, use_reentrant=reentrant))
    b = grads(fn(x))
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_double_backward():
    conv, bn, x = _pair('conv2d')

    def first(fn):
        out = fn(conv, x, *fold_modules(conv, bn)[:2]).tanh().square().sum()
        return torch.autograd.grad(out, [x, conv.weight], create_graph=True)

    def folded(conv, x, w, b):
        return conv_forward_folded(conv, x, fold_modules(conv, bn))

    ga, gb = first(folded), first(conv_forward_with)
    for u, v in zip(ga, gb):
        assert torch.equal(u, v)
    ha = torch.autograd.grad(ga[0].sum(), [conv.weight, bn.weight])
    hb = torch.autograd.grad(gb[0].sum(), [conv.weight, bn.weight])
    for u, v in zip(ha, hb):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_in_place_write_before_backward_raises_as_autograd_does():
    conv, bn, x = _pair('conv2d')
    out = conv_forward_folded(conv, x, fold_modules(conv, bn))
    with torch.no_grad():
        conv.weight.mul_(2)
    with pytest.raises(RuntimeError, match='modified by an inplace'):
        out.sum().backward()


def test_no_grad_and_inference():
    conv, bn, x = _pair('conv2d')
    with torch.no_grad():
        a = conv_forward_folded(conv, x, fold_modules(conv, bn))
    with torch.inference_mode():
        b = conv_forward_folded(conv, x, fold_modules(conv, bn))
    assert torch.equal(a, b)


class _Net(nn.Module):
    """A small ResNet-like stack with a frozen stem."""

    def __init__(self, width=64):
        super().__init__()
        layers = []
        cin = 3
        for _ in range(6):
            layers += [
                nn.Conv2d(cin, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            cin = width
        self.body = nn.Sequential(*layers)
        for p in self.body[0].parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.body(x).mean((2, 3))


@pytest.mark.parametrize('batch', [False, True])
def test_a_model_keeps_no_more_than_eval_mode_at_a_small_input(batch):
    """The benchmark's CPU case: weights outweigh the activations (64
    channels, 3x3, a 6x6 input). Eval mode keeps each conv output for its
    BN; tune mode keeps neither those nor folded weights."""
    torch.manual_seed(0)
    ref = _Net().eval()
    randomize_bn(ref, 0)
    tuned = copy.deepcopy(ref)
    turn_on_fast_conv_bn_eval(tuned, batch=batch)
    x = torch.randn(2, 3, 6, 6)
    out_ref, eval_bytes = _saved_bytes(lambda: ref(x), ref)
    out_tuned, tune_bytes = _saved_bytes(lambda: tuned(x), tuned)
    torch.testing.assert_close(out_tuned, out_ref, rtol=1e-4, atol=1e-5)
    weights = sum(
        m.weight.numel() * 4
        for m in tuned.modules()
        if isinstance(m, nn.Conv2d)
    )
    assert tune_bytes <= eval_bytes
    assert tune_bytes < weights  # no folded copy kept
    out_tuned.sum().backward()
    out_ref.sum().backward()
    for (name, a), b in zip(ref.named_parameters(), tuned.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(
                b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name
            )
