"""The fused GPU path of the op: Triton kernels (:mod:`timm_fmd.ops.kernels`) behind ``torch.library`` ops.

:func:`timm_fmd.ops.distortion.feature_map_distortion` takes this path when :func:`applies` says so: the map
is on a CUDA device, Triton imports, and the call is the common case -- ``lam == 0``, ``steps == 1``, no
user ``mask=``, a float32 / bfloat16 / float16 map of at most 2**30 elements (int32 offsets), any layout
(``NC``, ``NLC``, ``NCL``, ``NCHW``, ``NHWC``) and strides, element or block masks, per-channel or shared,
approx or exact mode. Everything else runs the PyTorch path, which is the reference this path is tested against.

What differs from the reference, by design:

* randomness comes from Philox in the kernels, keyed by one seed per call drawn on the device from torch's
  generator (``torch.randint``; ``generator=`` when given): ``torch.manual_seed``, checkpoint recompute,
  resume, per-rank seeds and CUDA-graph replay behave as for ``torch.nn.functional.dropout``, but the draws
  are not the reference's draws for the same seed (same distribution, other numbers);
* ``std(x)`` is exact over every element (Chan/Welford partials), never the reference's strided subset;
* autograd keeps the seed and a 4-float statistics buffer, never a mask: the backward kernel regenerates it.

Forward: a seed draw, ``fmd_stats`` (one kernel: statistics partials), then ``fmd_apply`` (one kernel: each program
merges the partials, then distorts its tile); approx mode adds the next layer's ``K_M`` (one ``amax``), exact mode the
ERC gradient ``D`` in PyTorch between the two ops (``rademacher_sup``: the next layer's op, its transpose and a few
reductions). Backward: ``fmd_grad``, one kernel (in eager mode itself differentiable, for ``create_graph=True``). No
host synchronisation anywhere; the probability may be a 0-dim device tensor (the block seed rate then comes from
:func:`timm_fmd.ops.masks.seed_rate_table`, interpolated in the kernels), so the ops can be captured in a CUDA graph and
``torch.compile(fullgraph=True)`` sees them as opaque ops with fake (shape) implementations. Eager calls launch the same
kernels without the op dispatch (an ``autograd.Function``): that dispatch was a third of an eager call's host
time. Either way every launch goes through a :class:`timm_fmd.ops.launch.Launch` made once per map shape, layout, device
and config (tiles, grid, sizes, strides and constexprs computed once), which calls the compiled kernel without Triton's
per-call binding after its first launch (``benchmarks/bench_host.py`` measures the host time this saves).
"""
import contextlib
import functools
import importlib.util
import operator
from typing import Iterator, List, NamedTuple, Optional, Tuple, Union

import torch

from .capture import declare_capture_safe
from .erc import rademacher_sup
from .launch import Launch
from .masks import RATE_TABLE_SIZE, RATE_TABLE_T_MAX, block_seed_rate, clamp_block_size, seed_rate_table
from .next_layer import NO_NEXT_LAYER_WEIGHT, ONE_BY_ONE_FACTOR
from .noise import generator_kwargs

__all__ = ['applies', 'distort', 'forced', 'disabled', 'plan', 'MAX_ELEMENTS']

MAX_ELEMENTS = 1 << 30  # Philox counters and offsets are int32
TILE_ELEMENTS = 4096  # elements of one program's register tile on a GPU (few spills on sm_90, see the tests)
THREAD_ELEMENTS = 8  # tile elements per GPU thread: 16 warps for a full tile (see num_warps)
INTERPRET_TILE_ELEMENTS = 1 << 16  # the interpreter costs ~50 ms per program whatever its size: few, large tiles
PROGRAMS_PER_SM = 4
PARTS_BLOCK = 1024  # statistics partials merged per loop step by every apply program
CHANNEL_BLOCK = 64  # channels whose approx weights the statistics kernel computes at once (a (64, window) block)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_T_SCALE = (RATE_TABLE_SIZE - 1) / RATE_TABLE_T_MAX

_override: Optional[bool] = None  # None: CUDA maps only; True: CPU maps too (interpreter); False: never


@contextlib.contextmanager
def _overridden(value: bool) -> Iterator[None]:
    global _override
    previous, _override = _override, value
    try:
        yield
    finally:
        _override = previous


