# Copyright (c) mmtune contributors. All rights reserved.
"""Benchmark tune mode against eval mode and the alternatives, side by side.

    python tools/analysis_tools/benchmark_fast_conv_bn_eval.py CONFIG \\
        [--modes eval tune tune-alone mmengine compile \\
                 compile-fx-pass tune-compile fold-floor] \\
        [--steps 15] [--warmup 5] [--batch-size N] [--img-size H W] \\
        [--amp {none,fp16,bf16}] [--synthetic] [--device cuda|cpu] \\
        [--out-dir DIR] [--cudnn-benchmark] [--cfg-options ...]

Every mode trains the same model (same seed, same weights, non-trivial BN
statistics) on the same batch, one ``model.train_step`` per step
(data preprocessor, loss, backward, SGD step), BN frozen as the config says
(``norm_eval``):

- ``eval``: nothing rewritten (the baseline);
- ``tune``: :func:`mmtune.turn_on_fast_conv_bn_eval` on the whole model;
- ``tune-alone``: the same with ``batch=False`` (each pair folds on its
  own, as before batched folding);
- ``mmengine``: mmengine's ``turn_on_efficient_conv_bn_eval`` on the
  modules of the config's ``efficient_conv_bn_eval`` key, else
  ``['backbone']`` (it fx-traces each module as a whole);
- ``compile``: ``model.forward = torch.compile(model.forward)``, as
  mmengine's ``compile=True`` does;
- ``compile-fx-pass``: the same with inductor's
  ``efficient_conv_bn_eval_fx_passes``;
- ``tune-compile``: tune mode, then compiled.
- ``fold-floor``: every pair folded once before training
  (:func:`mmtune.fuse_conv_bn`, deploy mode) and the folded convs trained.
  Not the same training (the BN affine is gone, gradients differ), but the
  same convolutions as tune mode without any per-step folding: the lowest
  step time any exact tune mode could reach on the workload.

Memory is measured mode by mode, right after that mode's warm-up; time in
interleaved rounds (each mode a few steps per round, in rotating order), so
that clock and thermal drift hit every mode alike. Writes ``benchmark.md``
(the table), ``benchmark.json`` (raw numbers) and ``benchmark.png`` to
``--out-dir``. See docs/benchmark.md.
"""

import argparse
import copy
import json
import logging
import math
import os
import os.path as osp
import platform
import shlex
import statistics
import sys
import time
from contextlib import contextmanager
from operator import attrgetter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.config import Config, DictAction
from mmengine.logging import MMLogger
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import MODELS, init_default_scope

from mmtune import fuse_conv_bn, turn_on_fast_conv_bn_eval
from mmtune.ops import observe_saved_tensors
from mmtune.testing import randomize_bn

MODES = (
    'eval',
    'tune',
    'tune-alone',
    'mmengine',
    'compile',
    'compile-fx-pass',
    'tune-compile',
    'fold-floor',
)
DEFAULT_MODES = ('eval', 'tune', 'mmengine')
MiB = 1024.0**2


# ---------------------------------------------------------------------------
# config, model and batch (also used by check_fast_conv_bn_eval.py)
# ---------------------------------------------------------------------------
def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """Load a config, merge options, drop pretrained weights, set the scope.

    The backbone's ``init_cfg`` is set to None: no weights are downloaded.
    """
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    backbone = cfg.model.get('backbone')
    if isinstance(backbone, dict):
        backbone['init_cfg'] = None
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    return cfg


def build_model(cfg: Config, seed: int = 0) -> torch.nn.Module:
    """Build ``cfg.model`` with initialised weights and random BN statistics.

    The same seed always gives the same weights. The model is on the CPU, in
    ``train()`` mode (so BN layers are frozen exactly as ``norm_eval`` says).
    """
    torch.manual_seed(seed)
    model = MODELS.build(copy.deepcopy(cfg.model))
    if hasattr(model, 'init_weights'):
        # as the Runner does, without logging every parameter's init
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel(logging.WARNING)
        try:
            model.init_weights()
        finally:
            logger.setLevel(level)
    randomize_bn(model, seed)
    return model.train()


