"""Regularisers side by side on a CIFAR-10 subset, on CPU: none, dropout / DropBlock, FMD approx and exact.

    python benchmarks/regularisation_cifar10.py --data-dir ../shared/data/cifar10-jpg/train.tar \
        --output runs/regularisation --report docs

Small-data regimes, a few minutes per run on 2 CPU cores (the README's table):

* ``cnn``: the paper's Table 1 CNN narrowed to 32/64/128 filters and two 512-unit FC layers, a
  10,000-image training subset, no augmentation, 8 epochs; FMD element-wise on the two FC layers
  (prob 0.5, gamma 5, as in the paper), dropout 0.5 on the same layers as its baseline;
* ``resnet20``: CIFAR ResNet-20 on a 5,000-image subset without augmentation, 8 epochs; block FMD
  after the convs of the last stage (block 3 on its 8x8 maps, prob 0.1, gamma 30, as the paper's
  ResNet-56 setting), timm's DropBlock (rate 0.1, block 3) in the same stage as its baseline;
* ``resnet20_aug``: the same with crop, flip and rotation, a regime that does not overfit in 8 epochs.

``cnn`` and ``resnet20`` (the overfitting regimes) take about 80 minutes together on 2 cores;
``resnet20_aug`` adds about 40 (``--models`` picks).

Every method runs with seeds 0, 1, 2 (the seed changes the initialisation, the data order and the
masks; the training subset is the same). Test accuracy is on all 10,000 CIFAR-10 test images. The
ERC column is the empirical Rademacher complexity of the layers after the FMD sites, measured on the
same layers for every method (``--erc-every``), at test batch size 256. Finished runs are reused,
so an interrupted benchmark resumes where it stopped. The result is reported as it comes out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Dict, List

from timm_fmd.train import TrainConfig, config_from_dict, evaluate_checkpoint, fit, load_yaml, plot_comparison
from timm_fmd.train.checkpoint import atomic_write
from timm_fmd.train.report import write_json

SEEDS = (0, 1, 2)
COMMON = dict(batch_size=128, validation_batch_size=256, workers=2, opt='momentum', momentum=0.9,
              weight_decay=5e-4, sched='cosine', warmup_epochs=0, epochs=8, erc_every=8, erc_batches=4,
              erc_draws=128, log_interval=1000, checkpoint_interval=0, img_size=32, crop_pct=1.0,
              # the trainer's defaults when these runs were made, pinned so that finished runs stay reusable
              train_crop_mode='pad', crop_pad=2, hflip=0.0, rotate=10.0, fmd_prob=0.1, fmd_block_size=3,
              fmd_stages=[-1], fmd_sites=['conv'], fmd_gamma=30.0, fmd_ramp_epochs=2.0)
CNN = dict(COMMON, train_subset=10_000, no_aug=True, lr=0.02, fmd_stages=[-2, -1], fmd_sites=['conv'],
           model_kwargs={'conv_widths': [32, 64, 128], 'fc_width': 512})
CNN_FMD = dict(CNN, model='fmd_paper_cnn', fmd_prob=0.5, fmd_gamma=5.0, fmd_block_size=0, fmd_ramp_epochs=1.0)
RESNET = dict(COMMON, train_subset=5_000, no_aug=True, lr=0.1, fmd_stages=[-1], fmd_sites=['conv'])
RESNET_AUG = dict(RESNET, no_aug=False, train_crop_mode='pad', crop_pad=4, hflip=0.5, rotate=15.0)


def _resnet_methods(regime: Dict) -> Dict[str, Dict]:
    """None, timm's DropBlock and block FMD (approx, exact) in the last stage of a CIFAR ResNet-20."""
    fmd = dict(regime, model='fmd_cifar_resnet20', fmd_prob=0.1, fmd_gamma=30.0, fmd_block_size=3, fmd_ramp_epochs=1.0)
    return {
        'none': dict(regime, model='cifar_resnet20'),
        'DropBlock': dict(regime, model='cifar_resnet20', model_kwargs={'drop_block_rate': 0.1, 'drop_block_size': 3}),
        'block FMD approx': dict(fmd, fmd_mode='approx'),
        'block FMD exact': dict(fmd, fmd_mode='exact'),
    }


METHODS: Dict[str, Dict[str, Dict]] = {
    'cnn': {
        'none': dict(CNN, model='paper_cnn'),
        'dropout': dict(CNN, model='paper_cnn', model_kwargs=dict(CNN['model_kwargs'], drop_rate=0.5)),
        'FMD approx': dict(CNN_FMD, fmd_mode='approx'),
        'FMD exact': dict(CNN_FMD, fmd_mode='exact'),
    },
    'resnet20': _resnet_methods(RESNET),
    'resnet20_aug': _resnet_methods(RESNET_AUG),
}


