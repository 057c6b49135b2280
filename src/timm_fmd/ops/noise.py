"""The random stand-ins of the reference op, drawn from torch's generator or given.

The reference op (:func:`timm_fmd.ops.distortion.feature_map_distortion`) draws, besides its mask, three kinds
of noise: one Rademacher sign per sample (``sigma_i`` of Eq. 8 / 18, exact mode), the random signs ``S'`` of
the approx mode's per-channel weight (Eq. 22) and one standard normal per distorted element (``u`` of
Eq. 15 / 22). :class:`DrawnNoise` draws them (the op's behaviour); :class:`GivenNoise` hands over values
drawn elsewhere -- the fused GPU kernels report theirs, and the tests check that the reference given the
kernels' mask and noise computes the kernels' output.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ['DrawnNoise', 'GivenNoise', 'generator_kwargs']


def generator_kwargs(generator: Optional[torch.Generator]) -> dict:
    """``{'generator': generator}``, or ``{}`` for torch's default generator.

    An explicit ``generator=None`` makes ``torch.rand`` fail under ``torch.compile`` when a shape is symbolic
    (dynamic batch size); leaving the argument out draws from the same default generator.
    """
    return {} if generator is None else {'generator': generator}


class DrawnNoise:
    """Draws each stand-in when asked, in the order the op asks, from ``generator`` (``None``: torch's own)."""

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.kwargs = generator_kwargs(generator)

    def sample_signs(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``sigma``: ``(batch,)`` values in {-1, +1}."""
        return torch.randint(0, 2, (batch,), device=device, **self.kwargs).to(dtype) * 2 - 1

    def weight_signs(self, shape, device: torch.device) -> torch.Tensor:
        """``S' > 0``: a bool tensor of ``shape`` (the next layer's ``(C, kh, kw)``)."""
        return torch.rand(tuple(shape), device=device, **self.kwargs) < 0.5

    def normal(self, pos, dtype: torch.dtype) -> torch.Tensor:
        """One standard normal per distorted element, in the order of the positions ``pos``."""
        return pos.normal(dtype, self.kwargs)


class GivenNoise:
    """Stand-ins given in advance: ``sigma`` ``(B,)``, ``weight_signs`` bool ``(C, kh, kw)`` and ``normal``, a
    full canonical ``(B, C, *spatial)`` map of normals of which the distorted elements' ones are used."""

    def __init__(self, sigma: Optional[torch.Tensor] = None, weight_signs: Optional[torch.Tensor] = None,
                 normal: Optional[torch.Tensor] = None):
        self.sigma, self.signs, self.full_normal = sigma, weight_signs, normal

    @staticmethod
    def _given(value: Optional[torch.Tensor], what: str) -> torch.Tensor:
        if value is None:
            raise ValueError(f'GivenNoise has no {what}')
        return value

    def sample_signs(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self._given(self.sigma, 'sigma').to(device=device, dtype=dtype)

    def weight_signs(self, shape, device: torch.device) -> torch.Tensor:
        signs = self._given(self.signs, 'weight_signs')
        if tuple(signs.shape) != tuple(shape):
            raise ValueError(f'weight_signs must have shape {tuple(shape)}, got {tuple(signs.shape)}')
        return signs.to(device)

    def normal(self, pos, dtype: torch.dtype) -> torch.Tensor:
        return pos.pick(self._given(self.full_normal, 'normal')).to(dtype)
