"""``--data-on-device`` against the loader path: the data pipeline alone, and the trainer end to end.

    python benchmarks/bench_device_data.py --threads 1            # CIFAR-10 (5,000 training images), CPU
    python benchmarks/bench_device_data.py --device cuda --train-subset 50000 --workers 8 --amp

Both paths get the same data, recipe and model (Table 2's augmentation: pad-4 crop, flip, rotation 15;
``--no-aug`` for Table 1's none). "data" is the training loader alone: one epoch of batches, normalised and on
the device, nothing trained (the loader path decodes and augments JPEGs in ``--workers`` processes; the device
path gathers and augments decoded uint8 images in batches). "fit" is ``timm-fmd train``'s training throughput
and epoch time (evaluation included) for ``--epochs`` epochs, the median over epochs after the first. The
variants alternate within each of ``--repeats`` rounds so machine load drifts over all of them alike. The
device path's one-time decoding is not timed here (it is cached: later runs read it from disk).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

import timm_fmd  # noqa: F401  (registers the paper's models)
from timm_fmd.train import TrainConfig, fit
from timm_fmd.train.config import load_yaml, merge, config_from_dict
from timm_fmd.train.data import build_splits, loaders_for_model
from timm_fmd.train.device_data import device_loaders
from timm_fmd.train.distributed import setup
from timm_fmd.train.model import create_model
from timm_fmd.train.report import MetricsLog

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / 'shared' / 'data' / 'cifar10-jpg' / 'train.tar'


def data_rate(cfg: TrainConfig) -> float:
    """Images per second of one epoch of the training loader (batches normalised, on the device)."""
    env = setup(cfg.device)
    splits = build_splits(cfg)
    model = create_model(cfg, len(splits.label_names), 1)
    if cfg.data_on_device:
        loaders = device_loaders(cfg, splits, model, env.device)
    else:
        loaders = loaders_for_model(cfg, splits, model, pin_memory=env.device.type == 'cuda')
    loaders.train_sampler.set_epoch(1)
    seen, start = 0, time.perf_counter()
    for x, _, _ in loaders.train:
        x = x.to(env.device, non_blocking=True)
        seen += len(x)
    if env.device.type == 'cuda':
        torch.cuda.synchronize(env.device)
    return seen / (time.perf_counter() - start)


def fit_rates(cfg: TrainConfig) -> Dict[str, List[float]]:
    """Training images per second and epoch seconds (training + evaluation) of each epoch after the first."""
    with tempfile.TemporaryDirectory() as out:
        fit(dataclasses.replace(cfg, output=out, experiment='bench'))
        rows = MetricsLog.read(f'{out}/bench/metrics.csv').rows[1:]
    return dict(images_per_sec=[r['images_per_sec'] for r in rows], epoch_time_s=[r['epoch_time_s'] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data-dir', default=str(CIFAR) if CIFAR.is_file() else None,
                        help='default: the CIFAR-10 tars beside the checkout, else the embedded digits')
    parser.add_argument('--train-subset', type=int, default=5000)
    parser.add_argument('--model', default='cifar_resnet20')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--epochs', type=int, default=3, help='fit epochs per run; the first is warm-up')
    parser.add_argument('--workers', type=int, default=2, help='loader processes of the loader path')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--amp', action='store_true', help='bf16 autocast (CUDA)')
    parser.add_argument('--no-aug', action='store_true', help='Table 1: no augmentation')
    parser.add_argument('--repeats', type=int, default=1)
    parser.add_argument('--threads', type=int, help='torch CPU threads (default: torch\'s)')
    parser.add_argument('--skip-fit', action='store_true', help='measure the data pipeline only')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs < 2:
        parser.error('--epochs must be >= 2 (the first is warm-up)')
    recipe = load_yaml(ROOT / 'configs' / 'cifar10_resnet56_bfmd.yaml')
    base = merge(config_from_dict(recipe), dict(
        data_dir=args.data_dir, train_subset=args.train_subset if args.data_dir else None, model=args.model,
        batch_size=args.batch_size, validation_batch_size=1000, epochs=args.epochs, workers=args.workers,
        device=args.device, amp=args.amp, amp_dtype='bfloat16', no_aug=args.no_aug, log_interval=10 ** 9,
        checkpoint_interval=0, pin_mem=True))
    variants = {'loader': base, 'on device': dataclasses.replace(base, data_on_device=True)}
    data_rate(variants['on device'])  # decode once into the cache, untimed
    samples = {(name, kind): [] for name in variants for kind in ('data', 'fit img/s', 'fit s/epoch')}
    for _ in range(args.repeats):
        for name, cfg in variants.items():
            samples[name, 'data'].append(data_rate(cfg))
            if not args.skip_fit:
                rates = fit_rates(cfg)
                samples[name, 'fit img/s'] += rates['images_per_sec']
                samples[name, 'fit s/epoch'] += rates['epoch_time_s']

    device = setup(args.device).device
    size = len(build_splits(base).train_indices)
    print(f'\n{args.model}, {args.data_dir or "digits"} ({size} training images), batch {args.batch_size}, '
          f'{"no augmentation" if args.no_aug else "crop 4 + flip + rotate 15"}, device {device}, '
          f'{torch.get_num_threads()} CPU threads, loader workers {args.workers}, torch {torch.__version__}')
    print(f"{'':10} {'data img/s':>11} {'fit img/s':>10} {'fit s/epoch':>12}")
    for name in variants:
        cells = [statistics.median(samples[name, kind]) if samples[name, kind] else float('nan')
                 for kind in ('data', 'fit img/s', 'fit s/epoch')]
        print(f'{name:10} {cells[0]:11.0f} {cells[1]:10.1f} {cells[2]:12.2f}')


if __name__ == '__main__':
    main()
