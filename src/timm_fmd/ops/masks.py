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
``r`` and solved by bisection on the host (cached; no device work, no synchronisation).
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ['element_mask', 'block_mask', 'block_seed_rate', 'expected_block_fraction', 'clamp_block_size']


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

    A float ``prob`` is solved on the host (bisection, cached); a tensor ``prob`` -- the op's
    probability under ``torch.compile``, where a Python float would be baked into the graph -- is
    solved with tensor ops on its device (:func:`_seed_rate_tensor`).
    """
    if isinstance(prob, torch.Tensor):
        return _seed_rate_tensor(prob, height, width, block_size)
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


def _seed_rate_tensor(prob: torch.Tensor, height: int, width: int, block_size: int, iterations: int = 30):
    """Newton's method on ``F(r) = 1 - sum_n w_n (1 - r)^n = prob`` in tensor ops (no synchronisation).

    ``F`` is increasing and concave, so Newton's iterates from ``r = 0`` stay below the root and rise to
    it monotonically.
    """
    kh, kw = clamp_block_size(block_size, height, width)
    rows, cols = _coverage_counts(height, kh), _coverage_counts(width, kw)
    terms = [(a * b, cr * cc / (height * width)) for a, cr in rows.items() for b, cc in cols.items()]
    n = torch.tensor([t[0] for t in terms], dtype=torch.float64, device=prob.device)
    w = torch.tensor([t[1] for t in terms], dtype=torch.float64, device=prob.device)
    target = prob.to(torch.float64)
    rate = torch.zeros_like(target)
    for _ in range(iterations):
        keep_less_one = (1 - rate) ** (n - 1)
        f = 1 - (w * keep_less_one * (1 - rate)).sum() - target
        slope = (w * n * keep_less_one).sum()
        rate = (rate - f / slope).clamp(0, 1)
    return rate.to(prob.dtype)


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
    return torch.rand(tuple(shape), device=device, generator=generator) < prob


def _grow(seeds: torch.Tensor, dim: int, block: int) -> torch.Tensor:
    """Grow each seed along ``dim`` into ``block`` positions (a 1-D binary dilation).

    ``out[t] = OR_{j < block} seeds[t - j]``. Computed by doubling window widths with shifted ORs,
    about log2(block) byte-wise passes: far cheaper than a max-pool over a float map, which is
    what dominates per-channel DropBlock on CPU.
    """
    pad = [0, 0] * (seeds.ndim - 1 - dim) + [block - 1, block - 1]
    acc = F.pad(seeds, pad)
    width = 1
    while 2 * width <= block:
        n = acc.shape[dim] - width
        acc = acc.narrow(dim, 0, n) | acc.narrow(dim, width, n)
        width *= 2
    if width < block:  # the two windows of ``width`` overlap and together span ``block``
        shift = block - width
        n = acc.shape[dim] - shift
        acc = acc.narrow(dim, 0, n) | acc.narrow(dim, shift, n)
    return acc


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
    # uint8, not bool: F.pad has no bool kernel; the values stay 0/1 so the final view is exact.
    seeds = (torch.rand(seed_shape, device=device, generator=generator) < rate).view(torch.uint8)
    return _grow(_grow(seeds, 2, kh), 3, kw).view(torch.bool)

