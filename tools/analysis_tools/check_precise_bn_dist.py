# Copyright (c) mmtune contributors. All rights reserved.
"""Check precise BN across processes: identical and exact on every rank.

Run it with torchrun, on CPUs (gloo) or one GPU per process (nccl)::

    torchrun --standalone --nproc_per_node=2 \\
        tools/analysis_tools/check_precise_bn_dist.py
    torchrun --standalone --nproc_per_node=2 \\
        tools/analysis_tools/check_precise_bn_dist.py --backend nccl

Every rank gets a different amount of data with a different batch size.
Before joining the process group each rank computes the reference: one
process running ``update_bn_stats`` on every rank's batches, as many
iterations as the distributed run must use (until ``num_samples`` samples
over all ranks, or until the shortest loader runs out). Then the ranks run
``update_bn_stats`` together, each on its own data, and compare: the
statistics must be identical on all ranks and equal to the reference, and
``num_batches_tracked`` must be unchanged. Last, a model with one more
BN in training mode on rank 1 must be refused by every rank (not hang).

The model has stacked BNs, a ``momentum=None`` BN, a BN called twice per
forward, a BN called only for odd batch sizes (so on some ranks only), a
frozen BN in eval mode, a BN without running statistics, and with nccl a
``SyncBatchNorm``. Three loaders are tried: a ``DataLoader`` with
``batch_size`` (the data runs out first), one with a batch sampler
(``batch_size`` is ``None``; ``num_samples`` stops it half way) and an
iterable without ``len`` (``num_samples`` below one global batch).

Rank 0 prints one line per case and then ``PASS`` or ``FAIL``; the exit
code is 0 only if every case passed.
"""

import argparse
import logging
import os
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mmtune.precise_bn import update_bn_stats

# loader kind -> num_samples
CASES = {'batch_size': 10**6, 'batch_sampler': 15, 'no_len': 3}


class _Net(nn.Module):
    """A small conv net whose BNs cover the awkward cases."""

    def __init__(self, sync_bn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8, momentum=None)
        self.bn_odd = nn.BatchNorm2d(8)
        self.bn_twice = nn.BatchNorm2d(8, affine=False)
        self.bn_frozen = nn.BatchNorm2d(8)
        self.bn_no_stats = nn.BatchNorm2d(8, track_running_stats=False)
        self.fc = nn.Linear(8, 4)
        self.bn_out = nn.SyncBatchNorm(4) if sync_bn else nn.BatchNorm1d(4)

    def train(self, mode: bool = True) -> 'nn.Module':
        super().train(mode)
        self.bn_frozen.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        if x.shape[0] % 2 == 1:
            y = y + self.bn_odd(x)
        y = self.bn_twice(F.relu(y))
        y = self.bn_twice(self.bn_frozen(y) * 2 + 1)
        y = self.bn_no_stats(y)
        return self.bn_out(self.fc(y.mean((2, 3))))


def _build_model(sync_bn: bool, device: torch.device) -> _Net:
    torch.manual_seed(0)
    model = _Net(sync_bn)
    for m in model.modules():  # non-trivial statistics and affine values
        if getattr(m, 'running_mean', None) is not None:
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    return model.to(device).train()


def _rank_data(rank: int, device: torch.device) -> TensorDataset:
    """Rank ``rank``'s samples: 12 + 5 * rank images with channel means far
    from 0 and unequal spreads."""
    gen = torch.Generator().manual_seed(1000 + rank)
    n = 12 + 5 * rank
    x = torch.randn(n, 3, 6, 6, generator=gen)
    x = x * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1)
    x = x + torch.tensor([4.0, -2.0, 10.0]).view(1, 3, 1, 1)
    y = torch.randint(0, 4, (n,), generator=gen)
    return TensorDataset(x.to(device), y.to(device))


class _NoLen:
    """An iterable of batches without ``len`` or ``batch_size``."""

    def __init__(self, batches: List[Tuple[torch.Tensor, ...]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _make_loader(kind: str, rank: int, device: torch.device):
    data = _rank_data(rank, device)
    if kind == 'batch_size':
        return DataLoader(data, batch_size=2 + rank)
    # Batches of 2, 3, 4, 2, 3, 4, ... (the last one may be smaller, but
    # BN needs more than one value per channel).
    sizes, start = [], 0
    while start < len(data):
        size = min(2 + len(sizes) % 3, len(data) - start)
        if size < 2:
            sizes[-1] += size
        else:
            sizes.append(size)
        start += size
    bounds = torch.tensor([0] + sizes).cumsum(0).tolist()
    batches = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    loader = DataLoader(data, batch_sampler=batches)
    if kind == 'batch_sampler':
        return loader
    return _NoLen(list(loader))


def _expected_batches(
    kind: str, num_samples: int, world_size: int, device: torch.device
) -> Tuple[list, int]:
    """Every rank's batches that the distributed run must use, and the
    number of iterations: as many as all ranks can provide, stopping once
    ``num_samples`` samples over all ranks went through."""
    per_rank = [list(_make_loader(kind, r, device)) for r in range(world_size)]
    batches, seen, iters = [], 0, 0
    while seen < num_samples and all(iters < len(b) for b in per_rank):
        step = [b[iters] for b in per_rank]
        batches += step
        seen += sum(len(x) for x, _ in step)
        iters += 1
    return batches, iters


def _stats(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))
    }


