# Copyright (c) mmtune contributors. All rights reserved.
"""Precise BatchNorm statistics: :func:`update_bn_stats`.

While a BatchNorm layer trains, its running statistics are an exponential
average of batch statistics taken under ever-changing weights. Precise BN
fixes the weights, feeds many training samples through the model and sets
the running statistics to the exact mean and variance of everything each
layer saw, pooled over all batches and all processes.

This module needs torch only (no mmengine, mmcv or mmdet). It feeds each
batch to the model the way ``torch.optim.swa_utils.update_bn`` does, or as a
``prepare`` callable says; :mod:`mmtune.engine.precise_bn` supplies the one
for mmengine models (data preprocessor, ``mode='tensor'``).
"""

import logging
import math
import sys
import time
from typing import (
    IO,
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Tuple,
)

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

__all__ = ['update_bn_stats', 'count_samples']

_LOGGER = logging.getLogger(__name__)

# prepare(batch) -> (run, number of samples in the batch); run() forwards it.
Prepare = Callable[[Any], Tuple[Callable[[], Any], int]]


class _PooledMoments:
    """The per-channel moments of every input one BN layer receives.

    Registered as the layer's forward pre-hook. Keeps the number of values
    per channel, their mean and their sum of squared deviations from the
    mean (``m2``). Each input's moments are computed like BN computes its
    batch statistics (in the input's precision, at least float32) and merged
    in float64 with Chan et al.'s parallel formula, which does not lose
    precision when the mean is large compared with the spread.
    """

    def __init__(self, num_features: int) -> None:
        self.num_features = num_features
        self.count = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get('input')
        # Leave malformed input to the layer, which raises a clear error.
        if (
            not isinstance(x, torch.Tensor)
            or x.dim() < 2
            or x.shape[1] != self.num_features
            or x.numel() == 0
        ):
            return
        n = x.numel() // x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        dtype = torch.promote_types(x.dtype, torch.float32)
        var, mean = torch.var_mean(
            x.detach().to(dtype), dim=dims, correction=0
        )
        self.merge(n, mean.double(), var.double() * n)

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Pool the moments of ``n`` more values per channel."""
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total


class _ProgressBar:
    """A one-line text progress bar, drawn by rank 0 only."""

    def __init__(self, total: Optional[int], stream: IO[str]) -> None:
        self.total = total
        self.stream = stream
        self.done = 0
        self.start = time.perf_counter()

    def update(self) -> None:
        self.done += 1
        total = f'/{self.total}' if self.total else ''
        elapsed = time.perf_counter() - self.start
        self.stream.write(
            f'\rprecise BN: {self.done}{total} iterations, {elapsed:.1f} s'
        )
        self.stream.flush()

    def close(self) -> None:
        if self.done:
            self.stream.write('\n')
            self.stream.flush()


class _Comm:
    """The process group, or nothing when not distributed."""

    def __init__(self) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.device = torch.device('cpu')
        if self.distributed and dist.get_backend() == 'nccl':
            self.device = torch.device('cuda', torch.cuda.current_device())

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """Return the all-reduced (SUM by default) copy of ``tensor``."""
        if not self.distributed:
            return tensor
        buf = tensor.to(self.device, copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM if op is None else op)
        return buf.to(tensor.device)


def _bn_layers(model: nn.Module) -> List[Tuple[str, _BatchNorm]]:
    """The BatchNorm layers that precise BN updates.

    Every ``_BatchNorm`` (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``,
    mmengine's and mmcv's ``_BatchNormXd``, ...) in training mode that has
    running statistics. Layers in eval mode (e.g. ``norm_eval`` backbones)
    are left alone.
    """
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm)
        and m.training
        and m.track_running_stats
        and m.running_mean is not None
        and m.running_var is not None
        and not is_lazy(m.running_mean)
    ]


def count_samples(inputs: Any) -> int:
    """The number of samples in a model input, as precise BN counts them.

    A tensor counts its first dimension (a 0-d tensor is one sample), a
    list or tuple its length, and a dict its ``'inputs'`` entry (or its
    first value).

    Raises:
        TypeError: ``inputs`` is none of these.
    """
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0] if inputs.dim() else 1
    if isinstance(inputs, Mapping):
        if 'inputs' in inputs:
            return count_samples(inputs['inputs'])
        return count_samples(next(iter(inputs.values()), None))
    if isinstance(inputs, (list, tuple)):
        return len(inputs)
    raise TypeError(
        'precise BN cannot count the samples in a model input '
        f'of type {type(inputs).__name__}: expected a tensor, a '
        'list/tuple or a dict of them.'
    )


def _default_prepare(
    model: nn.Module, device: Optional[torch.device]
) -> Prepare:
    """The ``prepare`` of ``torch.optim.swa_utils.update_bn``: a tuple/list
    batch gives ``model(batch[0])``, anything else ``model(batch)``; a
    tensor input moves to ``device``."""

    def prepare(batch):
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        if device is not None and isinstance(inputs, torch.Tensor):
            inputs = inputs.to(device)
        return lambda: model(inputs), count_samples(inputs)

    return prepare


def _estimate_iters(
    data_loader: Iterable, num_samples: int, world_size: int
) -> Optional[int]:
    """The number of iterations, for the progress bar only."""
    try:
        length = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        length = None
    batch_size = getattr(data_loader, 'batch_size', None)
    if batch_size is None:  # a batch sampler, e.g. mmdet's aspect ratio one
        batch_size = getattr(
            getattr(data_loader, 'batch_sampler', None), 'batch_size', None
        )
    if isinstance(batch_size, int) and batch_size > 0:
        iters = math.ceil(num_samples / (batch_size * world_size))
        return iters if length is None else min(iters, length)
    return length


def _check_same_layers(
    layers: List[Tuple[str, _BatchNorm]], comm: _Comm
) -> None:
    """Refuse, on every rank alike, models whose BN layers differ across
    ranks: their statistics cannot be reduced together."""
    if not comm.distributed:
        return
    mine = torch.tensor(
        [len(layers), sum(bn.num_features for _, bn in layers)]
    )
    both = comm.all_reduce(torch.cat([mine, -mine]), op=dist.ReduceOp.MAX)
    if not torch.equal(both[:2], -both[2:]):
        raise RuntimeError(
            'precise BN: the ranks do not have the same BatchNorm layers in '
            f'training mode (rank {comm.rank} has {mine[0].item()} layers '
            f'with {mine[1].item()} channels; the largest are '
            f'{both[0].item()} and {both[1].item()}).'
        )


def _run_batches(
    prepare: Prepare,
    data_loader: Iterable,
    num_samples: int,
    comm: _Comm,
    bar: Optional[_ProgressBar],
) -> Tuple[int, int]:
    """Forward batches until ``num_samples`` samples (over all ranks) went
    through or one rank runs out of data; every rank runs the same number
    of iterations. Returns the number of iterations and of samples."""
    iterator = iter(data_loader)
    iters = seen = 0
    while seen < num_samples:
        try:
            batch = next(iterator)
        except StopIteration:
            run, count = None, 0
        else:
            run, count = prepare(batch)
        # [ranks that have a batch, samples in this global batch]
        step = comm.all_reduce(
            torch.tensor([int(run is not None), count], dtype=torch.long)
        )
        if step[0].item() < comm.world_size:
            break
        run()
        iters += 1
        seen += int(step[1].item())
        if bar is not None:
            bar.update()
    return iters, seen


def _reduce_and_write(
    layers: List[Tuple[str, _BatchNorm]],
    moments: List[_PooledMoments],
    comm: _Comm,
) -> List[str]:
    """All-reduce the moments of every layer and write the running
    statistics of the layers that saw at least two values per channel.
    Returns the names of the other layers, which are left as they were."""
    device = comm.device
    f64 = {'dtype': torch.float64, 'device': device}
    sizes = [bn.num_features for _, bn in layers]
    counts = torch.tensor([m.count for m in moments], **f64)
    means = [
        m.mean.to(device) if m.count else torch.zeros(c, **f64)
        for m, c in zip(moments, sizes)
    ]
    # Counts and sums add up across ranks; so do the squared deviations
    # once they are taken from the global mean (Chan et al., exactly).
    flat = comm.all_reduce(
        torch.cat([counts] + [n * mu for n, mu in zip(counts, means)])
    )
    total = flat[: len(layers)]
    global_means = [
        s / n if n > 0 else s
        for s, n in zip(flat[len(layers) :].split(sizes), total)
    ]
    m2 = torch.cat(
        [
            m.m2.to(device) + n * (mu - gmu).square()
            if m.count
            else torch.zeros(c, **f64)
            for m, n, mu, gmu, c in zip(
                moments, counts, means, global_means, sizes
            )
        ]
    )
    m2 = comm.all_reduce(m2).split(sizes)
    not_updated = []
    for (name, bn), n, mean, dev2 in zip(
        layers, total.tolist(), global_means, m2
    ):
        if n < 2:
            not_updated.append(name)
            continue
        bn.running_mean.copy_(mean)
        # Unbiased, like the running_var that BatchNorm itself keeps.
        bn.running_var.copy_(dev2 / (n - 1))
    return not_updated


def _plural(n: int, word: str) -> str:
    suffix = '' if n == 1 else 'es' if word.endswith('s') else 's'
    return f'{n} {word}{suffix}'


def _summary(
    num_layers: int, num_samples: int, num_iters: int, not_updated: List[str]
) -> Dict:
    return {
        'num_layers': num_layers,
        'num_samples': num_samples,
        'num_iters': num_iters,
        'not_updated': not_updated,
    }


def update_bn_stats(
    model: nn.Module,
    data_loader: Iterable,
    num_samples: int = 8192,
    *,
    prepare: Optional[Prepare] = None,
    device: Optional[torch.device] = None,
    progress: bool = True,
    logger: Optional[logging.Logger] = None,
) -> Dict:
    """Recompute the running statistics of the model's BatchNorm layers.

    Every BatchNorm layer in training mode that tracks running statistics
    gets, as ``running_mean``, the mean of all the values per channel it
    received over ``num_samples`` samples, and, as ``running_var``, their
    unbiased variance (the same convention as BatchNorm's own
    ``running_var``). Batches count by their number of values per channel
    and the spread between batch means is included, so the result is the
    population statistics of the pooled data, whatever the batch split. On
    several processes the per-rank sums are all-reduced: every rank ends
    with identical statistics, equal to those of one process seeing every
    rank's batches.

    Nothing else changes: weights, ``momentum``, ``num_batches_tracked``,
    every other buffer, the training flags of all modules and
    ``requires_grad`` are as before, and no gradients are created. Layers in
    eval mode (e.g. frozen ``norm_eval`` backbones) and layers without
    running statistics are skipped. A layer called several times per
    forward pools all its inputs; a layer never called keeps its
    statistics. If the model raises, nothing changes.

    Args:
        model (nn.Module): The model; ``DataParallel`` and
            ``DistributedDataParallel`` wrappers are unwrapped.
        data_loader (Iterable): The batches, usually the training data
            loader (with training augmentation). It may be shorter than
            needed, have no ``len`` or no ``batch_size`` (batch samplers),
            and differ in length between ranks.
        num_samples (int): How many samples to use over all ranks, rounded
            up to whole iterations. Defaults to 8192.
        prepare (callable, optional): How one batch reaches the model:
            ``prepare(batch)`` returns ``(run, n)``, where ``run()`` runs
            the forward pass and ``n`` is the number of samples in the
            batch (see :func:`count_samples`). It is called as soon as a
            batch is read; ``run`` only once every rank has a batch.
            Defaults to None: the model receives ``batch[0]`` for a
            tuple/list batch and ``batch`` otherwise (the convention of
            ``torch.optim.swa_utils.update_bn``).
        device (torch.device, optional): Where the default ``prepare``
            moves a tensor input; not allowed with ``prepare``. Defaults to
            None (no move).
        progress (bool): Whether rank 0 shows a progress bar on stderr.
            Defaults to True.
        logger (logging.Logger, optional): Where rank 0 logs the summary.
            Defaults to None (the ``mmtune.precise_bn`` logger).

    Returns:
        dict: ``num_layers`` (layers updated), ``num_samples`` and
        ``num_iters`` (samples over all ranks and iterations used), and
        ``not_updated`` (names of the layers that received no data and keep
        their statistics).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(
            f'num_samples must be an int, but got {num_samples!r} '
            f'of type {type(num_samples).__name__}'
        )
    if num_samples <= 0:
        raise ValueError(
            f'num_samples must be positive, but got {num_samples}'
        )
    if prepare is not None and device is not None:
        raise ValueError(
            f'device={device!r} moves the input of the default prepare '
            'only; with prepare=..., move the input there'
        )
    while isinstance(
        model, (nn.DataParallel, nn.parallel.DistributedDataParallel)
    ):
        model = model.module
    logger = logger or _LOGGER
    comm = _Comm()
    layers = _bn_layers(model)
    _check_same_layers(layers, comm)
    if not layers:
        if comm.rank == 0:
            logger.warning(
                'precise BN: no BatchNorm layer in training mode '
                'with running statistics; nothing to update.'
            )
        return _summary(0, 0, 0, [])

    moments = [_PooledMoments(bn.num_features) for _, bn in layers]
    buffers = [
        (module, name, buf, buf.clone())
        for module in model.modules()
        for name, buf in module.named_buffers(recurse=False)
        if not is_lazy(buf)
    ]
    modes = [(module, module.training) for module in model.modules()]
    handles = [
        bn.register_forward_pre_hook(m, with_kwargs=True)
        for (_, bn), m in zip(layers, moments)
    ]
    bar = None
    if progress and comm.rank == 0:
        bar = _ProgressBar(
            _estimate_iters(data_loader, num_samples, comm.world_size),
            sys.stderr,
        )
    try:
        with torch.no_grad():
            iters, seen = _run_batches(
                prepare or _default_prepare(model, device),
                data_loader,
                num_samples,
                comm,
                bar,
            )
    finally:
        if bar is not None:
            bar.close()
        for handle in handles:
            handle.remove()
        # The forward passes updated the running statistics (and whatever
        # else keeps state); put everything back before writing ours.
        with torch.no_grad():
            for module, name, buf, saved in buffers:
                setattr(module, name, buf)
                buf.copy_(saved)
        for module, mode in modes:
            module.training = mode

    with torch.no_grad():
        not_updated = _reduce_and_write(layers, moments, comm)
    if comm.rank == 0:
        if seen < num_samples:
            logger.warning(
                f'precise BN: the data ran out after {seen} of the '
                f'{num_samples} samples asked for; using those.'
            )
        if not_updated:
            logger.warning(
                f'precise BN: {len(not_updated)} BatchNorm layers received '
                'no data and keep their statistics: '
                f'{", ".join(not_updated)}'
            )
        logger.info(
            'precise BN: recomputed the statistics of '
            f'{len(layers) - len(not_updated)} BatchNorm layers from '
            f'{seen} samples ({_plural(iters, "iteration")} on '
            f'{_plural(comm.world_size, "process")}).'
        )
    return _summary(len(layers) - len(not_updated), seen, iters, not_updated)
