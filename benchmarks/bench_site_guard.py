"""Cost of FMD's per-forward site check on ResNet-50: the forward pre-hook FMD puts on the model.

Before every eager training forward the hook checks that each op still sits at its site, with its
hook, linked to the layer at its next path (``timm_fmd.attach.in_place``). This times that hook
alone, in training mode, on an unchanged model (the case of every step but the first after a
change), as the median over repeats of the mean over ``--calls`` calls::

    python benchmarks/bench_site_guard.py --repeats 15 --calls 2000

It finds the hook generically (every forward pre-hook on the model), so the same command times an
older checkout: ``PYTHONPATH=<checkout>/src python benchmarks/bench_site_guard.py``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import timm_fmd  # noqa: F401  (registers fmd_resnet50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--calls', type=int, default=2000)
    parser.add_argument('--stages', type=int, nargs='+', default=[-2, -1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = timm.create_model('fmd_resnet50', fmd_stages=tuple(args.stages), fmd_input_size=(3, 64, 64)).train()
    hooks = list(model._forward_pre_hooks.values())
    n_sites = len(timm_fmd.fmd_ops(model))
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.calls):
            for hook in hooks:
                hook(model, ())
        times.append((time.perf_counter() - start) / args.calls)
    print(f'ResNet-50, {n_sites} FMD sites, stages {tuple(args.stages)}: site check '
          f'{statistics.median(times) * 1e3:.4f} ms per training forward (median of {args.repeats} x {args.calls} '
          f'calls; min {min(times) * 1e3:.4f})')


if __name__ == '__main__':
    main()
