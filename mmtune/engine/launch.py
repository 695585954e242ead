# Copyright (c) mmtune contributors. All rights reserved.
"""Launch helpers shared by ``tools/train.py`` and ``tools/test.py``."""

import datetime
import os

import torch
import torch.distributed as torch_dist
from mmengine.config import Config, ConfigDict


def setup_cpu_distributed(cfg: Config) -> None:
    """Let ``--launcher pytorch`` run on a machine without CUDA.

    mmengine initialises the process group with the config's backend (nccl
    in mmdet's configs) after ``torch.cuda.set_device``, and wraps the model
    in DDP with ``device_ids=[LOCAL_RANK]``: all three fail without CUDA.
    Here the gloo group is started first (the runner then keeps it) and DDP
    gets ``device_ids=None``, as it needs for a CPU model.
    """
    if (
        cfg.launcher != 'pytorch'
        or torch.cuda.is_available()
        or torch_dist.is_initialized()
    ):
        return
    dist_cfg = cfg.setdefault('env_cfg', ConfigDict()).setdefault(
        'dist_cfg', ConfigDict()
    )
    if dist_cfg.get('backend', 'nccl') == 'nccl':
        dist_cfg.backend = 'gloo'
    kwargs = dict(dist_cfg)
    if kwargs.get('timeout') is not None:  # seconds, as mmengine takes it
        kwargs['timeout'] = datetime.timedelta(seconds=kwargs['timeout'])
    torch_dist.init_process_group(**kwargs)
    wrapper_cfg = cfg.get('model_wrapper_cfg')
    if wrapper_cfg is None:
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel',
            device_ids=None,
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False),
        )
    elif wrapper_cfg.get('type') in (None, 'MMDistributedDataParallel'):
        wrapper_cfg.setdefault('device_ids', None)


def allow_full_checkpoint_load() -> None:
    """Let torch.load read mmengine's checkpoints again (torch >= 2.6).

    Their ``message_hub`` holds mmengine's ``HistoryBuffer`` and numpy
    arrays, which the ``weights_only=True`` default of torch >= 2.6
    refuses (numpy 2 needs ``getattr`` allow-listed, which would defeat the
    point). The tools load them in full, as with torch < 2.6: load only
    checkpoints you trust. Set ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` to keep
    torch's default.
    """
    if 'TORCH_FORCE_WEIGHTS_ONLY_LOAD' not in os.environ:
        os.environ.setdefault('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')


def close_distributed() -> None:
    """Free what the finished run left (its DDP reducer among it), then
    destroy the process group. Call it after dropping the last reference
    to the runner.

    Left to interpreter exit, a gloo group can be torn down while a DDP
    reducer still holds it: the process then aborts ("terminate called
    without an active exception") or hangs.
    """
    import gc

    gc.collect()
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
