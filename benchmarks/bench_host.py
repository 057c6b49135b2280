"""Host time of the fused op, measured without a GPU: everything up to the kernels' launches runs for real.

    python benchmarks/bench_host.py                  # the README's table
    python benchmarks/bench_host.py --repeats 21 --calls 100 --sites 1
    python benchmarks/bench_host.py --compiled       # the chain under torch.compile (inductor, fullgraph)

An eager training step pays every FMD site's host time on every call: the op's Python, its allocations and seed
draw, autograd, and Triton's launch path. Where a step's host time exceeds its GPU time, the GPU waits. Without a GPU
nothing can be launched, but all of that runs on CPU tensors (``fused.forced()``): the kernels are replaced by
stand-ins that do what ``JITFunction.run`` does -- bind and specialise the arguments with Triton's own binder for an
sm_90 target, then launch through the compiled kernel's own runner (launch metadata, hooks) -- and stop where the C
launcher would call the driver. They leave out the rest of ``JITFunction.run`` (its kernel-cache lookup, globals check
and hook loops: a few microseconds per launch, in the second column only). Not included: the driver's device and
stream queries (stubbed), the C launcher and the driver's launch (a few microseconds per kernel, in both launching
columns) and the GPU.

Each forward+backward runs ``--sites`` sites (default 8) in a chain and one ``backward`` call through them all, as a
model does: that call's own cost (argument checks, the autograd engine's start; some 40 us here) is shared among its
sites, not paid by each. Columns, side by side (each repeat runs every column in turn), microseconds per site per
forward+backward, the best of the repeats (a shared machine only ever slows a timing down, so the least disturbed one
is the least biased):
"no launches" -- the stand-ins return at once: the op's own host time up to its launches (``Launch``'s keying of
each, some 6 us, included); "Triton binds every launch" -- every launch
through ``kernel[grid](...)`` (the op before ``timm_fmd.ops.launch``); "as shipped" -- Triton binds a launch with a
new key once, then the compiled kernel's runner is called directly; "saved", the difference of the two in
microseconds. Then Triton's binder alone, per launch of each kernel.

``--compiled``: the chain of sites compiled once per variant with ``torch.compile(fullgraph=True)`` (inductor; on CPU
it compiles the rest of the graph to C++): the host time of a compiled step's FMD sites, where the op's three
``torch.library`` ops are called through the dispatcher from the compiled code (the forward and backward graphs), not
through the eager ``autograd.Function``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import time
from typing import Callable, Dict, Iterator, List, Tuple

import torch
import torch.nn as nn

from timm_fmd.ops import fused
from timm_fmd.ops.distortion import BlockFeatureMapDistortion, FeatureMapDistortion

KERNELS = ('fmd_stats_kernel', 'fmd_apply_kernel', 'fmd_grad_kernel')
MODES = ('no launches', 'Triton binds every launch', 'as shipped')


class StubDriver:
    """Triton's active driver as a compiled kernel's runner uses it, without a GPU: device 0, the null stream."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0


@contextlib.contextmanager
def stub_driver() -> Iterator[None]:
    """Context: :class:`StubDriver` is Triton's active driver."""
    from triton.runtime.driver import driver
    previous, driver._active = driver._active, StubDriver()
    try:
        yield
    finally:
        driver._active = previous


def no_launch_kernel():
    """A :class:`triton.compiler.CompiledKernel` with nothing compiled whose C launcher does nothing: a launch through
    its (Triton's own) runner does all its Python -- the driver's device and stream, the launch metadata -- and stops
    where the driver would launch. Needs :func:`stub_driver`."""
    from triton.compiler import CompiledKernel

    class NoLaunch(CompiledKernel):
        def __init__(self):  # CompiledKernel.__init__ needs a compilation
            self.module, self.function, self.packed_metadata = object(), None, None  # "loaded": nothing to initialise
            self.name, self.src, self.metadata_group = 'stand-in', None, {}
            self._run = lambda *launcher_args: None

        def __del__(self):  # nothing to unload from a device
            pass

    return NoLaunch()


class StandIn:
    """A kernel whose ``[grid](*args, **kwargs)`` does what ``JITFunction.run`` does -- read the knobs, bind and
    specialise the arguments for sm_90, compute the kernel's cache key, launch through the compiled kernel's runner --
    except that nothing reaches a GPU (:func:`no_launch_kernel`).

    ``mode``: 'no launches' (nothing at all), 'Triton binds every launch' (returns no compiled kernel, so every
    launch comes back here), 'as shipped' (returns the compiled kernel, which the op then calls directly)."""

    def __init__(self, kernel, mode: str):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
        self.jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)  # interpreted: its source
        self.params = self.jit.params
        self.binder = create_function_from_signature(self.jit.signature, self.params,
                                                     make_backend(GPUTarget('cuda', 90, 32)))
        self.mode = mode
        self.key_cache: Dict = {}
        self.compiled = no_launch_kernel()
        self.last = None  # the first launch's (args, kwargs)

    def bind(self, *args, **kwargs) -> Tuple[str, list]:
        """``(cache key, bound values)``: the key of the compiled kernel Triton would launch, and the values it would
        pass to that kernel's launcher."""
        from triton import knobs
        from triton.runtime.jit import compute_cache_key
        kwargs['debug'] = kwargs.get('debug', self.jit.debug) or knobs.runtime.debug
        kwargs['instrumentation_mode'] = knobs.compilation.instrumentation_mode
        bound, specialization, options = self.binder(*args, **kwargs)
        return compute_cache_key(self.key_cache, specialization, options), list(bound.values())

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if self.last is None:  # kept once: holding every call's tensors would change the allocator's work
                self.last = (args, dict(kwargs))
            if self.mode == 'no launches':
                return None
            _, values = self.bind(*args, **kwargs)
            self.compiled[tuple(grid) + (1,) * (3 - len(grid))](*values)
            return self.compiled if self.mode == 'as shipped' else None
        return run