def _find_key(obj: Any, key: str) -> Any:
    """The first value of ``key`` in nested dicts and lists, or None."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        children = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    else:
        return None
    for child in children:
        found = _find_key(child, key)
        if found is not None:
            return found
    return None


def _train_pipeline(cfg: Config) -> list:
    loader = cfg.get('train_dataloader') or {}
    pipeline = _find_key(loader.get('dataset') or {}, 'pipeline')
    if pipeline is None:
        pipeline = cfg.get('train_pipeline')
    return list(pipeline or [])


def image_size_from_cfg(cfg: Config) -> Optional[Tuple[int, int]]:
    """``(height, width)`` of the config's training images, if it says.

    From ``synthetic_input.img_size`` (height, width), else the largest
    ``scale`` (width, height, as in mmcv) of a resize in the train pipeline.
    """
    synthetic = cfg.get('synthetic_input') or {}
    if synthetic.get('img_size') is not None:
        h, w = synthetic['img_size']
        return int(h), int(w)
    for step in _train_pipeline(cfg):
        if not str(step.get('type', '')).endswith('Resize'):
            continue
        scale = step.get('scale', step.get('scales'))
        if isinstance(scale, int):
            return scale, scale
        if isinstance(scale, (list, tuple)) and scale:
            if isinstance(scale[0], (list, tuple)):  # a range or choices
                scale = max(scale, key=lambda s: s[0] * s[1])
            w, h = scale
            return int(h), int(w)
    return None


def _is_detector(model: torch.nn.Module) -> bool:
    try:
        from mmdet.models.detectors import BaseDetector
    except ImportError:
        return False
    return isinstance(model, BaseDetector)


def synthetic_batch(
    cfg: Config,
    model: torch.nn.Module,
    batch_size: int,
    img_size: Tuple[int, int],
    seed: int = 0,
) -> dict:
    """A batch as a dataloader would give it, of random images.

    For mmdet detectors: ``inputs`` a list of uint8 ``(3, H, W)`` images and
    ``data_samples`` ``DetDataSample``s with 1 to 8 random ground-truth
    boxes each (and box masks if the pipeline loads masks). Otherwise
    (classifiers such as :class:`mmtune.models.SimpleImageClassifier`):
    ``inputs`` a uint8 ``(N, 3, H, W)`` tensor and ``data_samples`` a
    LongTensor of labels.
    """
    gen = torch.Generator().manual_seed(seed)
    h, w = img_size
    num_classes = _find_key(cfg.model, 'num_classes') or 80
    images = torch.randint(
        0, 256, (batch_size, 3, h, w), generator=gen, dtype=torch.uint8
    )
    if not _is_detector(model):
        labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
        return dict(inputs=images, data_samples=labels)

    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    with_mask = any(
        step.get('with_mask', False) for step in _train_pipeline(cfg)
    )
    samples = []
    for i in range(batch_size):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        size = torch.rand(n, 2, generator=gen) * 0.4 + 0.05
        size = size * torch.tensor([w, h])
        xy = torch.rand(n, 2, generator=gen) * (torch.tensor([w, h]) - size)
        boxes = torch.cat([xy, xy + size], dim=1).floor()
        sample = DetDataSample(
            metainfo=dict(
                img_id=i,
                img_path=f'<synthetic {i}>',
                ori_shape=(h, w),
                img_shape=(h, w),
                scale_factor=(1.0, 1.0),
                flip=False,
                flip_direction=None,
            )
        )
        gt = InstanceData()
        gt.bboxes = boxes
        gt.labels = torch.randint(0, num_classes, (n,), generator=gen)
        if with_mask:
            masks = torch.zeros(n, h, w, dtype=torch.uint8)
            for j, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
                masks[j, y1:y2, x1:x2] = 1
            gt.masks = BitmapMasks(masks.numpy(), h, w)
        ignored = InstanceData()
        ignored.bboxes = torch.zeros(0, 4)
        ignored.labels = torch.zeros(0, dtype=torch.long)
        sample.gt_instances = gt
        sample.ignored_instances = ignored
        samples.append(sample)
    return dict(inputs=list(images), data_samples=samples)


def load_batch(
    cfg: Config,
    model: torch.nn.Module,
    batch_size: Optional[int] = None,
    synthetic: bool = False,
    img_size: Optional[Sequence[int]] = None,
    seed: int = 0,
) -> Tuple[dict, str]:
    """One training batch: from the config's train dataloader, or synthetic.

    The dataloader is tried unless ``synthetic`` or ``img_size`` is given
    (the demo dataset is generated first if the config asks for it); if it
    cannot be built (no dataset on disk), a synthetic batch of the same
    size (:func:`synthetic_batch`) is made instead.

    Returns:
        tuple[dict, str]: The batch and where it came from, in words.
    """
    loader_cfg = copy.deepcopy(dict(cfg.get('train_dataloader') or {}))
    if batch_size is None:
        batch_size = loader_cfg.get('batch_size') or 1
    reason = 'asked for'
    if not synthetic and img_size is None:
        if not loader_cfg.get('dataset'):
            reason = 'the config has no dataset'
        else:
            try:
                from mmengine.runner import Runner, set_random_seed

                from mmtune.datasets import prepare_demo_data

                prepare_demo_data(cfg)
                set_random_seed(seed)  # the same batch, augmentation too
                loader_cfg.update(
                    batch_size=batch_size,
                    num_workers=0,
                    persistent_workers=False,
                )
                loader = Runner.build_dataloader(loader_cfg, seed=seed)
                batch = next(iter(loader))
                dataset = type(loader.dataset).__name__
                return batch, f'{dataset} (train dataloader)'
            except Exception as exc:  # noqa: BLE001  (any: fall back)
                reason = f'no dataset ({_one_line(exc)})'
    if img_size is None:
        img_size = image_size_from_cfg(cfg)
        if img_size is None:
            raise ValueError(
                'cannot tell the image size from the config (no '
                "synthetic_input.img_size, no 'scale' of a Resize in the "
                'train pipeline): give --img-size H W'
            )
    h, w = img_size
    batch = synthetic_batch(cfg, model, batch_size, (h, w), seed)
    return batch, f'synthetic {h}x{w} ({reason})'


def _one_line(exc: BaseException, limit: int = 120) -> str:
    text = f'{type(exc).__name__}: {exc}'.strip().splitlines()[0]
    text = text.replace('|', '/')
    return text if len(text) <= limit else text[: limit - 3] + '...'


# ---------------------------------------------------------------------------
# modes
# ---------------------------------------------------------------------------
def _mmengine_modules(cfg: Config, model: torch.nn.Module) -> List[str]:
    modules = cfg.get('efficient_conv_bn_eval')
    if modules:
        return [modules] if isinstance(modules, str) else list(modules)
    if hasattr(model, 'backbone'):
        return ['backbone']
    raise ValueError('no efficient_conv_bn_eval key and no backbone')


def turn_on_mmengine(cfg: Config, model: torch.nn.Module) -> int:
    """mmengine's efficient_conv_bn_eval; returns the pairs it rewrote."""
    from mmengine.model.efficient_conv_bn_eval import (
        efficient_conv_bn_eval_control,
        turn_on_efficient_conv_bn_eval,
    )

    modules = _mmengine_modules(cfg, model)
    turn_on_efficient_conv_bn_eval(model, modules)
    count = 0
    for name in modules:
        traced = getattr(attrgetter(name)(model).forward, '__self__', None)
        if isinstance(traced, torch.fx.GraphModule):
            count += sum(
                node.target is efficient_conv_bn_eval_control
                for node in traced.graph.nodes
            )
    return count


