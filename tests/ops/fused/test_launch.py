"""timm_fmd.ops.launch against Triton's own binder, for an sm_90 target on CPU tensors (no GPU launches anything).

The fused op's kernels are replaced by stand-ins that bind every launch with Triton's binder, as ``JITFunction.run``
does, and return a compiled kernel that records its launcher's arguments instead of launching. A direct launch must
use the compiled kernel Triton would have chosen for its arguments, and pass the values Triton would pass.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from timm_fmd.ops import fused, kernels
from timm_fmd.ops.distortion import BlockFeatureMapDistortion, FeatureMapDistortion
from timm_fmd.ops.launch import Launch, leading_key

triton = pytest.importorskip('triton')
from triton.compiler import CompiledKernel  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    'bench_host', Path(__file__).resolve().parents[3] / 'benchmarks' / 'bench_host.py')
bench_host = importlib.util.module_from_spec(_spec)
sys.modules['bench_host'] = bench_host
_spec.loader.exec_module(bench_host)

KERNELS = bench_host.KERNELS


@pytest.fixture
def driver():
    with bench_host.stub_driver():
        yield


class Recorded(CompiledKernel):
    """A compiled kernel with nothing compiled whose C launcher is a recorder: launches through the inherited
    ``__getitem__`` runner (Triton's own) record ``(the kernel, grid, values)`` instead of launching."""

    def __init__(self, stand_in, key, options):  # CompiledKernel.__init__ needs a compilation
        self.module, self.function, self.packed_metadata = object(), None, None  # "loaded": nothing to initialise
        self.name, self.src, self.metadata_group = 'stand-in', None, {}
        self.key, self.options = key, options
        self._run = lambda gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit, *values: \
            stand_in.direct.append((self, (gx, gy, gz), list(values)))

    def __del__(self):  # nothing to unload from a device
        pass


class StandIn(bench_host.StandIn):
    """The benchmark's stand-in (Triton's binder for sm_90 at every launch through ``kernel[grid]``), recording the
    cache key of each such launch and returning a :class:`Recorded` kernel for it."""

    def __init__(self, kernel):
        super().__init__(kernel, 'Triton binds every launch')
        self.through_triton, self.direct = [], []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            key, _ = self.bind(*args, **kwargs)
            self.through_triton.append(key)
            names = {p.name for p in self.params}
            return Recorded(self, key, {k: v for k, v in kwargs.items() if k not in names})
        return run


@pytest.fixture
def stand_ins(monkeypatch, driver):
    found = {name: StandIn(getattr(kernels, name)) for name in KERNELS}
    for name, stand_in in found.items():
        monkeypatch.setattr(kernels, name, stand_in)
    with fused.forced():
        yield found
    fused._launches.cache_clear()  # no launch configuration keeps a stand-in
    fused._grad_launch.cache_clear()


def _misaligned(shape, dtype=torch.float32):
    """A dense map whose address is 4 bytes past a multiple of 16."""
    n = torch.Size(shape).numel()
    return torch.randn(n + 1).to(dtype)[1:].view(shape)


@pytest.mark.parametrize('module', [
    BlockFeatureMapDistortion(0.1, 3, gamma=2.5, next_layer=torch.nn.Conv2d(8, 4, 3)),
    BlockFeatureMapDistortion(0.1, 3, gamma=2.5, shared_mask=True, mode='exact', next_layer=torch.nn.Conv2d(8, 4, 3)),
    FeatureMapDistortion(0.1, gamma=2.5, next_layer=torch.nn.Conv2d(8, 4, 1)),
], ids=['block-approx', 'shared-exact', 'element'])
def test_direct_launches_are_the_launches_triton_would_make(stand_ins, module, monkeypatch):
    """Each direct launch goes through the compiled kernel's real runner with the kernel Triton would choose and the
    values Triton would pass for the same call (distinct floats: rate, w_factor, gamma and t_scale all differ)."""
    checked = {name: 0 for name in KERNELS}
    call = Launch.__call__

    def checking(launch, kernel, *leading):  # Triton's binding of this very call, beside its direct launch
        before = len(kernel.direct)
        call(launch, kernel, *leading)
        if len(kernel.direct) > before:
            compiled, grid, values = kernel.direct[-1]
            key, bound = kernel.bind(*leading, *launch.fixed, **launch.kwargs)
            assert key == compiled.key, 'a direct launch used a kernel Triton would not have chosen'
            assert values == bound, 'a direct launch passed other values than Triton would'
            assert grid == launch.grid + (1,) * (3 - len(launch.grid))
            checked[kernel.jit.__name__] += 1

    monkeypatch.setattr(Launch, '__call__', checking)
    torch.manual_seed(0)
    maps = [torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6), _misaligned((2, 8, 6, 6)), torch.randn(2, 8, 6, 6),
            torch.randn(2, 8, 6, 6).to(torch.bfloat16), torch.randn(2, 8, 6, 6).to(torch.bfloat16)]
    grads = [torch.randn(2, 8, 6, 6), _misaligned((2, 8, 6, 6)), torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6),
             torch.randn(2, 8, 6, 6).to(torch.bfloat16), torch.randn(2, 8, 6, 6).to(torch.bfloat16)]
    for x, g in zip(maps, grads):
        module(x.requires_grad_()).backward(g)
    for name, stand_in in stand_ins.items():
        # Triton binds a launch only for a new key: fp32 aligned, misaligned, bf16 (the gradient kernel: its
        # gradient's alignment, not the map's); every other launch is direct
        assert len(stand_in.through_triton) == 3, name
        assert len(stand_in.direct) == checked[name] == len(maps) - 3, name
    # the direct launches pass the call's own tensors: the gradient kernel's first argument is the incoming gradient
    assert stand_ins['fmd_grad_kernel'].direct[-1][2][0].data_ptr() == grads[-1].data_ptr()


