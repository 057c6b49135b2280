import itertools

import pytest
import torch
import torch.nn.functional as F

from timm_fmd.ops.masks import (
    RATE_TABLE_SIZE, RATE_TABLE_T_MAX, _coverage_terms, block_mask, block_seed_rate, clamp_block_size, element_mask,
    expected_block_fraction, grow_blocks, seed_rate_table)


def _reference_block_mask(seeds, height, width, block_size):
    """Each valid seed at (i, j) covers rows i..i+kh-1 and cols j..j+kw-1: a loop over seeds."""
    kh, kw = clamp_block_size(block_size, height, width)
    out = torch.zeros(*seeds.shape[:2], height, width, dtype=torch.bool)
    for b, c, i, j in seeds.nonzero().tolist():
        out[b, c, i:i + kh, j:j + kw] = True
    return out


@pytest.mark.parametrize('height,width,block_size', [(9, 9, 3), (10, 7, 4), (14, 14, 7), (6, 6, 6), (5, 8, 9), (7, 7, 1)])
def test_block_growth_matches_a_loop_over_seeds(height, width, block_size):
    # regenerate the seeds the op draws from the same generator and compare with the loop reference
    prob = 0.2
    kh, kw = clamp_block_size(block_size, height, width)
    rate = block_seed_rate(prob, height, width, block_size)
    seeds = torch.rand((3, 4, height - kh + 1, width - kw + 1), generator=torch.Generator().manual_seed(0)) < rate
    mask = block_mask(3, 4, height, width, prob, block_size, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (3, 4, height, width)
    assert torch.equal(mask, _reference_block_mask(seeds, height, width, block_size))


def test_growth_equals_max_pool_dilation():
    seeds = torch.rand(2, 3, 8, 8) < 0.1
    for k in (1, 2, 3, 5, 6, 8):
        padded = F.pad(seeds.float(), (k - 1,) * 4)
        reference = F.max_pool2d(padded, k, 1).bool()
        grown = grow_blocks(seeds, k, k)
        assert torch.equal(grown, reference), k


def test_seed_rate_solution():
    assert block_seed_rate(0.0, 14, 14, 7) == 0.0
    # a block as large as the map: one valid seed per map, so the seed rate is the probability
    assert block_seed_rate(0.3, 7, 7, 7) == pytest.approx(0.3)
    assert block_seed_rate(0.3, 5, 5, 9) == pytest.approx(0.3)
    # block size 1 is element-wise dropout
    assert block_seed_rate(0.1, 14, 14, 1) == pytest.approx(0.1)
    for h, w, bs in itertools.product((7, 13, 28), (7, 20), (2, 5, 7)):
        rate = block_seed_rate(0.1, h, w, bs)
        assert expected_block_fraction(rate, h, w, bs) == pytest.approx(0.1, abs=1e-9)


def test_nominal_dropblock_rate_is_biased_and_the_solved_rate_is_not():
    """DropBlock's seed-rate formula ignores overlapping blocks; solving for the rate removes the bias."""
    h = w = 14
    bs = 7
    nominal = 0.1 * h * w / bs ** 2 / ((h - bs + 1) * (w - bs + 1))  # Ghiasi et al. / the authors' release
    assert abs(expected_block_fraction(nominal, h, w, bs) - 0.1) > 0.005  # realises ~0.093
    assert expected_block_fraction(block_seed_rate(0.1, h, w, bs), h, w, bs) == pytest.approx(0.1, abs=1e-9)


def test_element_mask():
    gen = torch.Generator().manual_seed(0)
    mask = element_mask((64, 32, 10), 0.25, generator=gen)
    assert mask.dtype == torch.bool and mask.shape == (64, 32, 10)
    # 20,480 Bernoulli(0.25) draws: standard error 0.003
    assert abs(mask.float().mean().item() - 0.25) < 0.012


@pytest.mark.parametrize('height,width,block_size',
                         [(14, 14, 7), (56, 56, 7), (9, 8, 4), (28, 28, 9), (7, 7, 7), (112, 112, 3)])
def test_seed_rate_table_interpolation_error(height, width, block_size):
    """A tensor prob reads its seed rate from a table over t = -log(1 - prob), linearly interpolated.

    Bound (documented in masks._seed_rate_tensor): the expected realised fraction at the interpolated rate
    is within 1e-5 of prob at every grid point, every midpoint between grid points (where linear
    interpolation errs most) and at random probabilities; measured worst 1.2e-6 (float32 rounding included).
    """
    t = torch.linspace(0, RATE_TABLE_T_MAX, RATE_TABLE_SIZE, dtype=torch.float64)
    probs = torch.cat([-torch.expm1(-t), -torch.expm1(-(t[:-1] + t[1:]) / 2),
                       torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)])
    probs = probs.float()
    probs = probs[probs < 1]
    rates = block_seed_rate(probs, height, width, block_size)
    assert rates.dtype == torch.float32 and rates.shape == probs.shape
    n, w = _coverage_terms(height, width, *clamp_block_size(block_size, height, width))
    realised = 1 - (w * (1 - rates.double()[:, None]) ** n).sum(1)
    assert (realised - probs.double()).abs().max().item() < 1e-5
    # the float path (exact host bisection) and the table agree
    for p in (0.05, 0.1, 0.3):
        assert block_seed_rate(torch.tensor(p), height, width, block_size).item() == pytest.approx(
            block_seed_rate(p, height, width, block_size), rel=1e-4, abs=1e-7)


def test_seed_rate_table_is_cached_per_shape_and_device():
    a = seed_rate_table(14, 14, 7, 7, torch.device('cpu'))
    assert a is seed_rate_table(14, 14, 7, 7, torch.device('cpu'))
    assert a.shape == (RATE_TABLE_SIZE,) and a.dtype == torch.float32
    assert a[0] == 0 and bool((a[1:] > a[:-1]).all())  # s = -log(1 - rate) rises with prob
    elementwise = seed_rate_table(14, 14, 1, 1, torch.device('cpu'))  # no overlap: rate = prob, s = t exactly
    torch.testing.assert_close(elementwise, torch.linspace(0, RATE_TABLE_T_MAX, RATE_TABLE_SIZE))