def _compile(model: torch.nn.Module, fx_pass: bool = False) -> None:
    # The forward is compiled, not train_step as mmengine's `compile=True`
    # does: dynamo cannot trace mmengine's AmpOptimWrapper.optim_context
    # (docs/config.md), and the optimizer step is the same in every mode.
    # Separate options give a separate backend, so dynamo does not reuse
    # one mode's compiled code for another mode's model.
    options = {'efficient_conv_bn_eval_fx_passes': True} if fx_pass else None
    model.forward = torch.compile(model.forward, options=options)


def _inductor_counter(name: str) -> int:
    from torch._dynamo.utils import counters

    return counters['inductor'][name]


class _CPUAutocastOptimWrapper(OptimWrapper):
    """An OptimWrapper whose forward runs under CPU autocast (bfloat16);
    mmengine's AmpOptimWrapper needs CUDA."""

    @contextmanager
    def optim_context(self, model):
        with super().optim_context(model):
            with torch.autocast('cpu', dtype=torch.bfloat16):
                yield


def build_optim_wrapper(
    model: torch.nn.Module, amp: str, device: str
) -> OptimWrapper:
    """SGD (lr 1e-4, momentum 0.9) on the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    if amp == 'none':
        return OptimWrapper(optimizer)
    if device == 'cpu':
        return _CPUAutocastOptimWrapper(optimizer)
    dtype = {'fp16': 'float16', 'bf16': 'bfloat16'}[amp]
    return AmpOptimWrapper(optimizer=optimizer, dtype=dtype)


class ModeRun:
    """One mode's model, optimizer, batch and measurements."""

    def __init__(self, mode: str):
        self.mode = mode
        self.model: Optional[torch.nn.Module] = None
        self.optim_wrapper: Optional[OptimWrapper] = None
        self.data: Optional[dict] = None
        self.pairs: Optional[int] = None
        self.error: Optional[str] = None
        self.setup_s: Optional[float] = None
        self.warmup_s: Optional[float] = None
        self.memory: Dict[str, float] = {}
        self.times: List[float] = []

    def fail(self, where: str, exc: BaseException) -> None:
        self.error = f'failed: {_one_line(exc)}'
        print(f'[{self.mode}] {where} {self.error}', flush=True)
        self.model = self.optim_wrapper = self.data = None

    def result(self) -> dict:
        times = self.times
        return dict(
            mode=self.mode,
            error=self.error,
            pairs_converted=self.pairs,
            setup_s=self.setup_s,
            warmup_s=self.warmup_s,
            memory=self.memory,
            step_ms=[t * 1e3 for t in times],
            median_step_ms=statistics.median(times) * 1e3 if times else None,
            mean_step_ms=statistics.mean(times) * 1e3 if times else None,
            min_step_ms=min(times) * 1e3 if times else None,
        )