def forced():
    """Context: run the fused path on CPU tensors too (tests; needs ``TRITON_INTERPRET=1`` before triton is
    imported, see ``tests/ops/fused/conftest.py``)."""
    return _overridden(True)


def disabled():
    """Context: never run the fused path (benchmarks time the PyTorch reference on a GPU with it)."""
    return _overridden(False)


_HAVE_TRITON = importlib.util.find_spec('triton') is not None  # without importing it (it is imported lazily)


def applies(x: torch.Tensor, *, lam: float, steps: int, mask: Optional[torch.Tensor], noise) -> bool:
    """Whether :func:`distort` handles this call (see the module docstring); else the PyTorch reference does."""
    if _override is False or (x.device.type != 'cuda' and not _override):
        return False
    # int32 offsets in the kernels: the map and the memory span it reads must stay below 2**30 / 2**31
    span = sum((n - 1) * abs(s) for n, s in zip(x.shape, x.stride()))
    return (lam == 0 and steps == 1 and mask is None and noise is None and x.dtype in DTYPES
            and 0 < x.numel() <= MAX_ELEMENTS and span < 2 ** 31 and _HAVE_TRITON)


class _Config(NamedTuple):
    """What the kernels are specialised on, passed to the ops as a list of ints."""
    kh: int
    kw: int
    block: int
    shared: int
    exact: int
    rate_from: int  # 0: the float ``rate``; 1: the tensor prob is the element rate; 2: prob through the table
    window: int  # next layer's kernel area (the exact step's 1/|w|; the approx weight's window)
    signed: int  # approx weight from random signs over a conv window (else K_M itself or the fixed weight)
    has_km: int


class _Plan(NamedTuple):
    """Tiles and grid of one launch, from shapes only (host arithmetic, no device work)."""
    bc: int
    th: int
    tw: int
    n_ht: int
    n_wt: int
    n_tiles: int
    n_split: int
    b_chunk: int
    n_stat: int  # statistics programs per batch split; each takes every n_stat-th tile
    parts_rows: int  # rows of the statistics partials for any batch size (n_stat times the most batch splits)
    w_step: int  # columns from one tile's start to the next's
    packed: bool  # every tile starts at a multiple of 4 columns and is a multiple of 4 wide: packed Philox draws


def _np2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    if device.type != 'cuda':
        return 1  # the interpreter: one program per batch chunk, the whole batch in one
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def plan(shape: Tuple[int, int, int, int], channel_stride: int, kh: int, kw: int, *, gpu: bool,
         programs: int) -> _Plan:
    """Tiles and grid for a ``(B, C, H, W)`` map: a register tile of at most ``TILE_ELEMENTS`` on a GPU
    (``INTERPRET_TILE_ELEMENTS`` in the interpreter), and enough batch chunks for ``programs`` programs."""
    return _tiles(shape, channel_stride, kh, kw, gpu, programs, TILE_ELEMENTS if gpu else INTERPRET_TILE_ELEMENTS)


