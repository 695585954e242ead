# Copyright (c) mmtune contributors. All rights reserved.
"""Turn tune mode on inside an mmengine run, at the right moment."""

from typing import List, Optional, Sequence, Union

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner
from torch import nn

from mmtune.registry import register_hook
from mmtune.rewrite import ConvBNReport, turn_on_fast_conv_bn_eval
from mmtune.rewrite.fold_batch import check_batch_arg
from mmtune.rewrite.tune_mode import resolve_roots

Modules = Union[None, str, Sequence[str]]


def check_modules_arg(modules: Modules) -> Optional[List[str]]:
    """Validate a ``modules`` value (None, a name or a list of names).

    Raises:
        TypeError: naming the bad value.
    """
    if modules is None:
        return None
    if isinstance(modules, str):
        return [modules]
    if isinstance(modules, (list, tuple)) and all(
        isinstance(m, str) and m for m in modules
    ):
        return list(modules)
    raise TypeError(
        'fast_conv_bn_eval_modules must be None, a module name or a list '
        f'of module names, got {modules!r}'
    )


def unwrap_model(runner: Runner) -> nn.Module:
    """The model inside DDP/FSDP wrappers."""
    model = runner.model
    return model.module if is_model_wrapper(model) else model


@register_hook
class FastConvBNEvalHook(Hook):
    """Run the model's Conv->eval-BN pairs in tune mode.

    Outputs and gradients are those of eval mode; training keeps less memory.
    The rewrite happens at ``before_train`` (or ``before_val`` /
    ``before_test`` in runs that only evaluate), that is after the optimizer
    is built, the weights are initialised and any checkpoint is loaded or
    resumed: build optimizer -> init weights -> load/resume -> rewrite. It
    acts once per run and never converts anything twice.

    If the config also sets mmengine's own ``efficient_conv_bn_eval``, this
    hook removes that key before the runner acts on it (mmengine would
    replace the whole forward with a traced graph that freezes its Python
    control flow) and converts those modules itself.

    Args:
        modules (str | list[str], optional): Qualified names of the
            submodules to cover, e.g. ``'backbone'``; None covers the whole
            model. Defaults to None.
        batch (str | bool): Whether the trainable pairs fold together once
            per forward (``'auto'``: on CUDA; True; False), see
            :func:`~mmtune.rewrite.turn_on_fast_conv_bn_eval`. With a
            ``DistributedDataParallel`` wrapper that looks for unused
            parameters, ``'auto'`` turns batching off (the wrapper would
            wait for the gradients of pairs a forward did not call).
            Defaults to ``'auto'``.
    """

    # After the hooks that may change the model in before_train (they run
    # first at higher priority); the order against checkpoint loading does
    # not depend on priority: load_or_resume happens before before_train.
    priority = 'LOW'

    def __init__(self, modules: Modules = None, batch='auto'):
        self.modules = check_modules_arg(modules)
        check_batch_arg(batch)
        self.batch = batch
        self.report: Optional[ConvBNReport] = None

    def before_run(self, runner: Runner) -> None:
        """Validate module names and take over mmengine's own option."""
        mmengine_modules = runner.cfg.get('efficient_conv_bn_eval', None)
        if mmengine_modules is not None:
            runner.cfg.pop('efficient_conv_bn_eval')
            if self.modules is not None:
                extra = check_modules_arg(mmengine_modules) or []
                self.modules = sorted(set(self.modules) | set(extra))
            runner.logger.info(
                "mmtune: the config sets mmengine's efficient_conv_bn_eval="
                f'{mmengine_modules!r}; mmtune applies the rewrite once, '
                'itself (modules: '
                f'{self.modules if self.modules else "whole model"})'
            )
        # Unknown names fail here, before any training step.
        resolve_roots(unwrap_model(runner), self.modules)

    def _apply(self, runner: Runner) -> None:
        if self.report is not None:
            return
        batch = self.batch
        if batch == 'auto' and getattr(
            runner.model, 'find_unused_parameters', False
        ):
            batch = False
            runner.logger.info(
                'mmtune: the model wrapper looks for unused parameters, so '
                'the Conv+BN pairs fold one by one (batch=False)'
            )
        self.report = turn_on_fast_conv_bn_eval(
            unwrap_model(runner), self.modules, batch=batch
        )
        runner.logger.info(str(self.report))

    def before_train(self, runner: Runner) -> None:
        self._apply(runner)

    def before_val(self, runner: Runner) -> None:
        self._apply(runner)

    def before_test(self, runner: Runner) -> None:
        self._apply(runner)