def _max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _on_all_ranks(passed: bool, device: torch.device) -> bool:
    flag = torch.tensor([int(passed)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _check_case(case: str, reference: tuple, args, device: torch.device):
    """Run one case on all ranks; return (passed on all ranks, report)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    expected, before, iters = reference
    model = _build_model(args.backend == 'nccl', device)
    summary = update_bn_stats(
        model, _make_loader(case, rank, device), CASES[case]
    )
    stats = _stats(model)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, {k: v.cpu() for k, v in stats.items()})
    across = max(_max_diff(g, gathered[0]) for g in gathered)
    relative = max(
        (
            (stats[k].double() - expected[k].double()).abs()
            / (1 + expected[k].double().abs())
        )
        .max()
        .item()
        for k in stats
    )
    tracked_same = all(
        torch.equal(stats[k], before[k])
        for k in stats
        if k.endswith('num_batches_tracked')
    )
    passed = _on_all_ranks(
        across == 0
        and relative <= args.tol
        and tracked_same
        and _max_diff(stats, before) > 0
        and summary['num_iters'] == iters,
        device,
    )
    line = (
        f'[{case}] backend={args.backend} world_size={world_size} '
        f'iters={summary["num_iters"]} (expected {iters}) '
        f'samples={summary["num_samples"]} '
        f'max_abs_diff_across_ranks={across:.3g} '
        f'max_abs_diff_vs_single_process={_max_diff(stats, expected):.3g} '
        f'{"PASS" if passed else "FAIL"}'
    )
    return passed, line


def _check_refused(device: torch.device, sync_bn: bool) -> bool:
    """A model with one more BN in training mode on rank 1 must be refused
    by every rank before any data is read, not hang."""
    model = _build_model(sync_bn, device)
    if dist.get_rank() == 1:
        model.bn_frozen.train()
    before = _stats(model)
    try:
        update_bn_stats(model, _make_loader('batch_size', 0, device), 4)
    except RuntimeError as e:
        refused = 'same BatchNorm layers' in str(e)
    else:
        refused = False
    return _on_all_ranks(
        refused and _max_diff(_stats(model), before) == 0, device
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--backend',
        default='gloo',
        choices=['gloo', 'nccl'],
        help='gloo (CPU) or nccl (one GPU per process). Defaults to gloo.',
    )
    parser.add_argument(
        '--cases',
        nargs='+',
        default=list(CASES),
        choices=list(CASES),
        help='which loaders to try. Defaults to all.',
    )
    parser.add_argument(
        '--tol',
        type=float,
        default=1e-5,
        help='tolerance, relative to 1 + |reference|. Defaults to 1e-5.',
    )
    args = parser.parse_args()

    rank = int(os.environ['RANK'])
    world_size = int(os.environ['WORLD_SIZE'])
    device = torch.device('cpu')
    if args.backend == 'nccl':
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(device)
    sync_bn = args.backend == 'nccl'

    # The references, computed before the process group exists (so by one
    # process, with SyncBatchNorm acting as a plain BatchNorm).
    references = {}
    quiet = logging.getLogger('check_precise_bn_dist.reference')
    quiet.disabled = True
    for case in args.cases:
        batches, iters = _expected_batches(
            case, CASES[case], world_size, device
        )
        model = _build_model(sync_bn, device)
        before = _stats(model)
        update_bn_stats(
            model,
            batches,
            sum(len(x) for x, _ in batches),
            progress=False,
            logger=quiet,
        )
        references[case] = (_stats(model), before, iters)

    dist.init_process_group(args.backend)
    ok = True
    for case in args.cases:
        passed, line = _check_case(case, references[case], args, device)
        ok &= passed
        if rank == 0:
            print(line, flush=True)
    if world_size > 1:
        passed = _check_refused(device, sync_bn)
        ok &= passed
        if rank == 0:
            print(
                f'[different_layers] backend={args.backend} '
                f'world_size={world_size} refused on every rank '
                f'{"PASS" if passed else "FAIL"}',
                flush=True,
            )
    if rank == 0:
        print('PASS' if ok else 'FAIL', flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == '__main__':
    raise SystemExit(main())