def setup_mode(run: ModeRun, cfg: Config, args, batch: dict) -> None:
    """Build the model of ``run.mode`` on the device with its optimizer."""
    start = time.perf_counter()
    model = build_model(cfg, args.seed)
    mode = run.mode
    if mode in ('tune', 'tune-compile'):
        run.pairs = len(turn_on_fast_conv_bn_eval(model).converted)
    elif mode == 'tune-alone':
        report = turn_on_fast_conv_bn_eval(model, batch=False)
        run.pairs = len(report.converted)
    elif mode == 'mmengine':
        run.pairs = turn_on_mmengine(cfg, model)
    elif mode == 'fold-floor':
        run.pairs = len(fuse_conv_bn(model).converted)
    else:
        run.pairs = 0
    model.to(args.device)
    if mode in ('compile', 'tune-compile'):
        _compile(model)
    elif mode == 'compile-fx-pass':
        _compile(model, fx_pass=True)
    run.model = model
    run.optim_wrapper = build_optim_wrapper(model, args.amp, args.device)
    run.data = model.data_preprocessor.cast_data(copy.deepcopy(batch))
    run.setup_s = time.perf_counter() - start


def _sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def train_step(run: ModeRun, seed: int) -> None:
    # Same seed before every step of every mode: detectors' random
    # samplers then pick the same boxes in all modes.
    torch.manual_seed(seed)
    run.model.train_step(run.data, run.optim_wrapper)


