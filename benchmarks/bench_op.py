"""Block FMD against timm's DropBlock2d: forward+backward time, memory, realised distortion fraction.

    python benchmarks/bench_op.py                  # the README's table (CPU, or CUDA when available)
    python benchmarks/bench_op.py --device cuda --repeats 50
    python benchmarks/bench_op.py --device cuda --shapes 32x1024x14x14   # one shape (gpu_check.py)

Rows are measured side by side in one process: each repetition runs every method once, in turn,
and the table reports medians, so drifting machine load hits all methods alike. "ms" is the wall time of one
synchronised call, host launch time included (what an eager training step pays). On CUDA each FMD row comes
twice: the fused Triton path (what the op runs there) and the PyTorch reference path beside it, per-channel rows a
third time as "fused, 16 a thread": the fused path at the first design's 16 tile elements a thread, 8 warps for the
benchmark's tiles (``fused.num_warps``: the kernel_resources counts say 8 a thread doubles the resident warps; this
row says what that is worth). "GPU ms" is
the same forward+backward captured once in a CUDA graph and replayed: the GPU's time alone, without the host's
(methods that are not capture-safe, the reference path, show "-"). "ms" minus "GPU ms" is the host's share.
``--profile`` adds, for the first shape, each GPU kernel of one fused per-channel approx forward+backward with its
launches and microseconds per call (torch.profiler): where the GPU time goes.
"saved MB" is what autograd keeps for the backward pass (counted with saved-tensor hooks); on CUDA the peak
allocated memory of one forward+backward is reported as well.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropBlock2d

from timm_fmd.ops import fused
from timm_fmd.ops.distortion import feature_map_distortion
from timm_fmd.ops.masks import block_seed_rate, expected_block_fraction
from timm_fmd.train.graphs import CudaGraph

SHAPES = [(32, 1024, 14, 14), (32, 2048, 7, 7), (64, 64, 32, 32)]
GRAPH_REPLAYS = 50


def parse_shapes(text: str) -> List[Tuple[int, int, int, int]]:
    """``--shapes``: comma-separated ``BxCxHxW`` maps, e.g. ``32x1024x14x14,64x64x32x32``."""
    shapes = []
    for item in (t.strip() for t in text.split(',') if t.strip()):
        dims = item.lower().split('x')
        if len(dims) != 4 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise argparse.ArgumentTypeError(f'{item!r} is not BxCxHxW with positive integers (e.g. 32x1024x14x14)')
        shapes.append(tuple(int(d) for d in dims))
    if not shapes:
        raise argparse.ArgumentTypeError('give at least one BxCxHxW map')
    return shapes


def authors_formula(x: torch.Tensor, prob: float, block_size: int, weight: torch.Tensor, gamma: float) -> torch.Tensor:
    """The authors' per-channel approx formula as published (Disout), re-implemented for timing:
    full-size uniform and normal draws, NCHW max-pool dilation, seeds at valid block centres only."""
    _, _, h, w = x.shape
    rate = prob * h * w / block_size ** 2 / ((h - block_size + 1) * (w - block_size + 1))
    valid = torch.zeros(h, w, device=x.device)
    valid[block_size // 2:h - (block_size - 1) // 2, block_size // 2:w - (block_size - 1) // 2] = 1.0
    keep = ((1 - valid + (1 - rate) + torch.rand(x.shape, device=x.device)) >= 1).float()
    keep = -F.max_pool2d(-keep, block_size, 1, block_size // 2)
    if block_size % 2 == 0:
        keep = keep[:, :, :-1, :-1]
    kept = keep.mean()
    w_max = weight.amax(0, keepdim=True)
    sign = torch.where(torch.rand(w_max.shape, device=x.device) < 0.5, -1.0, 1.0)
    w_c = (w_max * sign).mean((2, 3), keepdim=True)
    dist = gamma * w_c * x.detach().std() * torch.randn(x.shape, device=x.device)
    return (x * keep + dist * (1 - keep)) / kept


def _reference(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    with fused.disabled():
        return fn()


@contextlib.contextmanager
def thread_elements(n: int) -> Iterator[None]:
    """The fused kernels' launches with ``n`` tile elements a GPU thread (:data:`fused.THREAD_ELEMENTS`)."""
    before, fused.THREAD_ELEMENTS = fused.THREAD_ELEMENTS, n
    try:
        yield
    finally:
        fused.THREAD_ELEMENTS = before