def run_name(model: str, method: str, seed: int) -> str:
    return f"{model}-{method.replace(' ', '_').lower()}-s{seed}"


# Settings that name where a run lives or how it is fed, not what it trains: a reused run may differ in them.
_PLACE = {'data_dir', 'output', 'experiment', 'resume', 'workers'}


def _stale_settings(run_dir: Path, wanted: TrainConfig) -> List[str]:
    """The settings in which an earlier run in ``run_dir`` differs from ``wanted`` (it is not reused then)."""
    done = dataclasses.asdict(config_from_dict(load_yaml(run_dir / 'config.yaml')))
    return [k for k, v in dataclasses.asdict(wanted).items() if k not in _PLACE and done[k] != v]


def run_all(data_dir: str, output: Path, models: List[str]) -> None:
    for model in models:
        for method, settings in METHODS[model].items():
            for seed in SEEDS:
                name = run_name(model, method, seed)
                run_dir = output / name
                cfg = TrainConfig(**dict(settings, data_dir=data_dir, seed=seed, output=str(output), experiment=name))
                if (run_dir / 'config.yaml').is_file():
                    stale = _stale_settings(run_dir, cfg)
                    if stale:
                        raise SystemExit(f'{run_dir} was trained with other settings ({", ".join(stale)}); '
                                         'move it away or pass another --output')
                if (run_dir / 'results.json').is_file():
                    continue  # finished earlier
                # An interrupted run continues from its last epoch (the trainer's resume is exact).
                resume = str(run_dir) if (run_dir / 'checkpoints' / 'last.state.pt').is_file() else None
                print(f'=== {name}' + (' (resumed)' if resume else ''), flush=True)
                fit(dataclasses.replace(cfg, resume=resume))


def _mean_std(values: List[float]) -> str:
    return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}' if len(values) > 1 else f'{values[0]:.2f}'


def _fit_on_train(run_dir: Path) -> Dict:
    """Final weights evaluated on the run's training samples in eval mode, without augmentation (cached)."""
    cached = run_dir / 'train_eval.json'
    if not cached.is_file():
        write_json(cached, evaluate_checkpoint(run_dir / 'checkpoints' / 'last.safetensors', split='train'))
    return json.loads(cached.read_text())


def report(output: Path, report_dir: Path, models: List[str]) -> str:
    """A markdown table (mean ± std over seeds) and one curves figure per model (seed 0 of each method)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    lines = ['| regime | method | test top-1 (%) | train top-1, eval mode (%) | gap (train − test) | '
             'train top-1 while training (%) | ERC after the sites | min/run |', '|---|---|---|---|---|---|---|---|']
    for model in models:
        for method in METHODS[model]:
            run_dirs = [output / run_name(model, method, s) for s in SEEDS]
            results = [json.loads((d / 'results.json').read_text()) for d in run_dirs]
            test = [r['final']['val_top1'] for r in results]
            train = [_fit_on_train(d)['train_top1'] for d in run_dirs]
            gap = [a - b for a, b in zip(train, test)]
            running = [r['final']['train_top1'] for r in results]
            erc = [statistics.mean(v['mean'] for k, v in r['erc'].items() if k != 'batch_size') for r in results]
            minutes = statistics.mean(r['wall_time_s'] for r in results) / 60
            lines.append(f'| {model} | {method} | {_mean_std(test)} | {_mean_std(train)} | {_mean_std(gap)} | '
                         f'{_mean_std(running)} | {statistics.mean(erc):.4g} ± {statistics.stdev(erc):.2g} | '
                         f'{minutes:.1f} |')
        plot_comparison([output / run_name(model, m, 0) for m in METHODS[model]],
                        report_dir / f'regularisation_{model}.png', labels=list(METHODS[model]),
                        title=f'CIFAR-10 subset, {model}: train (dashed) vs test (solid), seed 0')
    table = '\n'.join(lines)
    atomic_write(report_dir / 'regularisation_cifar10.md', table + '\n')
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data-dir', required=True, help='CIFAR-10 train.tar (test.tar beside it) or folder')
    parser.add_argument('--output', default='runs/regularisation', help='parent directory of the runs')
    parser.add_argument('--report', default='docs', help='where the table and figures are written')
    parser.add_argument('--models', nargs='+', default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    output = Path(args.output)
    run_all(args.data_dir, output, args.models)
    print(report(output, Path(args.report), args.models))


if __name__ == '__main__':
    main()
