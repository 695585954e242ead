# Copyright (c) mmtune contributors. All rights reserved.
"""Tune mode for mmcv ``ConvModule``.

``ConvModule.forward(x, activate=True, norm=True)`` decides per call
whether to normalise, and in which order (``order``) to run conv, norm and
activation, so no single traced graph describes it. mmtune replaces the
forward of each eligible ``ConvModule`` instance with one that follows the
same steps and, when the conv is directly followed by an eval-mode BN that
this call applies, runs both as one folded convolution. Any call that asks
for something else (``norm=False``, a BN in train mode, hooks) runs the
modules as the original does.

Unlike mmcv's own ``efficient_conv_bn_eval``, this path checks that the conv
is a plain or declared-foldable convolution (:mod:`.mmcv_convs`; a DCN is
not), re-checks everything at every call, and never deletes a forward set
on the conv instance.
"""

from typing import Optional

from mmcv.cnn import ConvModule
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmtune.rewrite.guards import (
    instance_forward,
    is_mmtune_forward,
    pair_problem,
)
from mmtune.rewrite.handlers import (
    FrameHandler,
    HandledFrame,
    register_frame_handler,
)


class TuneConvModule:
    """The tune-mode forward of one ``ConvModule`` instance: the steps of
    ``ConvModule.forward``, with the conv call armed to fold when this call
    applies the norm right after it."""

    _mmtune_forward_owner = True

    def __init__(self, module: ConvModule):
        self.module = module
        self.pair = None  # the TunePair of module.conv -> module.norm

    def forward(
        self, x: Tensor, activate: bool = True, norm: bool = True
    ) -> Tensor:
        m = self.module
        order = m.order
        pair = self.pair
        index = 0
        while index < len(order):
            layer = order[index]
            if layer == 'conv':
                if m.with_explicit_padding:
                    x = m.padding_layer(x)
                if (
                    pair is not None
                    and norm
                    and m.with_norm
                    and index + 1 < len(order)
                    and order[index + 1] == 'norm'
                ):
                    # conv then norm, as ConvModule.forward computes them;
                    # the pair folds if its own checks allow it
                    pair.armed = True
                    try:
                        x = m.conv(x)
                    finally:
                        pair.armed = False
                    x = m.norm(x)
                    index += 1  # the norm is done
                else:
                    x = m.conv(x)
            elif layer == 'norm' and norm and m.with_norm:
                x = m.norm(x)
            elif layer == 'act' and activate and m.with_activation:
                x = m.activate(x)
            index += 1
        return x


class ConvModuleHandler(FrameHandler):
    """Finds and converts the conv+BN of mmcv ``ConvModule`` instances."""

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, ConvModule)

    def find_pair(self, module: nn.Module) -> HandledFrame:
        callees = ['conv']
        if module.with_norm:
            callees.append(module.norm_name)
        if module.with_explicit_padding:
            callees.append('padding_layer')
        if module.with_activation:
            callees.append('activate')
        if type(module).forward is not ConvModule.forward:
            return HandledFrame(
                None,
                callees,
                f'{type(module).__name__} overrides ConvModule.forward',
            )
        if not module.with_norm or not isinstance(module.norm, _BatchNorm):
            return HandledFrame(None, callees)
        order = list(module.order)
        pair = ('conv', module.norm_name)
        if order.index('norm') != order.index('conv') + 1:
            return HandledFrame(
                None,
                callees,
                f'order {module.order} puts something between conv and norm',
            )
        fn = instance_forward(module)
        if fn is not None and not is_mmtune_forward(fn):
            return HandledFrame(
                None,
                callees,
                'the ConvModule has a forward wrapper installed on the '
                'instance',
            )
        reason: Optional[str] = pair_problem(module.conv, module.norm)
        if reason is not None:
            return HandledFrame(None, callees, reason)
        return HandledFrame(pair, callees)

    def turn_on(self, module: nn.Module) -> bool:
        if is_mmtune_forward(instance_forward(module)):
            return False
        module.forward = TuneConvModule(module).forward
        return True

    def attach(self, module: nn.Module, runtime) -> None:
        instance_forward(module).__self__.pair = runtime

    def turn_off(self, module: nn.Module) -> bool:
        if not is_mmtune_forward(instance_forward(module)):
            return False
        del module.forward
        return True


register_frame_handler(ConvModuleHandler())
