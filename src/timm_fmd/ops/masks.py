"""Distortion masks: element-wise (dropout-style) and contiguous blocks (DropBlock-style).

A mask is a bool tensor that is ``True`` where a feature element is distorted (the paper's
``m`` in Eq. 6 and ``M`` in Eq. 17).

Block masks follow the authors' release (and DropBlock, Ghiasi et al. 2018): seeds are drawn
only at *valid* block positions, where the whole ``block_size x block_size`` square fits in the
map, and each seed is grown into its square. DropBlock's usual seed rate
``p * H * W / (bs^2 * (H - bs + 1) * (W - bs + 1))`` ignores that blocks overlap, so the
distorted fraction it realises drifts from ``p`` as the block grows relative to the map. Here
the seed rate is *solved* so that the expected distorted fraction equals ``p`` exactly: with
``n(h, w)`` the number of valid seeds whose block covers ``(h, w)`` and independent seeds of
rate ``r``, the expected fraction is ``mean_hw[1 - (1 - r) ** n(h, w)]``, which is monotone in
``r`` and solved by bisection on the host (cached; no device work, no synchronisation). A probability
held in a device tensor (the op's ramp on a GPU, or under ``torch.compile``) reads the rate from a
per-shape table solved on the host once and interpolated on the device (:func:`seed_rate_table`).
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence, Tuple, Union

import torch

from .noise import generator_kwargs

__all__ = ['element_mask', 'block_mask', 'grow_blocks', 'block_seed_rate', 'seed_rate_table', 'expected_block_fraction',
           'clamp_block_size']


def clamp_block_size(block_size: int, height: int, width: int) -> Tuple[int, int]:
    """The block's (height, width): ``block_size`` clamped to the map, as in DropBlock."""
    return min(block_size, height), min(block_size, width)


def _coverage_counts(length: int, block: int) -> Counter:
    """How many positions along one axis are covered by exactly ``a`` valid block starts, per ``a``."""
    n_valid = length - block + 1
    return Counter(min(i, n_valid - 1) - max(0, i - block + 1) + 1 for i in range(length))


def _fraction(rate: float, rows: Counter, cols: Counter, area: int) -> float:
    keep = sum(cr * cc * (1.0 - rate) ** (a * b) for a, cr in rows.items() for b, cc in cols.items())
    return 1.0 - keep / area


_SEED_RATES: dict = {}


def block_seed_rate(prob: Union[float, torch.Tensor], height: int, width: int, block_size: int):
    """Seed rate at valid block positions whose expected distorted fraction is ``prob``.

    A float ``prob`` is solved exactly on the host (bisection, cached); a tensor ``prob`` -- the op's
    probability on an accelerator or under ``torch.compile``, where a Python float would be baked into the
    graph -- is interpolated in a per-shape table on its device (:func:`_seed_rate_tensor`).
    """
    if isinstance(prob, torch.Tensor):
        return _seed_rate_tensor(prob, height, width, *clamp_block_size(block_size, height, width))
    return _cached_seed_rate(prob, height, width, block_size)


@torch.compiler.assume_constant_result  # a host-side constant of the trace, not graph work
def _cached_seed_rate(prob: float, height: int, width: int, block_size: int) -> float:
    key = (prob, height, width, block_size)
    rate = _SEED_RATES.get(key)
    if rate is None:
        if len(_SEED_RATES) > 8192:  # a long ramp visits many probabilities; keep the cache bounded
            _SEED_RATES.clear()
        rate = _SEED_RATES[key] = _solve_seed_rate(*key)
    return rate


def _solve_seed_rate(prob: float, height: int, width: int, block_size: int) -> float:
    if prob <= 0.0:
        return 0.0
    kh, kw = clamp_block_size(block_size, height, width)
    rows, cols = _coverage_counts(height, kh), _coverage_counts(width, kw)
    lo, hi = 0.0, 1.0
    for _ in range(60):  # 2**-60: far below float32 resolution of the draws it feeds
        mid = 0.5 * (lo + hi)
        if _fraction(mid, rows, cols, height * width) < prob:
            lo = mid
        else:
            hi = mid
    return hi


