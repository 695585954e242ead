# Copyright (c) mmtune contributors. All rights reserved.
"""Folding an eval-mode BatchNorm into the convolution before it.

An eval-mode BN computes ``y = gamma * (z - mean) / sqrt(var + eps) + beta``
per output channel. With ``z = conv(x, w) + b`` and
``s = gamma / sqrt(var + eps)`` this is ``conv(x, w * s) + beta + s * (b -
mean)``: the same values, computed with one convolution. Done at every
forward with autograd watching ("tune mode"), gradients reach ``w``, ``b``,
``gamma`` and ``beta`` exactly as in eval mode, but autograd no longer keeps
the conv output ``z`` for the BN's backward. Done once under ``no_grad``
("deploy mode"), it removes the BN for inference.
"""

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONV_TRANSPOSE_FNS = {
    1: F.conv_transpose1d,
    2: F.conv_transpose2d,
    3: F.conv_transpose3d,
}


def bn_inv_std(running_var: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(running_var + eps)``, the BN's per-channel inverse std."""
    return torch.rsqrt(running_var + eps)


def _scale_out_channels(
    weight: Tensor, scale: Tensor, transposed: bool, groups: int
) -> Tensor:
    """Multiply each output channel of a conv weight by ``scale``.

    A convolution's weight is ``(out, in / groups, *kernel)``; a transposed
    convolution's is ``(in, out / groups, *kernel)``, its output channels
    being grouped along dimension 1.
    """
    kernel_dims = weight.dim() - 2
    if not transposed:
        return weight * scale.reshape((-1,) + (1,) * (kernel_dims + 1))
    in_channels, out_per_group = weight.shape[:2]
    grouped = weight.reshape(
        (groups, in_channels // groups, out_per_group)
        + tuple(weight.shape[2:])
    )
    grouped = grouped * scale.reshape(
        (groups, 1, out_per_group) + (1,) * kernel_dims
    )
    return grouped.reshape(weight.shape)


def scale_weight(
    weight: Tensor, factor: Tensor, dtype: Optional[torch.dtype] = None
) -> Tensor:
    """A folded weight: ``weight`` times its ``(C, 1, ..., 1)`` factors, in
    ``dtype`` (default: the weight's), computed in the weight's precision
    and rounded once."""
    folded = weight * factor
    dtype = weight.dtype if dtype is None else dtype
    return folded if folded.dtype == dtype else folded.to(dtype)


class ConvBNFold(NamedTuple):
    """A Conv->BN pair folded: what the convolution computes with, and what
    its folded weight was computed from (so that it can be computed again
    instead of kept, see :func:`~mmtune.ops.conv_forward_folded`)."""

    #: ``w * s`` per output channel, in the conv weight's dtype
    weight: Tensor
    #: ``beta + s * (b - mean)``, in the conv weight's dtype
    bias: Tensor
    #: ``w``, the weight the conv's forward reads
    source: Tensor
    #: ``s = gamma / sqrt(var + eps)``, one factor per output channel
    scale: Tensor


def fold_conv_bn(
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    eps: float,
    transposed: bool = False,
    groups: int = 1,
    inv_std: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Fold an eval-mode BN into a conv's weight and bias.

    Differentiable in every input: call it under autograd for tune mode and
    under ``torch.no_grad()`` for deploy mode.

    Args:
        conv_weight (Tensor): The conv weight.
        conv_bias (Tensor, optional): The conv bias, or None.
        running_mean (Tensor): The BN running mean, shape ``(C_out, )``.
        running_var (Tensor): The BN running variance, shape ``(C_out, )``.
        bn_weight (Tensor, optional): ``gamma``, or None (no affine).
        bn_bias (Tensor, optional): ``beta``, or None (no affine).
        eps (float): The BN epsilon.
        transposed (bool): Whether the weight is a transposed conv's.
            Defaults to False.
        groups (int): The conv groups (used for transposed convs).
            Defaults to 1.
        inv_std (Tensor, optional): ``bn_inv_std(running_var, eps)`` when
            the caller has it already. Defaults to None.

    Returns:
        tuple[Tensor, Tensor]: The folded weight and bias, in the conv
        weight's dtype.
    """
    if inv_std is None:
        inv_std = bn_inv_std(running_var, eps)
    scale = bn_scale(inv_std, bn_weight)
    fold = _folded(
        conv_weight,
        scale,
        conv_bias,
        running_mean,
        bn_bias,
        transposed,
        groups,
    )
    return fold.weight, fold.bias


def _folded(
    source, scale, conv_bias, running_mean, bn_bias, transposed, groups
) -> ConvBNFold:
    """The fold of a conv weight ``source`` by the factors ``scale``."""
    weight = _scale_out_channels(source, scale, transposed, groups)
    bias = fold_bias(conv_bias, running_mean, scale, bn_bias)
    dtype = source.dtype
    return ConvBNFold(weight.to(dtype), bias.to(dtype), source, scale)


def fold_modules(
    conv: nn.Module, bn: nn.Module, weight: Optional[Tensor] = None
) -> ConvBNFold:
    """:func:`fold_conv_bn` of a conv and a BN module, from the tensors
    their own forwards read now (attributes, so parametrized or
    hook-computed weights are the ones used); ``weight`` replaces
    ``conv.weight`` when given (a weight the conv's forward computes).
    Unpacks as ``weight, bias, source, scale``."""
    source = conv.weight if weight is None else weight
    scale = bn_scale(bn_inv_std(bn.running_var, bn.eps), bn.weight)
    return _folded(
        source,
        scale,
        conv.bias,
        bn.running_mean,
        bn.bias,
        conv.transposed,
        conv.groups,
    )


def bn_scale(inv_std: Tensor, bn_weight: Optional[Tensor]) -> Tensor:
    """``gamma / sqrt(var + eps)`` from the inverse std (``gamma = 1``
    without affine): what folding multiplies each output channel by."""
    return inv_std if bn_weight is None else bn_weight * inv_std


def fold_bias(
    conv_bias: Optional[Tensor],
    running_mean: Tensor,
    scale: Tensor,
    bn_bias: Optional[Tensor],
) -> Tensor:
    """The folded bias ``beta + scale * (b - mean)``, where ``scale`` is
    ``gamma / sqrt(var + eps)`` (no conv bias: ``b = 0``; no affine:
    ``beta = 0``). Differentiable in every input."""
    if conv_bias is None:
        shift = running_mean.neg()
    else:
        shift = conv_bias - running_mean
    if bn_bias is None:
        return scale * shift
    return torch.addcmul(bn_bias, scale, shift)


def conv_forward_with(
    conv: nn.modules.conv._ConvNd,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    output_size: Optional[Sequence[int]] = None,
) -> Tensor:
    """Run ``conv``'s own computation on ``x`` with another weight and bias.

    Padding modes, strides, dilation and groups are the module's; for a
    transposed conv ``output_size`` is honoured as in its ``forward``.
    """
    if not conv.transposed:
        return conv._conv_forward(x, weight, bias)
    num_spatial_dims = weight.dim() - 2
    output_padding = conv._output_padding(
        x,
        output_size,
        conv.stride,
        conv.padding,
        conv.kernel_size,
        num_spatial_dims,
        conv.dilation,
    )
    fn = _CONV_TRANSPOSE_FNS[num_spatial_dims]
    return fn(
        x,
        weight,
        bias,
        conv.stride,
        conv.padding,
        output_padding,
        conv.groups,
        conv.dilation,
    )
