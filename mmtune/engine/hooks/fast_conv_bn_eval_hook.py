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

# Where a modules value came from, as the errors name it.
HOOK_MODULES_ARG = 'FastConvBNEvalHook(modules=...)'
CFG_MODULES_KEY = 'the config key fast_conv_bn_eval_modules'
MMENGINE_MODULES_KEY = "mmengine's config key efficient_conv_bn_eval"


def check_modules_arg(modules: Modules, what: str) -> Optional[List[str]]:
    """Validate a ``modules`` value (None, a name or a list of names).

    Args:
        modules: The value.
        what (str): Where the value came from, as the error names it: the
            hook's argument (:data:`HOOK_MODULES_ARG`) or a config key
            (:data:`CFG_MODULES_KEY`, :data:`MMENGINE_MODULES_KEY`).

    Raises:
        TypeError: naming ``what`` and quoting the bad value.
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
        f'{what} must be None, a module name or a list '
        f'of module names, got {modules!r} of type {type(modules).__name__}'
    )


def check_enabled_key(value) -> Optional[bool]:
    """Validate the config key ``fast_conv_bn_eval`` (None, True or False).

    Raises:
        TypeError: naming the key and quoting the bad value.
    """
    if value is not None and not isinstance(value, bool):
        raise TypeError(
            'the config key fast_conv_bn_eval must be True or False, got '
            f'{value!r} of type {type(value).__name__}'
        )
    return value


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
    acts once per run and never converts anything twice. After the first
    iteration it logs how the converted pairs' calls went
    (:meth:`~mmtune.rewrite.ConvBNReport.runtime_summary`).

    The hook reads mmtune's config keys, so that a config (or
    ``--cfg-options``) works with any codebase's own ``tools/train.py``:
    ``fast_conv_bn_eval=False`` makes it do nothing, and
    ``fast_conv_bn_eval_modules`` names the submodules when the hook's own
    ``modules`` is None.

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
        self.modules = check_modules_arg(modules, HOOK_MODULES_ARG)
        check_batch_arg(batch)
        self.batch = batch
        self.enabled = True
        self.report: Optional[ConvBNReport] = None
        self._logged = False

    def before_run(self, runner: Runner) -> None:
        """Read mmtune's config keys, validate module names and take over
        mmengine's own option."""
        cfg = runner.cfg
        # mmtune's keys are checked whichever of them is used, as
        # apply_mmtune_cfg does; mmengine's only when it is taken over.
        enabled = check_enabled_key(cfg.get('fast_conv_bn_eval', None))
        cfg_modules = check_modules_arg(
            cfg.get('fast_conv_bn_eval_modules', None), CFG_MODULES_KEY
        )
        if enabled is False:
            self.enabled = False
            runner.logger.info(
                'mmtune: fast_conv_bn_eval=False in the config, so '
                'FastConvBNEvalHook leaves the model as it is'
            )
            return
        if self.modules is None:
            self.modules = cfg_modules
        elif cfg_modules is not None and set(cfg_modules) != set(self.modules):
            raise ValueError(
                f'FastConvBNEvalHook(modules={self.modules!r}) and the '
                f'config key fast_conv_bn_eval_modules={cfg_modules!r} '
                'name different modules; set one of them'
            )
        mmengine_value = cfg.get('efficient_conv_bn_eval', None)
        mmengine_modules = check_modules_arg(
            mmengine_value, MMENGINE_MODULES_KEY
        )
        if mmengine_modules is not None:
            runner.cfg.pop('efficient_conv_bn_eval')
            if self.modules is not None:
                self.modules = sorted({*self.modules, *mmengine_modules})
            runner.logger.info(
                "mmtune: the config sets mmengine's efficient_conv_bn_eval="
                f'{mmengine_value!r}; mmtune applies the rewrite once, '
                'itself (modules: '
                f'{self.modules if self.modules else "whole model"})'
            )
        # Unknown names fail here, before any training step.
        resolve_roots(unwrap_model(runner), self.modules)

    def _apply(self, runner: Runner) -> None:
        if self.report is not None or not self.enabled:
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

    def _log_counts(self, runner: Runner) -> None:
        if self.report is not None and not self._logged:
            self._logged = True
            runner.logger.info(self.report.runtime_summary())

    def before_train(self, runner: Runner) -> None:
        self._apply(runner)

    def before_val(self, runner: Runner) -> None:
        self._apply(runner)

    def before_test(self, runner: Runner) -> None:
        self._apply(runner)

    def after_train_iter(
        self, runner, batch_idx: int, data_batch=None, outputs=None
    ) -> None:
        self._log_counts(runner)

    def after_val_iter(
        self, runner, batch_idx: int, data_batch=None, outputs=None
    ) -> None:
        self._log_counts(runner)

    def after_test_iter(
        self, runner, batch_idx: int, data_batch=None, outputs=None
    ) -> None:
        self._log_counts(runner)
