# Copyright (c) mmtune contributors. All rights reserved.
"""Transfer learning on scikit-learn's digits: eval, tune and deploy modes.

    python tools/analysis_tools/transfer_digits.py [--seeds 0 1 2 3 4]
        [--pretrain-epochs 15] [--finetune-epochs 30] [--dtype float64]
        [--out-dir work_dirs/transfer_digits] [--quick]

Source domain: half of the 1797 8x8 digit images (upsampled to 16x16),
clean, all ten classes. A small Conv-BN-ReLU network is pre-trained on it
with BN in train mode. Target domain: the other half, with Gaussian noise
added; only a few labelled images per class to train on, the rest to test.
The network gets a new linear head and is fine-tuned with the backbone's BN
frozen in eval mode (``norm_eval``: running statistics fixed, BN affine
parameters still trained), three ways, from the same pre-trained weights,
head, optimizer and data order:

- ``eval``: plain PyTorch;
- ``tune``: :func:`mmtune.turn_on_fast_conv_bn_eval` (the BN is folded into
  the conv at every forward: same function, same gradients);
- ``deploy``: :func:`mmtune.fuse_conv_bn` before fine-tuning (the BN is
  folded once and removed, so the optimizer trains the folded conv weight
  and bias: a different parametrisation).

Two references: ``scratch`` (random initialisation, BN in train mode, same
schedule) shows what the pre-training is worth, and a control, eval mode
started from parameters perturbed by one rounding error, shows how much
fine-tuning amplifies rounding errors: the yardstick for tune vs eval.

Each seed draws its own halves, labelled images, noise, initialisation and
data order. The tool prints markdown tables (target test accuracy, mean and
sample standard deviation over seeds, and per seed; per seed, how far tune
and deploy modes are from eval mode) and writes them to
``OUT_DIR/transfer_digits.md`` and everything to
``OUT_DIR/transfer_digits.json``.
"""

import argparse
import copy
import json
import os
import os.path as osp
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import mmtune

MODES = ('eval', 'tune', 'deploy', 'scratch')
# Eval mode from parameters perturbed by one rounding error: the noise floor.
CONTROL = 'eval_perturbed'
CLASSES = tuple(range(10))


class DigitsNet(nn.Module):
    """Four Conv-BN-ReLU blocks, global average pooling and a linear head.

    Args:
        num_classes (int): Outputs of the head.
        widths (tuple[int]): Channels of the four blocks. Defaults to
            (16, 32, 32, 64).
    """

    def __init__(self, num_classes: int, widths=(16, 32, 32, 64)):
        super().__init__()
        layers, in_channels = [], 1
        for i, width in enumerate(widths):
            layers += [
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if i in (1, 2):
                layers.append(nn.MaxPool2d(2))
            in_channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def _load_digits(size: int, dtype: torch.dtype):
    """Digits as ``(N, 1, size, size)`` images and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float64) / 16.0
    images = images.unsqueeze(1)
    if size != 8:
        images = F.interpolate(
            images, size=(size, size), mode='bilinear', align_corners=False
        )
    images = (images - images.mean()) / images.std()
    return images.to(dtype), torch.tensor(digits.target)


def _split(images, labels, seed: int, shots: int, noise: float):
    """Disjoint source and target images, both over all ten classes.

    Half of the images, clean, are the source domain (80% train, 20% test).
    The other half, with Gaussian noise of standard deviation ``noise``
    added, are the target domain: ``shots`` per class to train, the rest to
    test. The seed draws the halves, the labelled images and the noise.
    """
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=gen)
    source, target = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    n_test = len(source) // 5
    noisy = images + noise * torch.randn(
        images.shape, generator=gen, dtype=torch.float64
    ).to(images.dtype)
    train = torch.cat([target[labels[target] == c][:shots] for c in CLASSES])
    test = torch.cat([target[labels[target] == c][shots:] for c in CLASSES])
    return {
        'source_train': (images[source[n_test:]], labels[source[n_test:]]),
        'source_test': (images[source[:n_test]], labels[source[:n_test]]),
        'target_train': (noisy[train], labels[train]),
        'target_test': (noisy[test], labels[test]),
    }


def _set_train_mode(model: nn.Module, norm_eval: bool) -> None:
    """``model.train()``; with ``norm_eval`` the backbone's BNs stay eval."""
    model.train()
    if norm_eval:
        for module in model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _train(model, data, epochs, batch_size, lr, weight_decay, seed, norm_eval):
    """SGD with momentum and a cosine schedule; the seed fixes the order."""
    images, labels = data
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay
    )
    steps_per_epoch = -(-len(images) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, epochs * steps_per_epoch)
    )
    gen = torch.Generator().manual_seed(seed)
    _set_train_mode(model, norm_eval)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(images), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()