def variants(shape) -> Dict[str, nn.Module]:
    channels = shape[1]
    conv = nn.Conv2d(channels, channels // 4, 3, padding=1)  # a bottleneck's 3x3: the usual next layer
    return {
        'block FMD approx, per channel': BlockFeatureMapDistortion(0.1, 7, next_layer=conv),
        'block FMD approx, shared': BlockFeatureMapDistortion(0.1, 7, shared_mask=True, next_layer=conv),
        'element FMD approx': FeatureMapDistortion(0.1, next_layer=conv),
    }


def _per_call(fn: Callable[[], None], calls: int) -> float:
    for _ in range(5):  # first launches bind (as shipped: once per key)
        fn()
    gc.collect()
    gc.disable()  # a collection would land in one column's timing, at random
    try:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls * 1e6
    finally:
        gc.enable()


def measure(shape, repeats: int, calls: int, sites: int, compiled: bool = False) -> List[Dict]:
    """Microseconds per site per forward+backward of each variant in each mode -- ``sites`` sites in a chain, one
    ``backward`` call through them all, as in a model; with ``compiled`` the chain under ``torch.compile`` -- and of
    the binder alone per launch of each kernel (the best of ``repeats``)."""
    from timm_fmd.ops import kernels
    originals = {name: getattr(kernels, name) for name in KERNELS}
    stand_ins = {mode: {name: StandIn(k, mode) for name, k in originals.items()} for mode in MODES}
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    modules = variants(shape)

    def step(module):
        def chain(y):
            for _ in range(sites):
                y = module(y)
            return y

        # compiled once per variant: the graphs look the kernels up at each launch, so the stand-ins may change
        forward = torch.compile(chain, fullgraph=True) if compiled else chain

        def call():
            forward(x).backward(grad)
            x.grad = None
        return call

    times = {(name, mode): [] for name in modules for mode in MODES}
    try:
        with fused.forced(), stub_driver():
            steps = {name: step(module) for name, module in modules.items()}
            for _ in range(repeats):
                for name in modules:
                    for mode in MODES:
                        for kernel_name, stand_in in stand_ins[mode].items():
                            setattr(kernels, kernel_name, stand_in)
                        times[name, mode].append(_per_call(steps[name], calls))
    finally:
        for name, kernel in originals.items():
            setattr(kernels, name, kernel)
        fused._launches.cache_clear()  # no launch configuration keeps a stand-in (and the tensors it holds)
        fused._grad_launch.cache_clear()
    rows = [dict(item=name, **{mode: min(times[name, mode]) / sites for mode in MODES}) for name in modules]
    for kernel_name, stand_in in stand_ins['Triton binds every launch'].items():
        args, kwargs = stand_in.last
        binder = min(_per_call(lambda: stand_in.bind(*args, **kwargs), calls * sites) for _ in range(repeats))
        rows.append(dict(item=f'Triton binder alone: {kernel_name} ({len(args)} arguments, {len(kwargs)} keywords)',
                         binder=binder))
    return rows


def print_table(rows: List[Dict], shape, sites: int, compiled: bool = False) -> None:
    how = 'under torch.compile (inductor, fullgraph)' if compiled else 'eager'
    print(f'Host time per site per forward+backward, {how} ({sites} site(s) in a chain, one backward call), '
          f'{tuple(shape)} '
          f'fp32, p 0.1, block 7, next layer a 3x3 conv; torch {torch.__version__}, {torch.get_num_threads()} '
          f'thread(s); microseconds')
    width = max(len(r['item']) for r in rows)
    print(f"{'item':<{width}} | {MODES[0]:>11} | {MODES[1]:>25} | {MODES[2]:>10} | {'saved':>13}")
    for r in rows:
        if 'binder' in r:
            print(f"{r['item']:<{width}} | {'':>11} | {r['binder']:25.1f} | {'':>10} | {'':>13}")
        else:
            saved = r[MODES[1]] - r[MODES[2]]
            print(f"{r['item']:<{width}} | {r[MODES[0]]:11.1f} | {r[MODES[1]]:25.1f} | {r[MODES[2]]:10.1f} | "
                  f"{saved:6.1f} ({saved / r[MODES[1]]:4.0%})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--shape', default='8x64x14x14',
                   help='BxCxHxW of the map (default %(default)s; CPU tensor work that is a single launch on a GPU, '
                        'such as the next weight\'s amax, grows with it)')
    p.add_argument('--repeats', type=int, default=11)
    p.add_argument('--calls', type=int, default=40, help='forward+backward calls per timing (default %(default)s)')
    p.add_argument('--sites', type=int, default=8,
                   help='sites in a chain per forward+backward (default %(default)s): a model calls backward once for '
                        'all its sites, and that call\'s own cost (~40 us here) is shared among them')
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads (default %(default)s)')
    p.add_argument('--compiled', action='store_true',
                   help='the chain under torch.compile(fullgraph=True), inductor (compiles for half a minute)')
    args = p.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.lower().split('x'))
    if len(shape) != 4 or min(shape) < 1:
        p.error(f'--shape must be BxCxHxW with positive sizes, got {args.shape!r}')
    for name in ('repeats', 'calls', 'sites', 'threads'):
        if getattr(args, name) < 1:
            p.error(f'--{name} must be >= 1, got {getattr(args, name)}')
    torch.set_num_threads(args.threads)
    print_table(measure(shape, args.repeats, args.calls, args.sites, args.compiled), shape, args.sites, args.compiled)


if __name__ == '__main__':
    main()