def timed_step(run: ModeRun, device: str, seed: int) -> float:
    _sync(device)
    start = time.perf_counter()
    train_step(run, seed)
    _sync(device)
    return time.perf_counter() - start


def warm_up(run: ModeRun, args) -> None:
    """``--warmup`` steps (at least one: compiled modes compile here)."""
    counter = _inductor_counter('efficient_conv_bn_eval')
    start = time.perf_counter()
    for _ in range(max(args.warmup, 1)):
        train_step(run, args.seed)
    _sync(args.device)
    run.warmup_s = time.perf_counter() - start
    if run.mode == 'compile-fx-pass':
        run.pairs = _inductor_counter('efficient_conv_bn_eval') - counter


def measure_cuda_memory(run: ModeRun, args, base: int) -> None:
    """Peak of one step: above what was allocated before it, and above
    what was allocated before this mode's model came to the GPU (``base``:
    other modes' resident models are not counted)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    requested_before = _requested_bytes('current')
    torch.cuda.reset_peak_memory_stats()
    train_step(run, args.seed)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    run.memory = dict(
        step_peak_mib=(peak - before) / MiB,
        absolute_peak_mib=(peak - base) / MiB,
        allocated_before_step_mib=(before - base) / MiB,
        raw_peak_allocated_mib=peak / MiB,
    )
    requested_peak = _requested_bytes('peak')
    if requested_before is not None and requested_peak is not None:
        run.memory['step_peak_requested_mib'] = (
            requested_peak - requested_before
        ) / MiB


def _requested_bytes(which: str) -> Optional[int]:
    """The bytes the tensors asked the CUDA allocator for (``which``:
    'current' or 'peak'). Allocated bytes also count what the allocator
    rounds up or leaves unsplit in a block, which depends on the order of
    earlier allocations and varies by a few MiB between runs of the same
    code; this counts only what the tensors asked for."""
    return torch.cuda.memory_stats().get(f'requested_bytes.all.{which}')


def measure_saved_tensors(run: ModeRun) -> None:
    """Bytes autograd keeps for backward in one training forward (unique
    storages, the model's parameters and buffers excluded)."""
    model = run.model
    own = {
        t.untyped_storage().data_ptr()
        for t in list(model.parameters()) + list(model.buffers())
    }
    saved: Dict[Tuple[int, str], int] = {}

    def note(t):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in own:
                saved[(ptr, str(t.device))] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass  # tensors without storage (e.g. sparse, fake)

    # an observer, not hooks of our own: tune mode keeps its recipes for
    # folded weights under it, as it does in training
    with run.optim_wrapper.optim_context(model):
        with observe_saved_tensors(note):
            data = model.data_preprocessor(run.data, True)
            losses = model._run_forward(data, mode='loss')
    del losses, data
    run.memory = dict(saved_for_backward_mib=sum(saved.values()) / MiB)


def timing_rounds(runs: List[ModeRun], args) -> None:
    per_round = max(1, min(args.round_steps, args.steps))
    rounds = math.ceil(args.steps / per_round)
    for r in range(rounds):
        n = min(per_round, args.steps - r * per_round)
        active = [run for run in runs if run.error is None]
        shift = r % max(len(active), 1)
        for run in active[shift:] + active[:shift]:
            try:
                for _ in range(n):
                    run.times.append(timed_step(run, args.device, args.seed))
            except Exception as exc:  # noqa: BLE001  (report, go on)
                run.fail('timing', exc)


def _device_warm_up(device: str) -> None:
    """Create the cuBLAS/cuDNN handles and workspaces before anything is
    measured, so that no mode pays for them."""
    if not device.startswith('cuda'):
        return
    conv = torch.nn.Conv2d(3, 8, 3).to(device)
    linear = torch.nn.Linear(8, 8).to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    linear(conv(x).mean((2, 3))).sum().backward()
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------
def environment(args, batch_shape) -> Dict[str, Any]:
    """What the figures depend on."""
    import mmcv
    import mmengine

    import mmtune

    env = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        mmengine=mmengine.__version__,
        mmcv=mmcv.__version__,
        mmtune=mmtune.__version__,
        device=args.device,
        precision='fp32' if args.amp == 'none' else f'amp {args.amp}',
        batch_shape=list(batch_shape),
        cudnn_benchmark=torch.backends.cudnn.benchmark,
    )
    try:
        import mmdet

        env['mmdet'] = mmdet.__version__
    except ImportError:
        pass
    if args.device.startswith('cuda'):
        env.update(
            device_name=torch.cuda.get_device_name(),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    else:
        env.update(
            device_name=_cpu_name(),
            cpu_threads=torch.get_num_threads(),
        )
    return env


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratio(value, base) -> str:
    if value is None or not base:
        return ''
    return f'{value / base:.2f}'


def markdown_table(results: List[dict], cuda: bool) -> Tuple[str, str]:
    """The table, and the mode the ratios are relative to."""
    ok = [r for r in results if r['error'] is None]
    base = next((r for r in ok if r['mode'] == 'eval'), ok[0] if ok else None)
    base_name = base['mode'] if base else 'eval'
    mem_key = 'step_peak_mib' if cuda else 'saved_for_backward_mib'
    if cuda:
        head = [
            'mode',
            'step peak memory (MiB)',
            f'ratio to {base_name}',
            'absolute peak (MiB)',
            'step peak, tensors (MiB)',
        ]
    else:
        head = ['mode', 'saved for backward (MiB)', f'ratio to {base_name}']
    head += ['median step (ms)', f'ratio to {base_name}', 'pairs converted']
    lines = [
        '| ' + ' | '.join(head) + ' |',
        '|' + '|'.join([' --- '] + [' ---: '] * (len(head) - 1)) + '|',
    ]
    base_mem = base['memory'].get(mem_key) if base else None
    base_time = base['median_step_ms'] if base else None
    for r in results:
        if r['error'] is not None:
            cells = [r['mode'], r['error']] + [''] * (len(head) - 2)
        else:
            mem = r['memory'].get(mem_key)
            ms = r['median_step_ms']
            cells = [
                r['mode'],
                'n/a' if mem is None else f'{mem:.1f}',
                _ratio(mem, base_mem),
            ]
            if cuda:
                requested = r['memory'].get('step_peak_requested_mib')
                cells += [
                    f'{r["memory"]["absolute_peak_mib"]:.1f}',
                    'n/a' if requested is None else f'{requested:.2f}',
                ]
            cells += [
                '' if ms is None else f'{ms:.1f}',
                _ratio(ms, base_time),
                str(r['pairs_converted']),
            ]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines), base_name


