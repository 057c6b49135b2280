"""Empirical Rademacher complexity (ERC): the distortion objective ``T`` and a Monte-Carlo estimator.

All feature tensors here are in canonical layout ``(N, C, *spatial)``; ``spatial`` is empty for
a fully connected layer.

* :func:`rademacher_sup` -- ``sup_k sum_p |Q[k, p]|`` with ``Q = K * G`` and its gradient with respect
  to ``G`` (Eq. 13-14 for a linear next layer, Eq. 23-24 and the transposed convolution of Eq. 22
  for a convolution).
* :func:`distortion_objective` -- ``T(x, eps)`` of Eq. 11 / Eq. 21 in the paper's own normalisation.
* :func:`empirical_rademacher_complexity` -- Definition 1 (Eq. 3, 9) and its convolutional form,
  estimated by sampling Rademacher vectors.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .next_layer import NextLayer

__all__ = ['rademacher_sup', 'distortion_objective', 'empirical_rademacher_complexity']


def rademacher_sup(next_layer: NextLayer, g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``sup_k sum_p |Q[k, p]|`` for ``Q = K * g`` and its (sub)gradient with respect to ``g``.

    ``k_hat`` is the maximising row (Eq. 13 / 23) and ``S = sign(Q)`` (Eq. 14 / 24); the gradient is
    ``K[k_hat]^T (S[k_hat])``: one call of the next layer's op on ``g`` and one transposed op.
    ``g`` has shape ``(C, *spatial)``; the gradient has the same shape.
    """
    q = next_layer.apply(g)
    per_row = q.abs().reshape(q.shape[0], -1).sum(1)
    k_hat = per_row.argmax().reshape(1)  # stays on the device: no host synchronisation
    sign = q.index_select(0, k_hat)[0].sign()
    return per_row.index_select(0, k_hat)[0], next_layer.transpose_row(k_hat, sign, tuple(g.shape))


def distortion_objective(
        f: torch.Tensor,
        eps: torch.Tensor,
        mask: torch.Tensor,
        sigma: torch.Tensor,
        next_layer: NextLayer,
        lam: float = 0.0,
) -> torch.Tensor:
    """``T(x, eps)``: Eq. 11 (linear next layer) or Eq. 21 (convolution), as printed in the paper.

    ``T = sup_k sum_p |Q[k, p]| / (N P) + lam / (2N) * sum_i ||eps_i||^2`` with
    ``Q = K * sum_i sigma_i (f_i - m_i * eps_i)`` and ``P`` the number of output positions of ``Q``
    (1 for a linear layer, ``d_h' d_w'`` for a convolution).
    """
    n = f.shape[0]
    g = torch.einsum('n,n...->...', sigma.to(f.dtype), f - mask * eps)
    q = next_layer.apply(g)
    sup = q.abs().reshape(q.shape[0], -1).sum(1).max()
    return sup / (n * q[0].numel()) + lam / (2 * n) * eps.pow(2).sum()


def empirical_rademacher_complexity(
        outputs: torch.Tensor,
        draws: int = 256,
        *,
        generator: Optional[torch.Generator] = None,
        chunk: int = 64,
) -> Tuple[float, float]:
    """Monte-Carlo estimate of the ERC of one batch of layer outputs, with its standard error.

    ``outputs`` has shape ``(N, K, *spatial)``. For each draw of ``sigma`` in ``{-1, +1}^N``
    the statistic is ``sup_k (1/P) sum_p |sum_i sigma_i o_i[k, p]| / N`` -- Definition 1 (Eq. 3)
    for ``P = 1``, and the spatially averaged form of Eq. 21 for a feature map. Returns the mean
    over ``draws`` and its standard error ``std / sqrt(draws)``.
    """
    if outputs.ndim < 2:
        raise ValueError(f'outputs must have shape (N, K, *spatial), got {tuple(outputs.shape)}')
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
        raise ValueError(f'draws must be an int >= 2, got {draws!r}')
    n = outputs.shape[0]
    flat = outputs.detach().double().reshape(n, outputs.shape[1], -1)
    stats = []
    for start in range(0, draws, chunk):
        size = min(chunk, draws - start)
        sigma = torch.randint(0, 2, (size, n), generator=generator, device=flat.device).double() * 2 - 1
        g = torch.einsum('dn,nkp->dkp', sigma, flat)
        stats.append(g.abs().mean(2).amax(1) / n)
    stats = torch.cat(stats)
    return stats.mean().item(), stats.std().item() / math.sqrt(draws)