@torch.no_grad()
def _logits(model, images, norm_eval: bool, batch_size: int = 512):
    """Logits in eval mode, or with ``norm_eval`` in the training setup."""
    if norm_eval:
        _set_train_mode(model, True)
    else:
        model.eval()
    return torch.cat(
        [
            model(images[i : i + batch_size])
            for i in range(0, len(images), batch_size)
        ]
    )


def _accuracy(logits, labels) -> float:
    return (logits.argmax(1) == labels).double().mean().item() * 100


def _bn_scales(model) -> dict:
    """``s**2 = (gamma / sqrt(var + eps))**2`` per BN: min, median, max.

    With SGD, a step on ``w`` and ``gamma`` (eval and tune modes) moves the
    folded weight ``w * s`` by about ``s**2`` times the step that deploy
    mode takes on it directly.
    """
    out = {}
    for name, m in model.backbone.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            s2 = (m.weight / torch.sqrt(m.running_var + m.eps)).detach() ** 2
            out[name] = [s2.min().item(), s2.median().item(), s2.max().item()]
    return out


@torch.no_grad()
def _perturb(model: nn.Module, seed: int) -> None:
    """Change every parameter by about one rounding error of its dtype."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        sign = torch.randint(0, 2, p.shape, generator=gen) * 2 - 1
        p.mul_(1 + torch.finfo(p.dtype).eps * sign.to(p.dtype))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _disagree(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.argmax(1) != b.argmax(1)).sum())


def run_seed(args, images, labels, seed: int) -> dict:
    """Pre-train, then fine-tune in every mode; accuracies and differences."""
    data = _split(images, labels, seed, args.shots, args.noise)
    dtype = images.dtype

    torch.manual_seed(seed)
    source = DigitsNet(len(CLASSES)).to(dtype)
    start = time.perf_counter()
    _train(
        source,
        data['source_train'],
        args.pretrain_epochs,
        batch_size=32,
        lr=0.05,
        weight_decay=5e-4,
        seed=seed,
        norm_eval=False,
    )
    pretrain_s = time.perf_counter() - start
    x_src, y_src = data['source_test']
    source_acc = _accuracy(_logits(source, x_src, False), y_src)

    # One new head and one random initialisation shared by every mode.
    torch.manual_seed(seed + 1000)
    pretrained = copy.deepcopy(source)
    pretrained.head = nn.Linear(source.head.in_features, len(CLASSES))
    pretrained.to(dtype)
    scratch = DigitsNet(len(CLASSES)).to(dtype)

    models, converted = {}, {}
    for mode in MODES + (CONTROL,):
        model = copy.deepcopy(scratch if mode == 'scratch' else pretrained)
        if mode == 'tune':
            report = mmtune.turn_on_fast_conv_bn_eval(model)
            converted[mode] = [list(p) for p in report.converted]
        elif mode == 'deploy':
            report = mmtune.fuse_conv_bn(model)
            converted[mode] = [list(p) for p in report.converted]
        elif mode == CONTROL:
            _perturb(model, seed)
        models[mode] = model

    x_train = data['target_train'][0]
    x_test, y_test = data['target_test']
    # Before any step, eval, tune and deploy compute the same function.
    first = {
        mode: _logits(models[mode], x_train, True)
        for mode in ('eval', 'tune', 'deploy')
    }
    result = {'seed': seed, 'source_test_acc': source_acc}
    logits, finetune_s = {}, {}
    for mode, model in models.items():
        start = time.perf_counter()
        _train(
            model,
            data['target_train'],
            args.finetune_epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            seed=seed,
            norm_eval=mode != 'scratch',
        )
        finetune_s[mode] = time.perf_counter() - start
        logits[mode] = _logits(model, x_test, False)
        result[f'{mode}_acc'] = _accuracy(logits[mode], y_test)

    result.update(
        n_target_train=len(x_train),
        n_target_test=len(x_test),
        converted=converted,
        tune_first_logit_diff=_max_diff(first['tune'], first['eval']),
        deploy_first_logit_diff=_max_diff(first['deploy'], first['eval']),
        tune_logit_diff=_max_diff(logits['tune'], logits['eval']),
        tune_disagree=_disagree(logits['tune'], logits['eval']),
        tune_acc_diff=abs(result['tune_acc'] - result['eval_acc']),
        control_logit_diff=_max_diff(logits[CONTROL], logits['eval']),
        control_disagree=_disagree(logits[CONTROL], logits['eval']),
        bn_s2=_bn_scales(pretrained),
        pretrain_s=pretrain_s,
        finetune_s=finetune_s,
    )
    return result


def _mean_std(values):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def format_markdown(results, args) -> str:
    """The results as markdown: the accuracy table and the per-seed table."""
    seeds = ' '.join(str(r['seed']) for r in results)
    labels = {
        'eval': 'eval (plain PyTorch, BN frozen)',
        'tune': 'tune (`turn_on_fast_conv_bn_eval`)',
        'deploy': 'deploy (`fuse_conv_bn`, then fine-tune)',
        'scratch': 'scratch (reference: no pre-training, BN train)',
    }
    first = results[0]
    lines = [
        f'Target: noisy digits (noise std {args.noise:g}), '
        f'{first["n_target_train"]} labelled training images '
        f'({args.shots} per class), {first["n_target_test"]} test images; '
        f'{args.dtype}; seeds {seeds}; accuracy in %, mean ± sample std '
        'over seeds.',
        '',
        '| mode | target test acc | per seed | fine-tune time (s) |',
        '| --- | --- | --- | --- |',
    ]
    for mode in MODES:
        accs = [r[f'{mode}_acc'] for r in results]
        mean, std = _mean_std(accs)
        per_seed = ' / '.join(f'{a:.2f}' for a in accs)
        seconds = statistics.fmean(r['finetune_s'][mode] for r in results)
        lines.append(
            f'| {labels[mode]} | {mean:.2f} ± {std:.2f} | {per_seed} '
            f'| {seconds:.1f} |'
        )
    lines += [
        '',
        'Max abs logit difference from eval mode (test predictions that '
        'differ): at the first forward, after fine-tuning, and for the '
        'control, eval mode started from parameters perturbed by one '
        'rounding error.',
        '',
        '| seed | source acc | pairs tune / deploy | first: tune '
        '| first: deploy | tuned: tune | tuned: control '
        '| abs acc diff tune-eval |',
        '| --- | --- | --- | --- | --- | --- | --- | --- |',
    ]
    for r in results:
        lines.append(
            f'| {r["seed"]} | {r["source_test_acc"]:.2f} '
            f'| {len(r["converted"]["tune"])} / '
            f'{len(r["converted"]["deploy"])} '
            f'| {r["tune_first_logit_diff"]:.1e} '
            f'| {r["deploy_first_logit_diff"]:.1e} '
            f'| {r["tune_logit_diff"]:.1e} ({r["tune_disagree"]}) '
            f'| {r["control_logit_diff"]:.1e} ({r["control_disagree"]}) '
            f'| {r["tune_acc_diff"]:.2f} |'
        )
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        '--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4]
    )
    parser.add_argument('--pretrain-epochs', type=int, default=15)
    parser.add_argument('--finetune-epochs', type=int, default=30)
    parser.add_argument(
        '--shots',
        type=int,
        default=10,
        help='labelled images per class',
    )
    parser.add_argument(
        '--noise',
        type=float,
        default=0.5,
        help='std of the target domain noise (images have std 1)',
    )
    parser.add_argument('--batch-size', type=int, default=25)
    parser.add_argument('--lr', type=float, default=0.01)
    parser.add_argument('--weight-decay', type=float, default=5e-4)
    parser.add_argument('--size', type=int, default=16, help='image side')
    parser.add_argument(
        '--dtype', choices=['float32', 'float64'], default='float32'
    )
    parser.add_argument(
        '--threads',
        type=int,
        default=1,
        help='torch CPU threads (more only slow these small convolutions)',
    )
    parser.add_argument(
        '--out-dir', default=osp.join('work_dirs', 'transfer_digits')
    )
    parser.add_argument(
        '--quick',
        action='store_true',
        help='one seed, 2 + 3 epochs, 8x8 images (for tests)',
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.pretrain_epochs, args.finetune_epochs, args.size = 2, 3, 8
    for name in ('pretrain_epochs', 'finetune_epochs', 'shots', 'batch_size'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1')
    return args


def main(argv=None) -> dict:
    """Run the experiment; returns what it writes to the JSON file."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    images, labels = _load_digits(args.size, getattr(torch, args.dtype))
    results = []
    for seed in args.seeds:
        results.append(run_seed(args, images, labels, seed))
        r = results[-1]
        print(
            f'seed {seed}: '
            + ', '.join(f'{m} {r[f"{m}_acc"]:.2f}' for m in MODES)
            + f' (tune-eval max abs logit diff {r["tune_logit_diff"]:.1e})',
            file=sys.stderr,
        )
    table = format_markdown(results, args)
    seconds = time.perf_counter() - start
    command = 'python tools/analysis_tools/transfer_digits.py ' + ' '.join(
        sys.argv[1:] if argv is None else argv
    )
    print(table)
    print(f'\nTotal time: {seconds:.0f} s')
    summary = {}
    for mode in MODES:
        mean, std = _mean_std([r[f'{mode}_acc'] for r in results])
        summary[mode] = {'mean': mean, 'std': std}
    out = {
        'command': command.strip(),
        'args': vars(args),
        'summary': summary,
        'seeds': results,
        'seconds': seconds,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    with open(osp.join(args.out_dir, 'transfer_digits.md'), 'w') as f:
        f.write(f'`{out["command"]}` ({seconds:.0f} s)\n\n{table}\n')
    with open(osp.join(args.out_dir, 'transfer_digits.json'), 'w') as f:
        json.dump(out, f, indent=2)
    return out


if __name__ == '__main__':
    main()
