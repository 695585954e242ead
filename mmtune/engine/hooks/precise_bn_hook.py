# Copyright (c) mmtune contributors. All rights reserved.
"""``PreciseBNHook`` and the ``precise_bn`` config key."""

from typing import Any, Optional, Union

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.runner import IterBasedTrainLoop

from mmtune.engine.precise_bn import update_bn_stats
from mmtune.registry import register_hook
from mmtune.utils import options_switch

__all__ = ['PreciseBNHook', 'precise_bn_hook_cfg']

DATA_BATCH = Optional[Union[dict, tuple, list]]

_DEFAULTS = {'num_samples': 8192, 'interval': 1}


def _check_positive_int(what: str, value: Any) -> None:
    """Raise an error naming ``what`` (the argument or config key the value
    came from) unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f'{what} must be a positive int, but '
            f'got {value!r} of type {type(value).__name__}'
        )
    if value <= 0:
        raise ValueError(f'{what} must be a positive int, but got {value!r}')


@register_hook
class PreciseBNHook(Hook):
    """Recompute the BatchNorm statistics with the weights fixed.

    During training the running statistics of a BatchNorm layer are an
    exponential average over weights that keep changing. This hook runs
    :func:`mmtune.update_bn_stats` on the training data: every BatchNorm in
    training mode gets the exact mean and (unbiased) variance of its inputs
    over ``num_samples`` samples, pooled over all batches and all ranks (see
    `Rethinking "Batch" in BatchNorm <https://arxiv.org/abs/2105.07576>`_).
    Layers kept in eval mode, e.g. by ``norm_eval=True`` backbones, are left
    alone.

    It runs every ``interval`` epochs (``EpochBasedTrainLoop``) or
    iterations (``IterBasedTrainLoop``), always at the last one, and before
    the checkpoint of that epoch or iteration is saved, so checkpoints carry
    the new statistics. If training stops early (e.g. ``EarlyStoppingHook``)
    it runs once more at the end of training, for the model kept in memory.

    Note:
        With ``EMAHook`` (``update_buffers=False``), checkpoints hold the
        averaged model, whose buffers are copied from the trained model at
        every training iteration. This hook runs before that copy in
        ``after_train_iter``, so iteration-based checkpoints carry the new
        statistics; epoch-based ones get them one iteration later.

    Args:
        num_samples (int): How many training samples, over all ranks, to
            compute the statistics from. Defaults to 8192.
        interval (int): Recompute every ``interval`` epochs, or iterations
            for iteration-based training. Defaults to 1.
    """

    # Must run before CheckpointHook ('VERY_LOW') saves the checkpoint of the
    # same epoch/iteration, and before EMAHook ('NORMAL') copies the buffers
    # of the model into its averaged copy in after_train_iter.
    priority = 'ABOVE_NORMAL'

    def __init__(self, num_samples: int = 8192, interval: int = 1) -> None:
        _check_positive_int('PreciseBNHook(num_samples=...)', num_samples)
        _check_positive_int('PreciseBNHook(interval=...)', interval)
        self.num_samples = num_samples
        self.interval = interval
        # runner.iter (iterations done) when the statistics were computed.
        self._updated_at: Optional[int] = None

    def after_train_iter(
        self,
        runner,
        batch_idx: int,
        data_batch: DATA_BATCH = None,
        outputs: Optional[dict] = None,
    ) -> None:
        """Recompute every ``interval`` iterations in iteration-based
        training, and at the last iteration.

        Args:
            runner (Runner): The runner of the training process.
            batch_idx (int): The index of the current batch in the train
                loop.
            data_batch (dict or tuple or list, optional): Data from the
                dataloader. Defaults to None.
            outputs (dict, optional): Outputs from the model. Defaults to
                None.
        """
        if not isinstance(runner.train_loop, IterBasedTrainLoop):
            return
        if self.every_n_train_iters(
            runner, self.interval
        ) or self.is_last_train_iter(runner):
            self._update(runner, runner.iter + 1)

    def after_train_epoch(self, runner) -> None:
        """Recompute every ``interval`` epochs in epoch-based training, and
        at the last epoch.

        Args:
            runner (Runner): The runner of the training process.
        """
        if isinstance(runner.train_loop, IterBasedTrainLoop):
            return
        if self.every_n_epochs(
            runner, self.interval
        ) or self.is_last_train_epoch(runner):
            self._update(runner, runner.iter)

    def after_train(self, runner) -> None:
        """Recompute if the model trained since the last update (training
        stopped before its last epoch or iteration).

        Args:
            runner (Runner): The runner of the training process.
        """
        if self._updated_at != runner.iter:
            self._update(runner, runner.iter)

    def _update(self, runner, iters_done: int) -> None:
        model = runner.model
        if is_model_wrapper(model):
            model = model.module
        # The model may be in eval mode (after validation); train() puts the
        # BNs that train back in training mode and leaves frozen ones frozen.
        modes = [(m, m.training) for m in model.modules()]
        model.train()
        try:
            update_bn_stats(
                model,
                runner.train_dataloader,
                self.num_samples,
                logger=runner.logger,
            )
        finally:
            for module, mode in modes:
                module.training = mode
        self._updated_at = iters_done


def precise_bn_hook_cfg(value: Any) -> Optional[dict]:
    """Turn the ``precise_bn`` config key into a hook config.

    Examples:
        >>> precise_bn_hook_cfg(dict(num_samples=4096))
        {'type': 'mmtune.PreciseBNHook', 'num_samples': 4096, 'interval': 1}
        >>> precise_bn_hook_cfg(True)['num_samples']
        8192

    Args:
        value (bool or dict, optional): ``dict(num_samples=..., interval=...)``
            (missing keys take the defaults of :class:`PreciseBNHook`),
            ``True`` for the defaults, or ``None``/``False`` for no precise
            BN.

    Returns:
        dict, optional: The config of a :class:`PreciseBNHook`, or None when
        ``value`` turns precise BN off.

    Raises:
        TypeError: ``value`` or one of its entries has the wrong type.
        ValueError: ``value`` has an unknown key or a value that is not
            positive.
    """
    value = options_switch(
        value, 'precise_bn', 'dict(num_samples=8192, interval=1)'
    )
    if value is None:
        return None
    unknown = sorted(set(value) - set(_DEFAULTS))
    if unknown:
        raise ValueError(
            f'`precise_bn` has unknown keys {unknown} in {dict(value)!r}; '
            f'the keys are {sorted(_DEFAULTS)}'
        )
    kwargs = {**_DEFAULTS, **value}
    for name, arg in kwargs.items():
        _check_positive_int(f'the config key precise_bn.{name}', arg)
    return {'type': 'mmtune.PreciseBNHook', **kwargs}