def _with_thread_elements(n: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    with thread_elements(n):
        return fn()


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def graph_seconds(fn: Callable[[], torch.Tensor], grad: torch.Tensor, x: torch.Tensor, replays: int,
                  backend=None) -> float:
    """Seconds per forward+backward of ``fn`` captured once in a CUDA graph and replayed ``replays`` times: the
    GPU's time without the host's launches. ``backend`` is the trainer's :class:`CudaGraph` (two eager warm-up
    calls on a side stream, then the capture) or a stand-in with the same methods (tests)."""
    backend = backend if backend is not None else CudaGraph(x.device)

    def call() -> None:
        fn().backward(grad)

    for _ in range(2):  # lazily made state (kernels compiled, tables cached) outside the capture
        backend.eager(call)
        x.grad = None
    backend.capture(call)
    x.grad = None  # the graph keeps its own gradient buffer
    _sync(x.device)
    t0 = time.perf_counter()
    for _ in range(replays):
        backend.replay()
    _sync(x.device)
    return (time.perf_counter() - t0) / replays


def kernel_profile(fn: Callable[[], torch.Tensor], grad: torch.Tensor, x: torch.Tensor,
                   calls: int = 10) -> List[Tuple[str, float, float]]:
    """``(kernel, launches per call, microseconds per call)`` of ``fn``'s forward+backward, most time first, from
    torch.profiler: the GPU kernels on CUDA (their device time), the aten ops on CPU (their own CPU time)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = x.device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for _ in range(2):  # compiled kernels, cached tables
        fn().backward(grad)
        x.grad = None
    _sync(x.device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn().backward(grad)
            x.grad = None
        _sync(x.device)
    rows = []
    for event in prof.key_averages():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA
        if cuda and not on_device or not cuda and not event.key.startswith('aten::'):
            continue
        total = event.self_device_time_total if cuda else event.self_cpu_time_total
        if total > 0:
            rows.append((event.key, event.count / calls, total / calls))
    return sorted(rows, key=lambda r: -r[2])


def print_kernel_profile(shape, device: torch.device, prob: float, block_size: int, gamma: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, requires_grad=True)
    next_conv = nn.Conv2d(shape[1], shape[1] // 4, 3, padding=1).to(device)
    rows = kernel_profile(lambda: feature_map_distortion(x, prob, block_size=block_size, next_layer=next_conv,
                                                         gamma=gamma), torch.ones_like(x), x)
    where = 'GPU' if device.type == 'cuda' else 'CPU'
    print(f'\nKernels of one per-channel block FMD approx forward+backward {tuple(shape)} '
          f'({"fused" if device.type == "cuda" else "PyTorch path"}, torch.profiler):')
    print(f"{'kernel':<60} | {'launches':>8} | {where + ' us':>8}")
    for name, launches, us in rows:
        print(f'{name[:60]:<60} | {launches:8.1f} | {us:8.1f}')
    print(f"{'total':<60} | {sum(r[1] for r in rows):8.1f} | {sum(r[2] for r in rows):8.1f}")


def bench_shape(shape, device, repeats: int, prob: float, block_size: int, gamma: float,
                graph_replays: int = GRAPH_REPLAYS) -> List[Dict]:
    torch.manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.ones(shape, device=device)
    next_conv = nn.Conv2d(c, c // 4, 3, padding=1).to(device)  # a bottleneck's 3x3: the usual next layer
    methods: Dict[str, Callable[[], torch.Tensor]] = {}
    for shared in (True, False):
        tag = 'shared' if shared else 'per-channel'
        drop = DropBlock2d(prob, block_size, couple_channels=shared)
        methods[f'{tag}  timm DropBlock2d'] = lambda d=drop: d(x)
        for mode in ('approx', 'exact'):
            run = lambda s=shared, m=mode: feature_map_distortion(  # noqa: E731
                x, prob, block_size=block_size, shared_mask=s, mode=m, next_layer=next_conv, gamma=gamma)
            if device.type == 'cuda':  # the fused Triton path and, beside it, the PyTorch reference
                methods[f'{tag}  block FMD {mode} fused'] = run
                methods[f'{tag}  block FMD {mode} reference'] = lambda r=run: _reference(r)
                if not shared:
                    methods[f'{tag}  block FMD {mode} fused, 16 a thread'] = \
                        lambda r=run: _with_thread_elements(16, r)  # noqa: E731
            else:
                methods[f'{tag}  block FMD {mode}'] = run
    methods["per-channel  authors' formula"] = lambda: authors_formula(x, prob, block_size, next_conv.weight, gamma)

    times: Dict[str, List[float]] = {name: [] for name in methods}
    for rep in range(repeats + 2):  # two warm-up rounds
        for name, fn in methods.items():
            _sync(device)
            t0 = time.perf_counter()
            fn().backward(grad)
            _sync(device)
            if rep >= 2:
                times[name].append(time.perf_counter() - t0)
            x.grad = None
    rows = []
    for name, fn in methods.items():
        peak = gpu_ms = None
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn().backward(grad)
            x.grad = None
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            if 'reference' not in name:  # the reference path is not declared capture-safe
                try:
                    gpu_ms = 1000 * graph_seconds(fn, grad, x, graph_replays)
                except RuntimeError as error:  # say so and keep the row's other columns
                    print(f'{name}: not captured ({str(error).splitlines()[0]})', flush=True)
                    x.grad = None
        rows.append(dict(shape=shape, method=name, ms=1000 * statistics.median(times[name]),
                         saved_mb=_saved_bytes(fn) / 2 ** 20, peak_mb=peak, gpu_ms=gpu_ms))
    return rows


def realised_fraction_table(prob: float, block_size: int, device: torch.device) -> None:
    print(f'\nRealised distorted fraction at nominal prob {prob}, block {block_size} (64x256 maps, one draw):')
    print(f"{'map':>6} | {'timm DropBlock2d':>16} | {'authors (valid centres)':>23} | {'timm-fmd':>8} | {'timm-fmd expected':>17}")
    for size in (7, 14, 28, 56):
        x = torch.ones(64, 256, size, size, device=device)
        timm_frac = (DropBlock2d(prob, block_size, couple_channels=False, scale_by_keep=False)(x) == 0).float().mean()
        w = torch.zeros(1, 256, 1, 1, device=device)  # zero weight: the authors' distortion is exactly zero
        authors = (authors_formula(x, prob, block_size, w, 1.0) == 0).float().mean()
        ours = (feature_map_distortion(x, prob, block_size=block_size, gamma=0.0) == 0).float().mean()
        rate = block_seed_rate(prob, size, size, block_size)
        print(f'{size:>3}x{size:<2} | {timm_frac:16.3f} | {authors:23.3f} | {ours:8.3f} | '
              f'{expected_block_fraction(rate, size, size, block_size):17.4f}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--shapes', type=parse_shapes, default=SHAPES, metavar='BxCxHxW,...',
                        help='feature maps to time (default: ' + ','.join('x'.join(map(str, s)) for s in SHAPES) + ')')
    parser.add_argument('--prob', type=float, default=0.1)
    parser.add_argument('--block-size', type=int, default=7)
    parser.add_argument('--gamma', type=float, default=1.0)
    parser.add_argument('--threads', type=int, default=None, help='intra-op CPU threads (default: torch default)')
    parser.add_argument('--profile', action='store_true',
                        help="also each kernel's time in one per-channel approx call at the first shape")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.set_grad_enabled(True)
    print(f'device={device} torch={torch.__version__} threads={torch.get_num_threads()} '
          f'prob={args.prob} block={args.block_size} repeats={args.repeats} (median fwd+bwd)')
    header = f"{'shape':>18} | {'method':<40} | {'ms':>8} | {'x timm':>7} | {'saved MB':>8}"
    if device.type == 'cuda':
        header += f" | {'peak MB':>8} | {'GPU ms':>8}"
    print(header)
    for shape in args.shapes:
        rows = bench_shape(shape, device, args.repeats, args.prob, args.block_size, args.gamma)
        base = {r['method'].split()[0]: r['ms'] for r in rows if 'DropBlock2d' in r['method']}
        for r in rows:
            ratio = r['ms'] / base[r['method'].split()[0]]
            line = (f"{str(tuple(r['shape'])):>18} | {r['method']:<40} | {r['ms']:8.2f} | {ratio:6.2f}x | "
                    f"{r['saved_mb']:8.1f}")
            if r['peak_mb'] is not None:
                gpu = '-' if r['gpu_ms'] is None else f"{r['gpu_ms']:.3f}"
                line += f" | {r['peak_mb']:8.1f} | {gpu:>8}"
            print(line)
    if args.profile:
        print_kernel_profile(args.shapes[0], device, args.prob, args.block_size, args.gamma)
    realised_fraction_table(args.prob, args.block_size, device)


if __name__ == '__main__':
    main()