RATE_TABLE_SIZE = 4096  # grid points of the seed-rate table over t = -log(1 - prob)
RATE_TABLE_T_MAX = 17.0  # t of the largest float32 below 1 is 16.6: the grid spans every float32 prob in [0, 1)


def _coverage_terms(height: int, width: int, kh: int, kw: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(n, w)``: a position covered by ``n`` valid block starts occurs with frequency ``w`` (float64)."""
    rows, cols = _coverage_counts(height, kh), _coverage_counts(width, kw)
    terms = [(a * b, cr * cc / (height * width)) for a, cr in rows.items() for b, cc in cols.items()]
    return (torch.tensor([t[0] for t in terms], dtype=torch.float64),
            torch.tensor([t[1] for t in terms], dtype=torch.float64))


def _solve_log_keep(height: int, width: int, kh: int, kw: int) -> torch.Tensor:
    """``s = -log(1 - rate)`` on the uniform grid of ``t = -log(1 - prob)`` (vectorised bisection, float64).

    The expected kept fraction is ``1 - prob = sum_n w_n (1 - rate)^n``, i.e. ``t = -log sum_n w_n exp(-n s)``:
    increasing in ``s`` with ``t / n_max <= s <= t``. In these coordinates ``s(t)`` is nearly linear (exactly
    so for element masks), which is what makes linear interpolation between grid points accurate.
    """
    n, w = _coverage_terms(height, width, kh, kw)
    t = torch.linspace(0.0, RATE_TABLE_T_MAX, RATE_TABLE_SIZE, dtype=torch.float64)
    lo, hi = t / n.max(), t.clone()
    log_w = w.log()
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        t_mid = -torch.logsumexp(log_w - n * mid[:, None], dim=1)
        below = t_mid < t
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


_RATE_TABLES: dict = {}


def seed_rate_table(height: int, width: int, kh: int, kw: int, device: torch.device) -> torch.Tensor:
    """The seed-rate table of a map and a (clamped) ``kh x kw`` block: float32 ``(RATE_TABLE_SIZE,)`` values of
    ``s = -log(1 - rate)``.

    Entry ``i`` belongs to ``t_i = i * RATE_TABLE_T_MAX / (RATE_TABLE_SIZE - 1)`` with ``t = -log(1 - prob)``.
    Solved once per shape on the host and uploaded once per device (cached). Read it outside traced code
    (the custom ops below and the fused kernels' ops do): a compiled graph never holds it.
    """
    key = (height, width, kh, kw, torch.device(device))
    table = _RATE_TABLES.get(key)
    if table is None:
        table = _RATE_TABLES[key] = _upload(_solve_log_keep(height, width, kh, kw).to(torch.float32), key[-1])
    return table


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` copied to ``device`` for good. On CUDA the copy is made on a side stream: a first call inside
    inductor's CUDA-graph trees (``mode='reduce-overhead'``) runs while the current stream's allocations go to the
    graphs' private pool, where a cached tensor would be an untracked live allocation (their check fails: "tensor(s)
    in the cudagraph pool not tracked as outputs", seen on the H200)."""
    if device.type != 'cuda':
        return host.to(device)
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        table = host.to(device)
    torch.cuda.current_stream(device).wait_stream(side)
    table.record_stream(torch.cuda.current_stream(device))  # used on the current stream from now on
    return table


@torch.library.custom_op('timm_fmd::block_seed_rate', mutates_args=())
def _seed_rate_tensor(prob: torch.Tensor, height: int, width: int, kh: int, kw: int) -> torch.Tensor:
    """The seed rate for a tensor ``prob`` (any shape), linearly interpolated in :func:`seed_rate_table`.

    A handful of element-wise ops on the device, no synchronisation; a custom op, so that ``torch.compile``
    sees one opaque op and no table constant. The interpolation error, as an error of the expected realised
    fraction, stays below 1e-5 at every grid point and between them (``tests/ops/test_masks.py``).
    """
    table = seed_rate_table(height, width, kh, kw, prob.device)
    t = -torch.log1p(-prob.to(torch.float32))
    pos = (t * ((RATE_TABLE_SIZE - 1) / RATE_TABLE_T_MAX)).clamp(0, RATE_TABLE_SIZE - 1)
    base = pos.floor().clamp(max=RATE_TABLE_SIZE - 2)
    pair = table[base.to(torch.int64)[..., None] + torch.arange(2, device=prob.device)]
    log_keep = torch.lerp(pair[..., 0], pair[..., 1], pos - base)
    return (-torch.expm1(-log_keep)).to(prob.dtype)


@_seed_rate_tensor.register_fake
def _(prob, height, width, kh, kw):
    return torch.empty_like(prob)


def expected_block_fraction(rate: float, height: int, width: int, block_size: int) -> float:
    """The expected distorted fraction of a block mask drawn with seed rate ``rate``."""
    kh, kw = clamp_block_size(block_size, height, width)
    return _fraction(rate, _coverage_counts(height, kh), _coverage_counts(width, kw), height * width)


def element_mask(
        shape: Sequence[int],
        prob: Union[float, torch.Tensor],
        *,
        device: Optional[torch.device] = None,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Independent Bernoulli(``prob``) distortion mask of ``shape`` (paper, Eq. 6)."""
    return torch.rand(tuple(shape), device=device, **generator_kwargs(generator)) < prob


def _grow(seeds: torch.Tensor, dim: int, block: int, as_bool: bool = False) -> torch.Tensor:
    """Grow each seed along ``dim`` into ``block`` positions (a 1-D binary dilation), as uint8 (or bool).

    ``out[t] = OR_{j < block} seeds[t - j]``. Computed by doubling window widths with shifted ORs,
    about log2(block) byte-wise passes: far cheaper than a max-pool over a float map, which is
    what dominates per-channel DropBlock on CPU. The zero padding is written by one copy that also converts
    bool seeds to bytes, and with ``as_bool`` the last OR writes bool: no pass of its own for either
    conversion.
    """
    shape = list(seeds.shape)
    length = shape[dim]
    shape[dim] = length + 2 * (block - 1)
    acc = seeds.new_zeros(shape, dtype=torch.uint8)
    acc.narrow(dim, block - 1, length).copy_(seeds)
    shifts, width = [], 1
    while 2 * width <= block:
        shifts.append(width)
        width *= 2
    if width < block:  # the two windows of ``width`` overlap and together span ``block``
        shifts.append(block - width)
    for i, shift in enumerate(shifts):
        n = acc.shape[dim] - shift
        last = as_bool and i == len(shifts) - 1
        acc = (torch.logical_or if last else torch.bitwise_or)(acc.narrow(dim, 0, n), acc.narrow(dim, shift, n))
    return acc != 0 if as_bool and not shifts else acc


def block_mask(
        batch: int,
        channels: int,
        height: int,
        width: int,
        prob: Union[float, torch.Tensor],
        block_size: int,
        *,
        device: Optional[torch.device] = None,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Block distortion mask of shape ``(batch, channels, height, width)``.

    ``channels=1`` gives a mask shared by all channels of a sample; otherwise every channel
    draws its own blocks (the paper's block FMD). ``block_size`` larger than the map is clamped
    to it. The expected fraction of ``True`` equals ``prob`` (see the module docstring).
    """
    kh, kw = clamp_block_size(block_size, height, width)
    rate = block_seed_rate(prob, height, width, block_size)
    seed_shape = (batch, channels, height - kh + 1, width - kw + 1)
    return grow_blocks(torch.rand(seed_shape, device=device, **generator_kwargs(generator)) < rate, kh, kw)


def grow_blocks(seeds: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Grow each ``True`` of a ``(B, C, H - kh + 1, W - kw + 1)`` seed field into its ``kh x kw`` block.

    A seed at ``(i, j)`` covers rows ``i .. i + kh - 1`` and columns ``j .. j + kw - 1``; returns the bool
    ``(B, C, H, W)`` mask. Grown as uint8 and converted by the copies and ORs themselves, never by a
    dtype-reinterpreting ``.view()``: inductor on CUDA cannot lower a view of a bool tensor.
    """
    return _grow(_grow(seeds, 3, kw), 2, kh, as_bool=True)  # rows last: its ORs read whole rows