def bar_chart(results: List[dict], cuda: bool, title: str, path: str):
    """Memory and time of each mode relative to the baseline, as bars."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    ok = [r for r in results if r['error'] is None and r['median_step_ms']]
    mem_key = 'step_peak_mib' if cuda else 'saved_for_backward_mib'
    base = next((r for r in ok if r['mode'] == 'eval'), ok[0] if ok else None)
    fig, ax = plt.subplots(figsize=(1.6 * max(len(ok), 2) + 2, 4))
    if base is not None:
        x = range(len(ok))
        base_mem = base['memory'].get(mem_key)
        mem = [
            r['memory'][mem_key] / base_mem
            if base_mem and r['memory'].get(mem_key) is not None
            else math.nan
            for r in ok
        ]
        tm = [r['median_step_ms'] / base['median_step_ms'] for r in ok]
        width = 0.38
        mem_label = 'step peak memory' if cuda else 'saved for backward'
        for offset, values, label in (
            (-width / 2, mem, mem_label),
            (width / 2, tm, 'median step time'),
        ):
            heights = [0.0 if math.isnan(v) else v for v in values]
            bars = ax.bar([i + offset for i in x], heights, width, label=label)
            texts = ['n/a' if math.isnan(v) else f'{v:.2f}' for v in values]
            ax.bar_label(bars, labels=texts, fontsize=8)
        ax.axhline(1.0, color='grey', linewidth=0.8, linestyle='--')
        ax.set_xticks(list(x))
        ax.set_xticklabels([r['mode'] for r in ok])
        ax.set_ylabel(f'ratio to {base["mode"]}')
        ax.legend(loc='upper left', bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Benchmark tune mode (fast_conv_bn_eval) against eval '
        'mode, mmengine efficient_conv_bn_eval and torch.compile: peak '
        'memory and step time of model.train_step, side by side.'
    )
    parser.add_argument('config', help='config file')
    parser.add_argument(
        '--modes',
        nargs='+',
        choices=MODES,
        default=list(DEFAULT_MODES),
        help=f'modes to compare (default: {" ".join(DEFAULT_MODES)})',
    )
    parser.add_argument(
        '--steps', type=int, default=15, help='timed steps per mode'
    )
    parser.add_argument(
        '--warmup', type=int, default=5, help='warm-up steps per mode'
    )
    parser.add_argument(
        '--round-steps',
        type=int,
        default=3,
        help='steps of one mode in a row within a timing round (default 3)',
    )
    parser.add_argument(
        '--batch-size',
        type=int,
        help="batch size (default: the config's train_dataloader)",
    )
    parser.add_argument(
        '--img-size',
        '--shape',
        dest='img_size',
        nargs=2,
        type=int,
        metavar=('H', 'W'),
        help='image size of a synthetic batch (implies --synthetic)',
    )
    parser.add_argument(
        '--amp',
        choices=['none', 'fp16', 'bf16'],
        default='none',
        help='mixed precision: AmpOptimWrapper on CUDA, bfloat16 autocast '
        'on CPU (default: none)',
    )
    parser.add_argument(
        '--synthetic',
        action='store_true',
        help="random inputs of the config's size instead of its dataset "
        '(the default when the dataset is not available)',
    )
    parser.add_argument(
        '--device',
        default='cuda' if torch.cuda.is_available() else 'cpu',
        help='cuda or cpu (default: cuda if available)',
    )
    parser.add_argument(
        '--out-dir',
        help='where to write benchmark.md/.json/.png (default: '
        'work_dirs/benchmark_fast_conv_bn_eval/<config name>)',
    )
    parser.add_argument(
        '--cudnn-benchmark',
        action='store_true',
        help='set torch.backends.cudnn.benchmark = True',
    )
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value',
    )
    args = parser.parse_args(argv)
    for name in ('steps', 'round_steps', 'batch_size'):
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = '--' + name.replace('_', '-')
            parser.error(f'{flag} must be >= 1, got {value}')
    if args.warmup < 0:
        parser.error(f'--warmup must be >= 0, got {args.warmup}')
    if args.img_size is not None and min(args.img_size) < 32:
        parser.error(f'--img-size must be at least 32, got {args.img_size}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error(f'--device {args.device}: CUDA is not available')
    if args.device not in ('cpu',) and not args.device.startswith('cuda'):
        parser.error(f'--device must be cuda or cpu, got {args.device!r}')
    if args.device == 'cpu' and args.amp == 'fp16':
        parser.error('--amp fp16 needs CUDA; use --amp bf16 on the CPU')
    if not osp.isfile(args.config):
        parser.error(f'no such config file: {args.config}')
    args.modes = list(dict.fromkeys(args.modes))
    return args


def _raise_dynamo_limits() -> None:
    # Several compiled models share code objects; do not let dynamo give
    # up and fall back to eager after 8 variants.
    import torch._dynamo.config as dynamo_config

    for name in (
        'recompile_limit',
        'cache_size_limit',
        'accumulated_recompile_limit',
        'accumulated_cache_size_limit',
    ):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = args.device.startswith('cuda')
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if any('compile' in mode for mode in args.modes):
        _raise_dynamo_limits()
    cfg = load_config(args.config, args.cfg_options)
    name = osp.splitext(osp.basename(args.config))[0]
    out_dir = args.out_dir or osp.join(
        'work_dirs', 'benchmark_fast_conv_bn_eval', name
    )
    os.makedirs(out_dir, exist_ok=True)

    probe = build_model(cfg, args.seed)
    batch, source = load_batch(
        cfg, probe, args.batch_size, args.synthetic, args.img_size, args.seed
    )
    with torch.no_grad():
        inputs = probe.data_preprocessor(copy.deepcopy(batch), True)['inputs']
    batch_shape = tuple(inputs.shape)
    del probe, inputs

    env = environment(args, batch_shape)
    print(f'config: {args.config}')
    print(f'batch: {source}')
    for key, value in env.items():
        print(f'{key}: {value}')
    print(f'modes: {" ".join(args.modes)}', flush=True)

    _device_warm_up(args.device)
    runs = [ModeRun(mode) for mode in args.modes]
    for run in runs:
        base = torch.cuda.memory_allocated() if cuda else 0
        try:
            setup_mode(run, cfg, args, batch)
        except Exception as exc:  # noqa: BLE001  (report, go on)
            run.fail('setup', exc)
            continue
        try:
            warm_up(run, args)
            if cuda:
                measure_cuda_memory(run, args, base)
            elif 'compile' not in run.mode:
                measure_saved_tensors(run)
            # else: autograd's saved-tensor hooks do not see what a
            # compiled graph keeps, so there is no CPU figure to give
        except Exception as exc:  # noqa: BLE001
            run.fail('warm-up', exc)
            if cuda:
                torch.cuda.empty_cache()
            continue
        memory = ', '.join(f'{k}={v:.1f}' for k, v in run.memory.items())
        print(
            f'[{run.mode}] built in {run.setup_s:.1f} s, warmed up in '
            f'{run.warmup_s:.1f} s, {run.pairs} pairs converted, memory: '
            f'{memory or "n/a"}',
            flush=True,
        )
    timing_rounds(runs, args)

    results = [run.result() for run in runs]
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(['python', osp.relpath(__file__)] + argv)
    table, base_name = markdown_table(results, cuda)
    title = (
        f'{name}: {env["device_name"]}, {env["precision"]}, '
        f'batch {"x".join(map(str, batch_shape))}'
    )
    header = [
        f'# {title}',
        '',
        f'Command: `{command}`',
        '',
        f'Batch: {source}. Median of {args.steps} steps per mode after '
        f'{args.warmup} warm-up steps, interleaved rounds of '
        f'{min(args.round_steps, args.steps)} steps. '
        + (
            'Memory: peak allocated during one step minus what was '
            'allocated before it (absolute: minus what was allocated '
            "before the mode's model came to the GPU; tensors: the same "
            "for the bytes tensors requested, without the allocator's "
            'rounding).'
            if cuda
            else 'Memory: bytes autograd saves for backward in one '
            'training forward (unique storages, parameters excluded).'
        ),
        '',
        'Environment: '
        + ', '.join(f'{k}={v}' for k, v in env.items() if k != 'batch_shape'),
        '',
    ]
    markdown = '\n'.join(header + [table, ''])
    print()
    print(table, flush=True)
    with open(osp.join(out_dir, 'benchmark.md'), 'w') as f:
        f.write(markdown)
    record = dict(
        config=args.config,
        command=command,
        batch_source=source,
        steps=args.steps,
        warmup=args.warmup,
        round_steps=args.round_steps,
        seed=args.seed,
        baseline=base_name,
        environment=env,
        results=results,
    )
    with open(osp.join(out_dir, 'benchmark.json'), 'w') as f:
        json.dump(record, f, indent=2)
    bar_chart(results, cuda, title, osp.join(out_dir, 'benchmark.png'))
    print(f'written: {out_dir}/benchmark.md, benchmark.json, benchmark.png')
    return 0 if any(r['error'] is None for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
