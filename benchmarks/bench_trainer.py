"""Training throughput of ``timm-fmd train`` (``fit``) against a bare training loop, FMD off and on.

    python benchmarks/bench_trainer.py                                # digits, cifar_resnet20, CPU
    python benchmarks/bench_trainer.py --data-dir .../cifar10-jpg/train.tar --device cuda --amp \\
        --channels-last --batch-size 128 --workers 8 --epochs 4

The bare loop is what one would write by hand with the same pieces: the same model, data loader
(sampler, dataset, transforms, workers), batch, optimiser, AMP and channels_last, but no metrics,
progress, EMA, checkpoints or files. Both report images per second of their training loops (the
validation pass and epoch-end files of ``fit`` are outside its timed span, exactly as in its
``metrics.csv``); the table gives the median over epochs after the first (warm-up), and the runs
alternate in one process so that machine load drifts over all of them alike. Target: fit >= 0.95x
of the bare loop.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from typing import List

import timm
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2

import timm_fmd  # noqa: F401  (registers the fmd_<arch> twins and the paper's models)
from timm_fmd.train import TrainConfig, config_from_dict, fit, load_yaml
from timm_fmd.train.config import DIGITS_RECIPE, resolved_lr
from timm_fmd.train.data import build_splits, loaders_for_model, steps_per_epoch
from timm_fmd.train.distributed import setup, to_device
from timm_fmd.train.evaluate import autocast
from timm_fmd.train.model import create_model
from timm_fmd.train.report import MetricsLog


def bare_loop(cfg: TrainConfig) -> List[float]:
    """Images per second of each epoch of a plain training loop."""
    env = setup(cfg.device)
    torch.manual_seed(cfg.seed)
    splits = build_splits(cfg)
    model = create_model(cfg, len(splits.label_names), steps_per_epoch(cfg, len(splits.train_indices), 1))
    cuda = env.device.type == 'cuda'
    loaders = loaders_for_model(cfg, splits, model, pin_memory=cfg.pin_mem and cuda)
    model.to(env.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = cuda  # as fit does
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=resolved_lr(cfg), weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.amp and cfg.amp_dtype == 'float16')
    amp = autocast(cfg, env.device)
    loss_fn = nn.CrossEntropyLoss()
    rates = []
    for epoch in range(cfg.epochs):
        loaders.train_sampler.set_epoch(epoch)
        model.train()
        seen, start = 0, time.perf_counter()
        for x, y, _ in loaders.train:
            x, y = to_device(env.device, x, y)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp():
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            seen += len(x)
        if cuda:
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - start))
    return rates


def fit_rates(cfg: TrainConfig) -> List[float]:
    with tempfile.TemporaryDirectory() as out:
        fit(dataclasses.replace(cfg, output=out, experiment='bench'))
        return [row['images_per_sec'] for row in MetricsLog.read(f'{out}/bench/metrics.csv').rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='cifar_resnet20', help='base timm architecture (FMD row: fmd_<model>)')
    parser.add_argument('--data-dir', default=None, help='default: the embedded digits')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--epochs', type=int, default=3, help='epochs per run; the first is warm-up')
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--device', default='auto')
    parser.add_argument('--amp', action='store_true')
    parser.add_argument('--amp-dtype', default='bfloat16', choices=('float16', 'bfloat16'))
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--repeats', type=int, default=1, help='alternating rounds of all runs')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs < 2:
        parser.error('--epochs must be >= 2 (the first epoch is warm-up)')

    # the digits recipe (its augmentation, optimiser and FMD settings) with this benchmark's data and sizes
    base = config_from_dict(dict(load_yaml(DIGITS_RECIPE), model=args.model, data_dir=args.data_dir,
                                 img_size=args.img_size, batch_size=args.batch_size, epochs=args.epochs,
                                 workers=args.workers, device=args.device, amp=args.amp, amp_dtype=args.amp_dtype,
                                 channels_last=args.channels_last, pin_mem=True, log_interval=10 ** 6))
    variants = {'FMD off': base}
    fmd_name = f'fmd_{args.model}'
    if timm.is_model(fmd_name):
        variants['FMD on'] = dataclasses.replace(base, model=fmd_name)
    else:
        print(f'skipping the FMD row: {fmd_name} is not registered (no fmd_ registry in timm_fmd yet)')

    samples = {(name, kind): [] for name in variants for kind in ('bare', 'fit')}
    for _ in range(args.repeats):
        for name, cfg in variants.items():
            samples[name, 'bare'] += bare_loop(cfg)[1:]
            samples[name, 'fit'] += fit_rates(cfg)[1:]

    device = setup(args.device).device
    print(f'\n{args.model} on {args.data_dir or "digits"}, batch {args.batch_size}, {args.img_size}px, device {device}'
          f', amp {args.amp and args.amp_dtype}, channels_last {args.channels_last}, {torch.get_num_threads()} CPU '
          f'threads, torch {torch.__version__}')
    print(f"{'':8} {'bare img/s':>11} {'fit img/s':>10} {'fit/bare':>9}")
    for name in variants:
        bare, trained = statistics.median(samples[name, 'bare']), statistics.median(samples[name, 'fit'])
        print(f'{name:8} {bare:11.1f} {trained:10.1f} {trained / bare:9.3f}')


if __name__ == '__main__':
    main()