def _grad_fixed(stand_in):
    """Trailing arguments and constexprs of a gradient-kernel launch: t_scale, sizes, strides, the walk, KH, KW."""
    fixed = [0.5] + [16] * 16 + [3, 3]
    return fixed, {p.name: 1 for p in stand_in.params[7 + len(fixed):]}


def test_key_separates_what_triton_specialises():
    """Equal keys mean equal specialisations of the leading arguments, over tensors of both alignments and dtypes
    and floats and ints of several values (Triton makes an int 1 a constant: the key holds ints' values)."""
    stand_in = StandIn(kernels.fmd_grad_kernel)
    fixed, constexprs = _grad_fixed(stand_in)
    aligned, misaligned, seed = torch.zeros(64), _misaligned((63,)), torch.zeros(1, dtype=torch.int64)
    variants = []
    for g in (aligned, misaligned, aligned.to(torch.bfloat16), _misaligned((63,), torch.bfloat16)):
        for rate in (0.1, 0.7, 1, 2, 17):
            variants.append((g, aligned[:32], seed, aligned, aligned, aligned, rate))
    bindings = [(leading_key(v), stand_in.bind(*v, *fixed, **constexprs)[0]) for v in variants]
    for key_a, triton_a in bindings:
        for key_b, triton_b in bindings:
            if key_a == key_b:
                assert triton_a == triton_b
    # 4 gradients x rates 0.1 = 0.7 (floats), 1 (a constant), 2 = 17 for Triton (an i32), not for the key
    assert (len({k for k, _ in bindings}), len({t for _, t in bindings})) == (16, 12)


def test_launch_without_a_compiled_kernel_goes_through_triton_every_time(driver):
    """The interpreter (and a test's stand-in) return no compiled kernel: every call is ``kernel[grid](...)``; a
    launcher is never reused for another kernel object."""
    calls = []

    class Interpreted:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    launch = Launch((3, 2), (5, 6), dict(BLOCK=True, num_warps=4))
    kernel = Interpreted()
    x = torch.zeros(4)
    launch(kernel, x, 0.5)
    launch(kernel, x, 0.5)
    assert calls == [((3, 2), (x, 0.5, 5, 6), dict(BLOCK=True, num_warps=4))] * 2

    stand_in = StandIn(kernels.fmd_grad_kernel)
    launch = Launch((1, 1), *_grad_fixed(stand_in))
    leading = (x, x, torch.zeros(1, dtype=torch.int64), x, x, x, 0.1)
    launch(stand_in, *leading)
    launch(stand_in, *leading)
    other = StandIn(kernels.fmd_grad_kernel)
    launch(other, *leading)
    assert (len(stand_in.through_triton), len(stand_in.direct)) == (1, 1)
    assert (len(other.through_triton), len(other.direct)) == (1, 0)
