"""ResNet-50 SGD train step with block FMD against plain and timm's DropBlock.

    python benchmarks/bench_resnet50.py                 # batch 8, 224x224, CPU (the README's table)
    python benchmarks/bench_resnet50.py --device cuda --batch-size 64 --amp --channels-last
    python benchmarks/bench_resnet50.py --device cuda --batch-size 64 --amp --channels-last --compile \
        --variants "plain,FMD per-channel approx"     # torch.compile (default mode), a subset of variants
    python benchmarks/bench_resnet50.py --device cuda --batch-size 64 --amp --channels-last \
        --cuda-graph "FMD per-channel approx"         # also those variants' steps captured in CUDA graphs

Variants (random init; same data, optimiser and step in one process; the table reports the median
of interleaved repetitions, so drifting machine load hits every variant alike):

* plain ``resnet50``;
* timm's ``drop_block_rate=0.1`` (one DropBlock per block in layer3/layer4, timm's placement);
* ``fmd_resnet50``: block FMD after every conv+norm and every block output in layer3 and layer4
  (p=0.1, block 7), channel-shared and per-channel masks, approx and exact modes;
* the authors' per-channel formula (Disout) at the same FMD sites, for scale.

``--compile`` wraps every model in ``torch.compile`` (default mode) and warms up two rounds (the
forward and backward graphs compile in the first); the optimiser step stays eager in every variant.

``--cuda-graph VARIANTS`` adds rows ``<variant> (CUDA graph)``: a second model of each named variant (and of plain,
their baseline) whose whole step -- forward, backward, fused SGD step -- is captured once with the trainer's
:class:`timm_fmd.train.graphs.GraphedStep` (as ``timm-fmd train --cuda-graph`` runs it) and replayed: the GPU's
time without the host's launches. Their "x plain" is against plain's captured step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import timm
import torch
import torch.nn.functional as F

import timm_fmd
from timm_fmd.ops.distortion import FeatureMapDistortion
from timm_fmd.train.graphs import WARMUP_STEPS, GraphedStep

sys.path.insert(0, str(Path(__file__).parent))
from bench_op import authors_formula  # noqa: E402


def authors_variant(model: torch.nn.Module, prob: float, block_size: int) -> None:
    """Swap every FMD op's forward for the authors' per-channel formula (same sites and next layers)."""
    def forward(self, x):
        if not self.training:
            return x
        nl = self.next_layer
        # sites that feed the pooled head have no next conv: a zero weight (no distortion), on x's device
        weight = nl.weight if nl is not None and nl.weight.ndim == 4 else torch.zeros(
            1, x.shape[1], 1, 1, device=x.device)
        return authors_formula(x, prob, block_size, weight.detach(), self.gamma)
    for _, op in timm_fmd.fmd_ops(model):
        op.forward = forward.__get__(op, FeatureMapDistortion)


def build(variant: str, prob: float, block_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if variant == 'plain':
        return timm.create_model('resnet50')
    if variant == 'timm DropBlock':
        return timm.create_model('resnet50', drop_block_rate=prob)
    shared = 'shared' in variant
    mode = 'exact' if 'exact' in variant else 'approx'
    model = timm.create_model('fmd_resnet50', fmd_prob=prob, fmd_block_size=block_size, fmd_shared_mask=shared,
                              fmd_mode=mode, fmd_stages=(-2, -1), fmd_sites=('conv', 'skip'))
    if variant.startswith('authors'):
        authors_variant(model, prob, block_size)
    return model


VARIANTS = ('plain', 'timm DropBlock', 'FMD shared approx', 'FMD per-channel approx', 'FMD shared exact',
            'FMD per-channel exact', "authors' formula per-channel")


def parse_variants(text: str) -> List[str]:
    """``--variants``: comma-separated names of :data:`VARIANTS` (``plain`` always runs: it is the baseline)."""
    names = [v.strip() for v in text.split(',') if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f'unknown variant(s) {unknown}; choose from {list(VARIANTS)}')
    return ['plain'] + [v for v in VARIANTS if v in names and v != 'plain']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--prob', type=float, default=0.1)
    parser.add_argument('--block-size', type=int, default=7)
    parser.add_argument('--amp', action='store_true', help='bf16 autocast')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile every model (default mode); the first two rounds warm up (compile)')
    parser.add_argument('--variants', type=parse_variants, default=list(VARIANTS),
                        help=f'comma-separated subset of: {", ".join(VARIANTS)} (default: all; plain always runs)')
    parser.add_argument('--cuda-graph', type=parse_variants, default=[], metavar='VARIANTS',
                        help='also time these variants (and plain) with the whole step captured in a CUDA graph')
    parser.add_argument('--threads', type=int, default=None, help='intra-op CPU threads (default: torch default)')
    parser.add_argument('--wait-for', type=Path, default=None, metavar='FILE',
                        help='after the warm-up (and compilation), print "warm" and wait for FILE to exist before '
                             'the timed rounds (gpu_check.py compiles while other work runs, then times alone)')
    args = parser.parse_args()
    if args.cuda_graph and (args.device != 'cuda' or args.compile):
        parser.error('--cuda-graph: needs --device cuda and no --compile (the eager model is captured)')
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = args.variants
    models = {v: build(v, args.prob, args.block_size).to(device).train() for v in variants}
    if args.channels_last:
        models = {v: m.to(memory_format=torch.channels_last) for v, m in models.items()}
    optims = {v: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for v, m in models.items()}
    steppers = {v: torch.compile(m) for v, m in models.items()} if args.compile else models
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)

    def train_step(model: torch.nn.Module, optim: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                   graphed: bool = False) -> torch.Tensor:
        # no autocast weight cache in a captured step (its casts would be made once, inside the capture)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp, cache_enabled=not graphed):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss.detach()

    runs = {v: (lambda v=v: train_step(steppers[v], optims[v], x, y)) for v in variants}
    for v in args.cuda_graph:  # a second model per variant, its step captured as the trainer captures it
        model = build(v, args.prob, args.block_size).to(device).train()
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optim = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
        graphed = GraphedStep(lambda x, target, y, step, m=model, o=optim: train_step(m, o, x, target, True), optim)
        runs[f'{v} (CUDA graph)'] = lambda g=graphed: g(x, y, y, 0)  # the step number feeds only an EMA: none

    def step(name: str) -> float:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        runs[name]()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    warmup = max(2 if args.compile else 1, WARMUP_STEPS + 1 if args.cuda_graph else 0)
    for _ in range(warmup):  # allocators and kernels; compilation; the graphs' eager warm-up and capture
        for name in list(runs):
            try:
                step(name)
            except RuntimeError as error:  # a step that cannot be captured: say so, time the others
                if not name.endswith('(CUDA graph)'):
                    raise
                print(f'{name}: not captured ({str(error).splitlines()[0]})', flush=True)
                del runs[name]
    if args.wait_for is not None:
        print('warm', flush=True)
        while not args.wait_for.exists():
            time.sleep(0.05)
    times: Dict[str, list] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name in runs:
            times[name].append(step(name))
    fmd = next((m for m in models.values() if timm_fmd.fmd_ops(m)), None)
    sites = f'FMD sites: {len(timm_fmd.fmd_ops(fmd))} (layer3+layer4, conv+skip), ' if fmd is not None else ''
    print(f'device={device} torch={torch.__version__} threads={torch.get_num_threads()} batch={args.batch_size} '
          f'img={args.img_size} amp={args.amp} channels_last={args.channels_last} compile={args.compile} '
          f'repeats={args.repeats}; {sites}p={args.prob}, block {args.block_size}')
    print(f"{'variant':<44} | {'ms/step':>9} | {'x plain':>7}")
    for name in runs:
        base = times.get('plain (CUDA graph)' if name.endswith('(CUDA graph)') else 'plain')
        t = statistics.median(times[name])
        ratio = f'{t / statistics.median(base):6.2f}x' if base else '      -'
        print(f'{name:<44} | {1000 * t:9.1f} | {ratio}')


if __name__ == '__main__':
    main()
