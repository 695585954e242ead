# Copyright (c) mmtune contributors. All rights reserved.
"""Precise BN for mmengine models: how a batch reaches one.

:func:`mmtune.precise_bn.update_bn_stats` (torch only) computes the
statistics; this module tells it how to feed an mmengine model, the way
mmengine's own ``val_step`` does: the batch goes through
``model.data_preprocessor(batch, False)``, then ``model(..., mode='tensor')``
(no loss, no post-processing). ``mmtune.update_bn_stats`` is this module's
function whenever mmengine is installed.
"""

import logging
from typing import Dict, Iterable, Mapping, Optional

import torch
from mmengine.model import is_model_wrapper
from torch import nn

from mmtune import precise_bn
from mmtune.precise_bn import Prepare, count_samples

__all__ = ['update_bn_stats']


def _is_mmengine_model(model: nn.Module) -> bool:
    """Whether ``model`` looks like an mmengine ``BaseModel`` (a data
    preprocessor and ``train_step``)."""
    return isinstance(
        getattr(model, 'data_preprocessor', None), nn.Module
    ) and callable(getattr(model, 'train_step', None))


def _mmengine_prepare(model: nn.Module) -> Prepare:
    """The ``prepare`` of :func:`mmtune.precise_bn.update_bn_stats` for an
    mmengine model: preprocess the batch (which also moves it to the
    model's device), run ``mode='tensor'``."""

    def prepare(batch):
        data = model.data_preprocessor(batch, False)
        if isinstance(data, Mapping):
            return lambda: model(**data, mode='tensor'), count_samples(data)
        if isinstance(data, (list, tuple)):
            return (
                lambda: model(*data, mode='tensor'),
                count_samples(data[0] if data else None),
            )
        raise TypeError(
            'the data preprocessor must return a dict, '
            f'tuple or list, but got {type(data).__name__}'
        )

    return prepare


def update_bn_stats(
    model: nn.Module,
    data_loader: Iterable,
    num_samples: int = 8192,
    *,
    device: Optional[torch.device] = None,
    progress: bool = True,
    logger: Optional[logging.Logger] = None,
) -> Dict:
    """:func:`mmtune.precise_bn.update_bn_stats`, feeding mmengine models
    as mmengine does.

    An mmengine model (anything with a ``data_preprocessor`` module and a
    ``train_step``) receives each batch as ``model(**data, mode='tensor')``
    (``model(*data, ...)`` for a tuple), ``data`` being
    ``model.data_preprocessor(batch, False)``; any other module receives
    ``batch[0]`` for a tuple/list batch and ``batch`` otherwise. What is
    computed, and what is left alone, is as in
    :func:`mmtune.precise_bn.update_bn_stats`.

    Args:
        model (nn.Module): The model; mmengine's model wrappers
            (``MMDistributedDataParallel``, ...) and torch's
            ``DataParallel`` and ``DistributedDataParallel`` are unwrapped.
        data_loader (Iterable): As in
            :func:`mmtune.precise_bn.update_bn_stats`.
        num_samples (int): As there. Defaults to 8192.
        device (torch.device, optional): Where to move the input of a model
            that is not an mmengine one (mmengine's data preprocessor moves
            its own). Defaults to None (no move).
        progress (bool): Whether rank 0 shows a progress bar on stderr.
            Defaults to True.
        logger (logging.Logger, optional): Where rank 0 logs the summary.
            Defaults to None (the ``mmtune.precise_bn`` logger).

    Returns:
        dict: As :func:`mmtune.precise_bn.update_bn_stats`: ``num_layers``,
        ``num_samples``, ``num_iters`` and ``not_updated``.
    """
    while is_model_wrapper(model):
        model = model.module
    prepare = None
    if _is_mmengine_model(model):
        prepare = _mmengine_prepare(model)
        device = None  # the data preprocessor moves the batch
    return precise_bn.update_bn_stats(
        model,
        data_loader,
        num_samples,
        prepare=prepare,
        device=device,
        progress=progress,
        logger=logger,
    )