@functools.lru_cache(maxsize=4096)  # called three times per op call with the same few shapes: host time
def _tiles(shape: Tuple[int, int, int, int], channel_stride: int, kh: int, kw: int, gpu: bool, programs: int,
           budget: int) -> _Plan:
    batch, channels, height, width = shape
    # channels fastest in memory (channels_last, NHWC, tokens): enough channels per tile for coalesced access
    min_bc = 16 if channel_stride == 1 and channels > 1 and gpu else 1
    th, tw = _np2(height), _np2(width)
    # halve the larger side while the tile still advances by at least half its size past the halo
    can_h, can_w = (lambda: th >= 2 and th // 2 >= 2 * (kh - 1)), (lambda: tw >= 2 and tw // 2 >= 2 * (kw - 1))
    while min_bc * th * tw > budget and (can_h() or can_w()):
        if can_h() and (th >= tw or not can_w()):
            th //= 2
        else:
            tw //= 2
    bc = min(_np2(channels), max(1, budget // (th * tw)))
    n_ht = 1 if height <= th else 1 + _cdiv(height - th, th - kh + 1)
    step = tw - kw + 1  # the most columns a tile may advance: its halo holds the KW - 1 before its own
    w_step = step // 4 * 4 if step >= 4 else step  # a multiple of 4 where it can: the kernels' Philox draws pack
    n_wt = 1 if width <= tw else 1 + _cdiv(width - tw, w_step)
    n_tiles = _cdiv(channels, bc) * n_ht * n_wt
    b_chunk = _cdiv(batch, min(batch, max(1, _cdiv(programs, n_tiles))))
    packed = tw % 4 == 0 and (n_wt == 1 or w_step % 4 == 0)
    n_stat = min(n_tiles, programs)  # the apply programs each merge all n_stat * n_split partials: keep them few
    parts_rows = n_stat * max(1, _cdiv(programs, n_tiles))  # n_split <= this for any batch
    return _Plan(bc, th, tw, n_ht, n_wt, n_tiles, _cdiv(batch, b_chunk), b_chunk, n_stat, parts_rows, w_step,
                 packed)


def _parts_rows(x4: torch.Tensor, cfg: _Config) -> int:
    """:attr:`_Plan.parts_rows` of a map whose batch size may be symbolic (the fake implementation's): it does not
    depend on the batch, so the plan of one sample gives it."""
    one = (1,) + tuple(operator.index(n) for n in x4.shape[1:])
    return plan(one, operator.index(x4.stride(1)), cfg.kh, cfg.kw, gpu=x4.device.type == 'cuda',
                programs=_target_programs(x4.device)).parts_rows


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """A canonical ``(B, C)`` / ``(B, C, L)`` / ``(B, C, H, W)`` map as a ``(B, C, H, W)`` view."""
    if t.ndim == 2:
        return t[:, :, None, None]
    if t.ndim == 3:
        return t[:, :, None, :]
    return t


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == 'cuda' else contextlib.nullcontext()


def _or(t: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    return fallback if t is None else t  # an unused pointer argument still needs a tensor


def num_warps(tiles: _Plan, thread_elements: Optional[int] = None) -> int:
    """Warps of a program: a thread per ``thread_elements`` (default :data:`THREAD_ELEMENTS`) elements of its
    tile, 4 to 16.

    Why 8: a 16-warp program may take at most 128 registers a thread, and the kernels fit in them (spilling at most
    16 bytes), so every kernel keeps at least 16 warps resident on an sm_90 SM (25% occupancy). At 16 elements a
    thread (8 warps, the first design) ptxas gave many kernels, mostly of the contiguous layout, up to 255 registers:
    one 8-warp program per SM (12.5%). Counted by ``python -m timm_fmd.ops.kernel_resources``;
    ``benchmarks/bench_op.py`` times both settings on a GPU."""
    per = THREAD_ELEMENTS if thread_elements is None else thread_elements
    return max(4, min(16, tiles.bc * tiles.th * tiles.tw // (32 * per)))


def _table(cfg: _Config, x4: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
    """The seed-rate table when the kernels interpolate a tensor prob in it (cached; inside the ops, so a compiled
    graph never holds it), else any tensor for the unused pointer."""
    if cfg.rate_from != 2:
        return unused
    return seed_rate_table(x4.shape[2], x4.shape[3], cfg.kh, cfg.kw, x4.device)


def _mask_args(cfg: _Config, tiles: _Plan, thread_elements: int) -> dict:
    return dict(BLOCK=bool(cfg.block), SHARED=bool(cfg.shared), RATE_FROM=cfg.rate_from, TABLE_SIZE=RATE_TABLE_SIZE,
                BC=tiles.bc, TH=tiles.th, TW=tiles.tw, PACKED=tiles.packed,
                num_warps=num_warps(tiles, thread_elements))


class _Launches(NamedTuple):
    """The forward's launches on one map and config: host work done once per shape, layout and device."""
    cfg: _Config
    tiles: _Plan
    out_strides: Tuple[int, ...]
    stats: Launch
    apply: Launch


def _meta(shape: Tuple[int, ...], strides: Tuple[int, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
    """A map of this shape and these strides, and its ``torch.empty_like``, on the meta device (no memory): their
    strides are the real tensors'."""
    meta = torch.empty_strided(shape, strides, device='meta')
    return meta, torch.empty_like(meta)


@functools.lru_cache(maxsize=1024)  # keyed on all that decides the launches, the plan's tile budget included
def _launches(shape: Tuple[int, ...], strides: Tuple[int, ...], device: torch.device, config: Tuple[int, ...],
              report: bool, budget: int, thread_elements: int, programs: int) -> _Launches:
    cfg = _Config(*config)
    x, out = _meta(shape, strides)
    x4, out4 = _as_4d(x), _as_4d(out)
    batch, channels, height, width = x4.shape
    tiles = _tiles(tuple(x4.shape), x4.stride(1), cfg.kh, cfg.kw, device.type == 'cuda', programs, budget)
    walk = (tiles.n_ht, tiles.n_wt, tiles.w_step, cfg.kh, cfg.kw)  # the tiles' walk over the map
    stats = Launch((tiles.n_stat, tiles.n_split),
                   (_T_SCALE, cfg.window, batch, channels, height, width, *x4.stride(), tiles.b_chunk, tiles.n_tiles,
                    *walk),
                   dict(EXACT=bool(cfg.exact), HAS_KM=bool(cfg.has_km), SIGNED=bool(cfg.signed), REPORT=report,
                        CB=min(tiles.bc, CHANNEL_BLOCK), WINP=_np2(cfg.window),
                        **_mask_args(cfg, tiles, thread_elements)))
    apply = Launch((tiles.n_tiles, tiles.n_split),
                   (_T_SCALE, float(x4.numel()), tiles.n_stat * tiles.n_split, cfg.window, batch, channels, height,
                    width, *x4.stride(), *out4.stride(), tiles.b_chunk, *walk),
                   dict(EXACT=bool(cfg.exact), REPORT=report, PB=PARTS_BLOCK,
                        **_mask_args(cfg, tiles, thread_elements)))
    return _Launches(cfg, tiles, out.stride(), stats, apply)


@functools.lru_cache(maxsize=1024)
def _grad_launch(shape: Tuple[int, ...], grad_strides: Tuple[int, ...], dx_strides: Tuple[int, ...],
                 device: torch.device, config: Tuple[int, ...], budget: int, thread_elements: int,
                 programs: int) -> Launch:
    cfg = _Config(*config)
    g4, dx4 = (_as_4d(_meta(shape, strides)[0]) for strides in (grad_strides, dx_strides))
    batch, channels, height, width = g4.shape
    tiles = _tiles(tuple(dx4.shape), dx4.stride(1), cfg.kh, cfg.kw, device.type == 'cuda', programs, budget)
    return Launch((tiles.n_tiles, tiles.n_split),
                  (_T_SCALE, batch, channels, height, width, *g4.stride(), *dx4.stride(), tiles.b_chunk, tiles.n_ht,
                   tiles.n_wt, tiles.w_step, cfg.kh, cfg.kw),
                  _mask_args(cfg, tiles, thread_elements))


def _budget(device: torch.device) -> Tuple[int, int, int]:
    """What the launches read besides the shape: the tile budget, the tile elements per thread and the target
    number of programs (read at each call: tests and ``bench_op.py`` set them)."""
    gpu = device.type == 'cuda'
    return TILE_ELEMENTS if gpu else INTERPRET_TILE_ELEMENTS, THREAD_ELEMENTS, _target_programs(device)


def _forward_launches(x: torch.Tensor, config: List[int], report: Optional[dict]) -> _Launches:
    device = x.device
    return _launches(tuple(x.shape), x.stride(), device, tuple(config), report is not None, *_budget(device))


_KERNELS = None


def _kernels():
    """:mod:`timm_fmd.ops.kernels`, imported at the first launch (it imports triton). Its kernels are looked up at
    each launch, so that a test may stand in for one."""
    global _KERNELS
    if _KERNELS is None:
        from . import kernels
        _KERNELS = kernels
    return _KERNELS


def _launch_stats(x: torch.Tensor, seed: torch.Tensor, prob: Optional[torch.Tensor], k_max: Optional[torch.Tensor],
                  rate: float, w_factor: float, config: List[int],
                  report: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(parts, coef)``: the statistics partials, one float32 row (n, mean, M2, distorted count) per program; and
    the approx channel weights ``w_c`` ``(C,)`` or the exact ``G`` ``(C, *spatial)`` (Eq. 8 / 18)."""
    launches = _forward_launches(x, config, report)
    cfg, tiles = launches.cfg, launches.tiles
    x4 = _as_4d(x)
    f32 = dict(dtype=torch.float32, device=x.device)
    parts = torch.empty((tiles.parts_rows, 4), **f32)  # the first n_stat * n_split rows are written
    coef = torch.empty((tiles.n_split,) + tuple(x4.shape[1:]) if cfg.exact else (x.shape[1],), **f32)
    signs = parts
    if report is not None:
        report['plan'] = tiles  # the tiles the kernels ran
        if cfg.signed:
            signs = report['weight_signs'] = torch.zeros(k_max.shape, dtype=torch.int8, device=x.device)
    with _device_guard(x):
        launches.stats(_kernels().fmd_stats_kernel, x4, seed, _or(prob, seed), _table(cfg, x4, parts), parts, coef,
                       _or(k_max, parts), signs, rate, w_factor)
    if cfg.exact:  # G = sum over the batch chunks, in the map's canonical (C, *spatial) shape
        coef = (coef.sum(0) if tiles.n_split > 1 else coef[0]).reshape(tuple(x.shape[1:]))
    return parts, coef


def _launch_apply(x: torch.Tensor, seed: torch.Tensor, prob: Optional[torch.Tensor], parts: torch.Tensor,
                  coef: torch.Tensor, rate: float, gamma: float, config: List[int],
                  report: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, stats)``: the distorted map ``where(m, value, x) * scale`` in x's dtype and memory format (``coef``:
    the approx ``w_c`` or the exact ``D``), and stats = (std, scale, fraction, gamma * std) float32."""
    launches = _forward_launches(x, config, report)
    cfg = launches.cfg
    out = torch.empty_strided(x.shape, launches.out_strides, dtype=x.dtype, device=x.device)
    stats = torch.empty(4, dtype=torch.float32, device=x.device)
    x4, out4 = _as_4d(x), _as_4d(out)
    reports = [stats] * 4
    if report is not None:
        batch, channels, height, width = x4.shape
        new = functools.partial(torch.zeros, device=x.device)
        report['mask'] = new(x4.shape, dtype=torch.int8)
        report['seeds'] = new((batch, 1 if cfg.shared else channels, height, width), dtype=torch.int8)
        report['normal'] = new(x4.shape, dtype=torch.float32)
        report['sigma'] = new(batch, dtype=torch.float32)
        reports = [report[k] for k in ('mask', 'seeds', 'normal', 'sigma')]
    with _device_guard(x):
        launches.apply(_kernels().fmd_apply_kernel, x4, out4, seed, _or(prob, seed), _table(cfg, x4, stats), parts,
                       stats, coef.contiguous(), *reports, rate, gamma)
    return out, stats


def _launch_grad(grad: torch.Tensor, seed: torch.Tensor, prob: Optional[torch.Tensor], stats: torch.Tensor,
                 rate: float, config: List[int], strides: List[int]) -> torch.Tensor:
    """``where(m, 0, grad * scale)`` with the mask regenerated from ``seed``; laid out with ``strides``."""
    device = grad.device
    launch = _grad_launch(tuple(grad.shape), grad.stride(), tuple(strides), device, tuple(config), *_budget(device))
    dx = torch.empty_strided(grad.shape, strides, dtype=grad.dtype, device=grad.device)
    g4 = _as_4d(grad)
    with _device_guard(grad):
        launch(_kernels().fmd_grad_kernel, g4, _as_4d(dx), seed, _or(prob, seed),
               _table(_Config(*config), g4, stats), stats, rate)
    return dx


# The ops of compiled graphs, defined with torch.library's low-level API rather than torch.library.custom_op: a
# compiled step calls three per site, and a call costs ~9 us through the dispatcher here against ~20-26 us for a
# custom_op (whose Python wrapper checks its outputs for aliasing and redispatches below autograd), ~15 us with the
# autograd formula that fmd_apply registers (benchmarks/bench_host.py --compiled).
_LIB = torch.library.Library('timm_fmd', 'FRAGMENT')
_PT2 = (torch.Tag.pt2_compliant_tag,)  # as custom_op tags its ops: tested with opcheck (tests/ops/fused)
_LIB.define('fmd_stats(Tensor x, Tensor seed, Tensor? prob, Tensor? k_max, float rate, float w_factor, int[] config) '
            '-> (Tensor, Tensor)', tags=_PT2)
_LIB.define('fmd_apply(Tensor x, Tensor seed, Tensor? prob, Tensor parts, Tensor coef, float rate, float gamma, '
            'int[] config) -> (Tensor, Tensor)', tags=_PT2)
_LIB.define('fmd_grad(Tensor grad, Tensor seed, Tensor? prob, Tensor stats, float rate, int[] config, int[] strides) '
            '-> Tensor', tags=_PT2)
# CompositeExplicitAutograd: one kernel for every device (fake tensors take the fakes below)
_LIB.impl('fmd_stats', _launch_stats, 'CompositeExplicitAutograd')
_LIB.impl('fmd_apply', _launch_apply, 'CompositeExplicitAutograd')
_LIB.impl('fmd_grad', _launch_grad, 'CompositeExplicitAutograd')
_stats_op = torch.ops.timm_fmd.fmd_stats.default
_apply_op = torch.ops.timm_fmd.fmd_apply.default
_grad_op = torch.ops.timm_fmd.fmd_grad.default


@torch.library.register_fake('timm_fmd::fmd_stats', lib=_LIB)
def _(x, seed, prob, k_max, rate, w_factor, config):
    cfg = _Config(*config)
    coef_shape = (x.shape[1],) + (tuple(x.shape[2:]) if cfg.exact else ())
    return (x.new_empty((_parts_rows(_as_4d(x), cfg), 4), dtype=torch.float32),
            x.new_empty(coef_shape, dtype=torch.float32))


@torch.library.register_fake('timm_fmd::fmd_apply', lib=_LIB)
def _(x, seed, prob, parts, coef, rate, gamma, config):
    return torch.empty_like(x), x.new_empty(4, dtype=torch.float32)


@torch.library.register_fake('timm_fmd::fmd_grad', lib=_LIB)
def _(grad, seed, prob, stats, rate, config, strides):
    return torch.empty_strided(grad.shape, strides, dtype=grad.dtype, device=grad.device)


_APPLY_INPUTS = 8  # x, seed, prob, parts, coef, rate, gamma, config


def _setup_context(ctx, inputs, output):
    x, seed, prob, _, _, rate, _, config = inputs
    ctx.mark_non_differentiable(output[1])  # the stats: the realised fraction has no gradient, eager or compiled
    ctx.save_for_backward(seed, prob, output[1])  # the mask is regenerated, never saved
    ctx.rate, ctx.config, ctx.strides = rate, config, list(x.stride())


def _input_grads(ctx, grad: torch.Tensor, launch_grad) -> tuple:
    """The apply op's input gradients: ``dx`` by ``launch_grad`` (the grad op, or its launch in eager calls); with
    ``create_graph=True`` (a gradient penalty) by :class:`_EagerGrad`, whose result is differentiable too (the grad
    op has no autograd formula: AOT autograd traces backward graphs with grad disabled, and refuses a double
    backward)."""
    seed, prob, stats = ctx.saved_tensors
    args = (grad, seed, prob, stats, ctx.rate, ctx.config, ctx.strides)
    dx = _EagerGrad.apply(*args) if torch.is_grad_enabled() else launch_grad(*args)
    return (dx,) + (None,) * (_APPLY_INPUTS - 1)


def _backward(ctx, grad, _grad_stats):
    return _input_grads(ctx, grad, _grad_op)


torch.library.register_autograd('timm_fmd::fmd_apply', _backward, setup_context=_setup_context, lib=_LIB)


class _EagerApply(torch.autograd.Function):
    """The apply op's launch and backward without the op dispatch (eager calls: a third of the host time of an op
    call, when the ops were ``custom_op``s; ``torch.compile`` traces the ops instead)."""

    @staticmethod
    def forward(ctx, *inputs):
        out, stats = _launch_apply(*inputs)
        ctx.set_materialize_grads(False)  # no zeros made for the stats' gradient in the backward
        _setup_context(ctx, inputs, (out, stats))
        return out, stats

    @staticmethod
    def backward(ctx, grad, _grad_stats):
        return _input_grads(ctx, grad, _launch_grad)


class _EagerGrad(torch.autograd.Function):
    """The backward kernel as a differentiable op, for ``create_graph=True``: ``dx = where(m, 0, grad * scale)`` is
    linear in ``grad`` and its own adjoint, so its backward launches the same kernel on the incoming gradient."""

    @staticmethod
    def forward(ctx, grad, seed, prob, stats, rate, config, strides):
        ctx.save_for_backward(seed, prob, stats)
        ctx.rate, ctx.config, ctx.grad_strides = rate, config, list(grad.stride())
        return _launch_grad(grad, seed, prob, stats, rate, config, strides)

    @staticmethod
    def backward(ctx, upstream):
        seed, prob, stats = ctx.saved_tensors
        return (_EagerGrad.apply(upstream, seed, prob, stats, ctx.rate, ctx.config, ctx.grad_strides),) + (None,) * 6


def distort(
        xc: torch.Tensor,
        prob: Union[float, torch.Tensor],
        *,
        gamma: float,
        exact: bool,
        next_layer,
        block_size: Optional[int],
        shared_mask: bool,
        generator: Optional[torch.Generator],
        report: Optional[dict] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The op on a canonical ``(B, C, *spatial)`` map: ``(out, realised fraction)`` (see the module docstring).

    ``next_layer`` is a :class:`timm_fmd.ops.next_layer.NextLayer` or ``None``; ``exact`` means exact mode with a
    next layer. ``report`` (tests) runs the kernels directly, not through the ops, and fills the dict with
    what they drew: ``mask``, ``seeds`` (block seed field), ``normal``, ``sigma`` and ``weight_signs``.
    """
    # operator.index: under torch.compile with dynamic shapes the kernels' map size is specialised (a guard)
    channels, spatial = xc.shape[1], tuple(operator.index(n) for n in xc.shape[2:])
    block = block_size is not None
    kh, kw = clamp_block_size(block_size, *spatial) if block else (1, 1)
    prob_t = None
    rate = 0.0
    if isinstance(prob, torch.Tensor):
        prob_t = prob.to(device=xc.device)
        rate_from = 2 if block else 1
    else:
        rate_from = 0
        rate = block_seed_rate(prob, *spatial, block_size) if block else prob
    k_max, w_factor, window, signed = None, NO_NEXT_LAYER_WEIGHT, 1, False
    if next_layer is not None:
        window = next_layer.window
        if not exact:
            k_max = next_layer.channel_max().reshape(channels, -1)  # of NextLayer.weight: detached
            signed = next_layer.kind == 'conv'
            w_factor = ONE_BY_ONE_FACTOR if signed and window == 1 else 1.0
    config = list(_Config(kh, kw, int(block), int(block and shared_mask), int(exact), rate_from, window, int(signed),
                          int(k_max is not None)))
    seed = torch.randint(0, 2 ** 31 - 1, (1,), device=xc.device, **generator_kwargs(generator))
    if report is not None:
        stats_fn, apply_fn = (functools.partial(_launch_stats, report=report),
                              functools.partial(_launch_apply, report=report))
    elif torch.compiler.is_compiling():
        stats_fn, apply_fn = _stats_op, _apply_op
    else:
        stats_fn, apply_fn = _launch_stats, _EagerApply.apply
    parts, coef = stats_fn(xc.detach(), seed, prob_t, k_max, rate, w_factor, config)
    if exact:
        with torch.autocast(xc.device.type, enabled=False):
            _, coef = rademacher_sup(next_layer, coef)  # D = K[k_hat]^T S[k_hat] (Eq. 14 / 22-24) from G
        coef = coef.to(torch.float32)
    out, stats = apply_fn(xc, seed, prob_t, parts, coef, rate, gamma, config)
    return out, stats[2]


if _HAVE_TRITON:  # seeds drawn and the probability read on the device, no host sync: CUDA graphs may capture it
    declare_capture_safe('cuda', covers=lambda op: op.lam == 0 and op.steps == 1,
                         requires='lam 0 and steps 1 at every site (the fused path; others run the reference)')
