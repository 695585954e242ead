# Copyright (c) mmtune contributors. All rights reserved.
"""Real models of mmseg, mmpretrain and mmpose, built from the codebases'
own installed configs (``mmtune.testing.CODEBASE_MODELS``), in tune mode
against eval mode."""

import copy

import torch
from torch import nn

from mmtune import turn_on_fast_conv_bn_eval
from mmtune.testing import (
    CODEBASE_MODELS,
    build_codebase_model,
    find_conv_bn_pairs_at_runtime,
    forward_backward,
    max_relative_error,
    randomize_bn,
    tensor_forward,
)


class Heads(nn.Module):
    """A codebase model whose ``forward(x)`` returns the outputs of all its
    heads (``mmtune.testing.tensor_forward``)."""

    def __init__(self, codebase, model):
        super().__init__()
        self.model = model
        self._forward = tensor_forward(codebase)

    def forward(self, x):
        return self._forward(self.model, x)


def compare_with_floor(reference, candidate, inputs, rtol=1e-9):
    """``mmtune.testing.compare_models``, except that a gradient is
    compared relative to the larger of its own magnitude and 1e-6 of the
    model's largest gradient: some models have gradients that are zero up
    to rounding (a softmax over one key, a saturated one), whose rounding
    noise differs between any two ways of computing them.

    Returns:
        list[str]: One line per mismatch (empty when all agree).
    """
    out_a, grads_a, in_a = forward_backward(reference, inputs)
    out_b, grads_b, in_b = forward_backward(candidate, inputs)
    problems = []
    if len(out_a) != len(out_b):
        return [f'{len(out_b)} outputs vs {len(out_a)}']
    for i, (a, b) in enumerate(zip(out_a, out_b)):
        err = max_relative_error(b, a)
        if err > rtol:
            problems.append(f'output {i}: relative error {err:.2e}')
    if set(grads_a) != set(grads_b):
        return problems + [
            'different parameters got gradients: '
            f'{sorted(set(grads_a) ^ set(grads_b))}'
        ]
    floor = 1e-6 * max(g.abs().max().item() for g in grads_a.values())
    named = dict(grads_a, input=in_a[0])
    for name, a in named.items():
        b = in_b[0] if name == 'input' else grads_b[name]
        scale = max(a.abs().max().item(), floor)
        err = (a - b).abs().max().item() / scale
        if err > rtol:
            problems.append(f'grad of {name}: relative error {err:.2e}')
    return problems


def check_whole_model(codebase, name, batch=False):
    """Build the model ``name`` of ``CODEBASE_MODELS[codebase]`` in
    float64 with random BN statistics and affine values, in eval mode; turn
    tune mode on for the whole model; check that every Conv->BN pair found
    at run time is converted, that outputs, all parameter gradients and the
    input gradient equal eval mode's (:func:`compare_with_floor`, relative
    1e-9), and that every
    converted pair that was called folded at every call.

    Returns:
        tuple: The report and the run-time pairs.
    """
    config, size, overrides = CODEBASE_MODELS[codebase][name]
    model = build_codebase_model(codebase, config, overrides)
    randomize_bn(model)
    ref = Heads(codebase, model.double().eval())
    # a batch of 2: torch 2.13's CPU batch_norm backward is wrong for a
    # batch of 1 whose output gradient has channels-last strides (LeViT's
    # ``flatten(2).transpose(1, 2)`` after a BN gives one), so eval mode
    # itself, the reference, would be wrong there
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    pairs = set(find_conv_bn_pairs_at_runtime(ref.model, x, forward=ref))
    assert pairs
    tuned = copy.deepcopy(ref)
    report = turn_on_fast_conv_bn_eval(tuned.model, batch=batch)
    assert pairs <= set(report.converted), str(report)
    assert compare_with_floor(ref, tuned, [x]) == []
    counts = report.fold_counts()
    called = {pair for pair, count in counts.items() if count.calls}
    assert pairs <= called
    assert all(
        counts[pair].folded and not counts[pair].computed for pair in called
    ), report.runtime_summary()
    return report, pairs
