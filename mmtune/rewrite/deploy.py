# Copyright (c) mmtune contributors. All rights reserved.
"""Deploy mode: fold each BN into its conv once, for inference."""

import time

import torch
from torch import nn

from ..ops import fold_modules
from .analysis import analyse, resolve_roots
from .guards import foldable_conv
from .report import ConvBNReport, SkipRecord
from .tune_mode import turn_off_fast_conv_bn_eval


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


@torch.no_grad()
def fuse_conv_bn(model: nn.Module, modules=None) -> ConvBNReport:
    """Fold every Conv->BN pair of ``model`` permanently (deploy mode).

    Pairs are those the model really computes (the same analysis as tune
    mode, following the calls of each forward, not the order in which
    modules were defined). Each conv gets the folded weight and bias, and
    its BN becomes an ``nn.Identity``. The BN's running statistics are used
    whatever its mode: call this on a model meant for inference. Tune mode,
    where on, is turned off first.

    Args:
        model (nn.Module): The model.
        modules (str | list[str], optional): Submodules to cover; None
            covers the whole model. Defaults to None.

    Returns:
        ConvBNReport: folded pairs and what was skipped, and why.
    """
    start = time.perf_counter()
    roots = resolve_roots(model, modules)
    turn_off_fast_conv_bn_eval(model)
    analysis = analyse(model, roots)
    report = ConvBNReport(mode='deploy', skipped=list(analysis.skipped))
    for pair in analysis.pairs:
        conv, bn = pair.conv, pair.bn
        spec = foldable_conv(type(conv))
        if spec is not None and spec.weight is not None:
            # its forward would transform the folded weight again
            report.skipped.append(
                SkipRecord(
                    (pair.conv_name, pair.bn_name),
                    f'{type(conv).__name__} computes its weight in its '
                    'forward; deploy mode cannot store a folded one',
                )
            )
            continue
        weight, bias, _, _ = fold_modules(conv, bn)
        conv.weight.copy_(weight)
        if conv.bias is None:
            conv.bias = nn.Parameter(
                bias, requires_grad=conv.weight.requires_grad
            )
        else:
            conv.bias.copy_(bias)
        _replace_module(model, pair.bn_name, nn.Identity())
        report.converted.append((pair.conv_name, pair.bn_name))
    report.seconds = time.perf_counter() - start
    return report
