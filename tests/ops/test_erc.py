import itertools
import math

import pytest
import torch
import torch.nn as nn

from timm_fmd.ops.erc import distortion_objective, empirical_rademacher_complexity, rademacher_sup
from timm_fmd.ops.next_layer import NextLayer


def _exact_erc(outputs):
    """Definition 1 by enumeration: the mean over all 2^N sign vectors."""
    n = outputs.shape[0]
    flat = outputs.double().reshape(n, outputs.shape[1], -1)
    total = 0.0
    for signs in itertools.product((-1.0, 1.0), repeat=n):
        g = torch.einsum('n,nkp->kp', torch.tensor(signs, dtype=torch.float64), flat)
        total += (g.abs().mean(1).max() / n).item()
    return total / 2 ** n


@pytest.mark.parametrize('shape', [(10, 6), (12, 3, 4, 4), (8, 5, 7)])
def test_monte_carlo_erc_matches_enumeration(shape):
    torch.manual_seed(0)
    outputs = torch.randn(shape)
    exact = _exact_erc(outputs)
    estimate, stderr = empirical_rademacher_complexity(outputs, draws=4000, generator=torch.Generator().manual_seed(1))
    assert stderr > 0
    assert abs(estimate - exact) < 4 * stderr, (estimate, exact, stderr)


def test_erc_shrinks_like_one_over_sqrt_n():
    """For i.i.d. standard normal outputs the ERC of one unit is E|sum sigma_i o_i| / N ~ sqrt(2 / (pi N))."""
    torch.manual_seed(0)
    for n in (64, 256):
        est, se = empirical_rademacher_complexity(torch.randn(n, 1), draws=2000, generator=torch.Generator().manual_seed(n))
        # E|sum sigma_i o_i| = E|N(0, sum o_i^2)|; with sum o_i^2 ~ n this is sqrt(2 n / pi)
        assert est == pytest.approx(math.sqrt(2 / (math.pi * n)), rel=0.15)


def test_bad_arguments():
    with pytest.raises(ValueError, match='outputs must have shape'):
        empirical_rademacher_complexity(torch.randn(5))
    with pytest.raises(ValueError, match='draws must be an int >= 2'):
        empirical_rademacher_complexity(torch.randn(5, 2), draws=1)


def test_objective_of_dropout_with_full_mask_is_zero():
    """Paper, Sec. "Optimization of the Distortion": p = 1 with eps = f makes g = 0, so the first term vanishes."""
    torch.manual_seed(0)
    f = torch.randn(4, 3, 6, 6)
    nl = NextLayer(nn.Conv2d(3, 5, 3))
    mask = torch.ones(4, 3, 6, 6, dtype=torch.bool)
    sigma = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert distortion_objective(f, f, mask, sigma, nl).item() == 0.0
    t = distortion_objective(f, f, mask, sigma, nl, lam=0.5)
    assert t.item() == pytest.approx(0.5 / 8 * f.pow(2).sum().item())
    value, grad = rademacher_sup(nl, torch.zeros(3, 6, 6))
    assert value.item() == 0.0 and grad.abs().sum().item() == 0.0
