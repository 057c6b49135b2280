"""Feature Map Distortion (FMD) and block FMD.

Tang, Wang, Xu, Xu, Xu, Tian, Xu, "Beyond Dropout: Feature Map Distortion to Regularize Deep
Neural Networks", AAAI 2020 (arXiv:2002.11022).

Dropout replaces the masked elements of a feature map by zero, ``f_hat = f - m * f`` (Eq. 5).
FMD replaces them by a *learned distortion*: ``f_hat = f - m * eps`` (Eq. 6 / Eq. 17), where
``eps`` starts at ``f`` (so the start is dropout) and takes ``steps`` gradient steps on the
empirical-Rademacher-complexity objective ``T(x, eps)`` of the next layer's output (Eq. 10-11
for a fully connected next layer, Eq. 20-21 for a convolution; see :mod:`timm_fmd.erc`).

Two ways to compute the gradient of ``T``:

* ``mode='exact'`` -- Eq. 12-14 (linear next layer) / Eq. 22-24 (convolution) with the batch's true
  maximising row ``k_hat`` and sign ``S`` of ``Q = K * G``, ``G = sum_i sigma_i f_hat_i``
  (Eq. 8 / 18), one Rademacher sign ``sigma_i`` per sample. The gradient of ``sum_p |Q[k_hat, p]|``
  is taken through the transposed convolution, i.e. the true derivative of Eq. 21; the printed
  Eq. 22 is its position-independent simplification.
* ``mode='approx'`` -- Eq. 15 / Eq. 22 with the paper's random stand-ins: ``sigma_i u`` with
  ``u ~ N(0, 1)`` per element (``sigma_i u`` is itself ``N(0, 1)``, so one normal is drawn) and
  ``K_M``, the column-wise max of the next layer's weight. For a convolution the per-channel
  weight is ``w_c = mean_{h,w}(S'[c, h, w] * K_M[c, h, w])`` with random signs ``S'``, times 0.1 when
  the kernel is 1x1; for a linear next layer ``w_c = K_M[c]``; with no known next layer
  ``w_c = 0.01``. This matches, in distribution, the authors' public release (Disout), where a
  distorted element becomes ``gamma * std(f) * w_c * z``, ``z ~ N(0, 1)``.

How gamma, lambda and the 1/N of the equations map to this code. Let ``N`` be the batch size,
``P`` the number of output positions of ``Q`` (1 for a linear layer) and ``|w|`` the kernel area
of the next layer (1 for a linear layer). One step of the code is::

    eps <- eps - gamma * std(f) * (-sigma_i * m_i * D / |w| + lam * eps)

with ``D = K[k_hat]^T S[k_hat]`` (exact) or ``D / |w|`` replaced by ``u * w_c`` (approx). This is
the paper's step (Eq. 16) ``eps <- eps - gamma_p * dT/deps`` with
``gamma_p = gamma * std(f) * N * P / |w|`` and ``lambda_p = lam * |w| / P`` (for a linear next layer:
``gamma_p = gamma * std(f) * N`` and ``lambda_p = lam``). Absorbing ``N * P`` keeps gamma independent
of batch and map size; dividing by ``|w|`` makes ``D / |w|`` the kernel-window *mean* that the
authors' release uses. ``std(f)`` is the standard deviation of the whole batch's feature map
(paper, Experiments: "we multiply gamma by the standard deviation of the feature maps"); above
2^18 elements it is estimated from an evenly strided subset of that many (see :func:`_feature_std`).

``eps`` is a constant for the weights' backward pass -- the paper alternates one ``eps`` step and one
weight step -- so gradients reach ``f`` through the kept elements only. The output is divided by
the realised kept fraction, distorted elements included, as in the authors' release (the paper's
"dividing p in the training phase"). Eval mode and ``prob == 0`` return the input object itself.

Two implementations with one semantics. On a CUDA map the common case -- ``lam == 0``, ``steps == 1``, no
``mask=``, float32/bfloat16/float16 -- runs fused Triton kernels (:mod:`timm_fmd.ops.fused`: 2 kernels forward,
1 backward, no mask kept for backward, no host synchronisation); everything else, and every CPU map, runs the
PyTorch code below, the reference the fused path is tested against. The fused path draws its randomness from
one seed per call taken from torch's generator (same distribution, other numbers than the reference for the same
seed) and computes ``std(f)`` over every element.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import fused
from .erc import rademacher_sup
from .masks import block_mask, block_seed_rate, element_mask, expected_block_fraction
from .next_layer import NO_NEXT_LAYER_WEIGHT, ONE_BY_ONE_FACTOR, NextLayer
from .noise import DrawnNoise, GivenNoise
from .positions import flat, positions
from .schedule import LinearRamp, refresh_probs
from .validation import check_choice, check_non_negative, check_positive_int, check_prob

__all__ = ['feature_map_distortion', 'FeatureMapDistortion', 'BlockFeatureMapDistortion', 'approx_channel_weights']

LAYOUTS = ('NC', 'NLC', 'NCL', 'NCHW', 'NHWC')
_DEFAULT_LAYOUT = {2: 'NC', 3: 'NLC', 4: 'NCHW'}

NextLayerLike = Union[nn.Module, torch.Tensor, NextLayer, None]


def _resolve_layout(layout: Optional[str], ndim: int) -> str:
    if layout is None:
        if ndim not in _DEFAULT_LAYOUT:
            raise ValueError(
                f'x must have shape (B, C), (B, N, C) or (B, C, H, W); got a {ndim}-dim tensor')
        return _DEFAULT_LAYOUT[ndim]
    check_choice(layout, 'layout', LAYOUTS)
    if len(layout) != ndim:
        raise ValueError(f'layout {layout!r} needs a {len(layout)}-dim tensor, got a {ndim}-dim tensor')
    return layout


def approx_channel_weights(
        next_layer: Optional[NextLayer],
        channels: int,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        generator: Optional[torch.Generator] = None,
        noise: Optional[DrawnNoise] = None,
) -> torch.Tensor:
    """``w_c``, the per-channel scale of the approximate gradient (Eq. 15 / Eq. 22), shape ``(C,)``.

    The random signs ``S'`` come from ``noise`` (default: drawn from ``generator``, see :mod:`.noise`).
    """
    if next_layer is None:
        return torch.full((channels,), NO_NEXT_LAYER_WEIGHT, device=device, dtype=dtype)
    k_max = next_layer.channel_max().to(device=device, dtype=dtype)
    if next_layer.kind == 'linear':
        return k_max
    signs = (noise or DrawnNoise(generator)).weight_signs(k_max.shape, device)
    weights = torch.where(signs, k_max, -k_max).mean((1, 2))
    return weights * ONE_BY_ONE_FACTOR if next_layer.window == 1 else weights


def _is_dense(t: torch.Tensor) -> bool:
    """True when ``t`` covers its memory without gaps or overlaps (any dimension order).

    The common layouts are recognised first: under ``torch.compile`` with dynamic shapes the strides are
    symbolic and cannot be sorted (a graph break); an uncommon layout then counts as not dense (one copy).
    """
    if t.is_contiguous() or (t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return True
    if not all(isinstance(s, int) for s in t.stride()):
        return False
    expected = 1
    for d in sorted(range(t.ndim), key=t.stride):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


STD_SAMPLE = 1 << 18  # elements: above this, std(f) is estimated from an evenly strided subset


def _feature_std(xc: torch.Tensor) -> torch.Tensor:
    """``std(f)`` over the whole batch's map (unbiased, as torch.var in the authors' release).

    Above :data:`STD_SAMPLE` elements it is estimated from every ``step``-th element in memory, with
    ``step`` coprime to the channel count and the spatial size so the subset visits every channel
    and position evenly: a relative standard error of ~0.14%, far below the std's own variation from
    batch to batch, at a fraction of a full pass over the map.
    """
    n = xc.numel()
    if n <= STD_SAMPLE:
        return xc.std(correction=1 if n > 1 else 0)
    step = n // STD_SAMPLE
    spatial = n // (xc.shape[0] * xc.shape[1])
    while math.gcd(step, xc.shape[1]) != 1 or math.gcd(step, spatial) != 1:
        step += 1
    return flat(xc)[::step].std()


def _distort(
        x: torch.Tensor,
        prob: Union[float, torch.Tensor],
        *,
        gamma: float,
        lam: float,
        steps: int,
        mode: str,
        next_layer: NextLayerLike,
        block_size: Optional[int],
        shared_mask: bool,
        layout: Optional[str],
        generator: Optional[torch.Generator],
        mask: Optional[torch.Tensor],
        noise: Optional[GivenNoise] = None,
) -> Tuple[torch.Tensor, Union[float, torch.Tensor]]:
    """:func:`feature_map_distortion` in training mode; also returns the realised distorted fraction.

    ``prob`` may be a 0-dim tensor (a module's ``prob_now`` under ``torch.compile``), validated when set.
    ``noise`` (internal, for tests) replaces the random stand-ins by given ones (:class:`.noise.GivenNoise`).
    """
    if not isinstance(prob, torch.Tensor):
        prob = check_prob(prob)
        if block_size is not None and mask is None and torch.compiler.is_compiling():
            # dynamo makes a float that changes between calls symbolic, and the block seed rate of a float is
            # solved on the host: a 0-dim tensor takes the table path (as a module's prob_now does)
            prob = torch.full((), prob, dtype=torch.float32, device=x.device)
    gamma = check_non_negative(gamma, 'gamma')
    lam = check_non_negative(lam, 'lam')
    steps = check_positive_int(steps, 'steps')
    check_choice(mode, 'mode', ('approx', 'exact'))
    layout = _resolve_layout(layout, x.ndim)
    channel_dim = layout.index('C')
    xc = x if channel_dim == 1 else x.movedim(channel_dim, 1)  # canonical (B, C, *spatial); a view, dense when x is
    if not _is_dense(x):
        xc = xc.contiguous()
    batch, channels, spatial = xc.shape[0], xc.shape[1], tuple(xc.shape[2:])

    if next_layer is not None and not isinstance(next_layer, NextLayer):
        next_layer = NextLayer(next_layer)
    if next_layer is not None:
        next_layer.check_fits(channels, len(spatial))
        if mode == 'exact' and next_layer.module is None:
            raise ValueError("mode='exact' needs next_layer as a module (nn.Linear / nn.Conv2d); "
                             'a bare weight tensor is enough only for ' "mode='approx'")

    if block_size is not None and mask is None:
        check_positive_int(block_size, 'block_size')
        if len(spatial) != 2:
            raise ValueError(f'block_size needs a feature map with 2 spatial dims (layout NCHW or NHWC), '
                             f'got layout {layout!r}')
    exact = mode == 'exact' and next_layer is not None
    if fused.applies(xc, lam=lam, steps=steps, mask=mask, noise=noise):
        out, fraction = fused.distort(xc, prob, gamma=gamma, exact=exact, next_layer=next_layer, block_size=block_size,
                                      shared_mask=shared_mask, generator=generator)
        return (out if channel_dim == 1 else out.movedim(1, channel_dim)), fraction

    if mask is None:
        if block_size is None:
            mask = element_mask(xc.shape, prob, device=x.device, generator=generator)
        else:
            mask = block_mask(batch, 1 if shared_mask else channels, *spatial, prob, block_size,
                              device=x.device, generator=generator)
    elif (mask.dtype != torch.bool or mask.ndim != xc.ndim or mask.shape[0] != batch
          or mask.shape[1] not in (1, channels) or tuple(mask.shape[2:]) != spatial):
        raise ValueError(f'mask must be a bool tensor of shape {tuple(xc.shape)} in canonical (B, C, *spatial) '
                         f'layout (channel dim may be 1), got {mask.dtype} {tuple(mask.shape)}')

    noise = noise or DrawnNoise(generator)
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        pos = positions(mask, xc, compute_dtype)
        step = gamma * _feature_std(xc).to(compute_dtype)
        feats = pos.features(xc, compute_dtype) if (lam > 0 or exact) else None
        if exact:
            sigma = noise.sample_signs(batch, x.device, compute_dtype)
            g_full = torch.einsum('b,b...->...', sigma, xc.to(compute_dtype))  # sum_i sigma_i f_i
        values = pos.zeros(compute_dtype)  # f_hat at distorted positions; eps = f is dropout's zero
        for _ in range(steps):
            # eps <- eps - step * (-direction + lam * eps), written for the distorted values f_hat = f - eps:
            # f_hat <- f_hat - step * direction + step * lam * (f - f_hat). Scalar factors go into the small
            # per-sample / per-channel vectors, so each term costs one pass over the distorted elements.
            if exact:
                # G = sum_i sigma_i f_hat_i (Eq. 8 / 18): the full sum, corrected at distorted positions
                g = g_full + pos.batch_sum(pos.per_sample(sigma) * (values - feats))
                _, d = rademacher_sup(next_layer, g)
                step_direction = pos.per_sample(sigma * (step / next_layer.window)) * pos.per_position(d)
            else:
                w = approx_channel_weights(next_layer if mode == 'approx' else None, channels,
                                           device=x.device, dtype=compute_dtype, noise=noise)
                step_direction = pos.per_channel(w * step) * noise.normal(pos, compute_dtype)
            if lam > 0:
                step_direction = step_direction - (step * lam) * (feats - values)
            values = values - step_direction
    out = pos.combine(xc, values).movedim(1, channel_dim)
    return out, pos.fraction


def feature_map_distortion(
        x: torch.Tensor,
        prob: float = 0.1,
        *,
        gamma: float = 1.0,
        lam: float = 0.0,
        steps: int = 1,
        mode: str = 'approx',
        next_layer: NextLayerLike = None,
        block_size: Optional[int] = None,
        shared_mask: bool = False,
        layout: Optional[str] = None,
        training: bool = True,
        generator: Optional[torch.Generator] = None,
        mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Feature map distortion (Eq. 6 / Eq. 17); block FMD when ``block_size`` is given.

    Args:
        x: feature map, ``(B, C)``, ``(B, N, C)`` tokens or ``(B, C, H, W)`` (see ``layout``).
        prob: expected fraction of distorted elements, in [0, 1). For block masks the seed rate is
            solved so that the realised fraction matches ``prob`` at every map and block size.
        gamma: step length, multiplied by ``std(x)`` (see the module docstring for the exact scaling).
        lam: weight of the ``||eps||^2`` term of ``T`` (the paper's lambda; 0 in the authors' release).
        steps: gradient steps on ``eps`` per forward (the paper uses 1).
        mode: ``'approx'`` (Eq. 15 / 22 with random stand-ins; the authors' release) or ``'exact'``
            (Eq. 12-14 / 22-24 with the batch's true ``k_hat`` and ``S``).
        next_layer: the layer consuming the distorted map (module, or a weight tensor for ``'approx'``).
            ``None`` falls back to the authors' fixed weight 0.01 in both modes.
        block_size: side of the square blocks (block FMD, 2 spatial dims); ``None`` for element-wise FMD.
        shared_mask: one block mask for all channels of a sample instead of one per channel.
        layout: ``'NC'``, ``'NLC'``, ``'NCL'``, ``'NCHW'`` or ``'NHWC'``; default by ``x.ndim``: NC, NLC, NCHW.
        training: when False, ``x`` is returned unchanged (the same object).
        generator: random generator for every draw (mask, signs, normals).
        mask: a precomputed bool distortion mask in canonical ``(B, C or 1, *spatial)`` layout
            instead of a random one (``prob`` is then only range-checked: the mask decides).

    Returns:
        The distorted map, same shape, dtype and memory format as ``x``.

    On a CUDA device with ``lam == 0``, ``steps == 1`` and no ``mask`` this runs the fused Triton kernels of
    :mod:`timm_fmd.ops.fused`; otherwise the PyTorch path (see the module docstring).
    """
    if not training or (prob == 0.0 and mask is None):
        check_prob(prob)
        return x
    out, _ = _distort(x, prob, gamma=gamma, lam=lam, steps=steps, mode=mode, next_layer=next_layer,
                      block_size=block_size, shared_mask=shared_mask, layout=layout, generator=generator, mask=mask)
    return out


class FeatureMapDistortion(nn.Module):
    """Element-wise feature map distortion (Eq. 6), with the probability ramp of the paper.

    Args:
        prob: target distortion probability, reached after ``ramp_steps`` (see :mod:`timm_fmd.ops.schedule`).
        gamma, lam, steps, mode, layout: see :func:`feature_map_distortion`.
        next_layer: the layer consuming this module's output. Held as a plain reference, not a
            submodule, so the model's ``state_dict`` keys do not change. Set later with :meth:`link`.
        ramp_steps: length of the linear ramp from 0 to ``prob``, in optimiser steps (0: no ramp). The steps
            of the optimisers holding the model's parameters advance it, never the forwards: inside a model
            built by :func:`timm_fmd.apply_fmd`, or one passed to :func:`timm_fmd.set_schedule_step`.
    """

    block_size: Optional[int] = None
    shared_mask: bool = False

    def __init__(
            self,
            prob: float = 0.1,
            *,
            gamma: float = 1.0,
            lam: float = 0.0,
            steps: int = 1,
            mode: str = 'approx',
            layout: Optional[str] = None,
            next_layer: NextLayerLike = None,
            ramp_steps: int = 0,
    ):
        super().__init__()
        self.ramp = LinearRamp(check_prob(prob), ramp_steps)
        # The ramp's state on the model's device (see timm_fmd.ops.schedule): the optimiser steps counted and the
        # probability of the next training forward. Non-persistent buffers: no state_dict key; .to() moves them.
        self.register_buffer('ramp_count', torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer('prob_now', torch.tensor(self.ramp.value(0), dtype=torch.float32), persistent=False)
        self.gamma = check_non_negative(gamma, 'gamma')
        self.lam = check_non_negative(lam, 'lam')
        self.steps = check_positive_int(steps, 'steps')
        self.mode = check_choice(mode, 'mode', ('approx', 'exact'))
        self.layout = None if layout is None else check_choice(layout, 'layout', LAYOUTS)
        self.generator: Optional[torch.Generator] = None
        self.last_fraction: Union[float, torch.Tensor, None] = None
        self.link(next_layer)

    @property
    def prob(self) -> float:
        """The target probability (the ramp's end)."""
        return self.ramp.target

    @prob.setter
    def prob(self, value: float) -> None:
        self.ramp.target = check_prob(value)
        self.sync_ramp()

    def sync_ramp(self) -> None:
        """Recompute ``prob_now`` from the step count and the target (device ops, no synchronisation)."""
        if self.ramp.steps:
            refresh_probs([self])
        else:
            self.prob_now.fill_(self.ramp.target)

    @property
    def current_prob(self) -> float:
        """The probability of the next training forward (reads the step count: may synchronise a device)."""
        return self.ramp.value(int(self.ramp_count)) if self.ramp.steps else self.ramp.target

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> 'FeatureMapDistortion':
        prob_now = self.prob_now
        super()._apply(fn, recurse)
        if self.prob_now.dtype != torch.float32:  # model.half(), .to(torch.bfloat16): keep the probability float32
            self.prob_now = prob_now.to(self.prob_now.device)
        return self

    def link(self, next_layer: NextLayerLike) -> None:
        """Set the layer whose weight guides the distortion (``None``: the authors' fixed fallback)."""
        if next_layer is not None and not isinstance(next_layer, NextLayer):
            next_layer = NextLayer(next_layer)  # validated now, not at the first training step
        # object.__setattr__ keeps it out of the module tree: no state_dict keys, no double .to()
        object.__setattr__(self, '_next', next_layer)

    @property
    def next_layer(self) -> Union[nn.Module, torch.Tensor, None]:
        """The linked layer (module or weight tensor), or ``None``."""
        nl = self._next
        return None if nl is None else (nl.module if nl.module is not None else nl.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if not torch.compiler.is_compiling():
            self._check_eager_forward()
        prob = self._forward_prob()
        if not isinstance(prob, torch.Tensor) and prob == 0.0:
            return x
        out, fraction = _distort(
            x, prob, gamma=self.gamma, lam=self.lam, steps=self.steps, mode=self.mode, next_layer=self._next,
            block_size=self.block_size, shared_mask=self.shared_mask, layout=self.layout, generator=self.generator,
            mask=None)
        if not torch.compiler.is_compiling():
            self.__dict__['last_fraction'] = fraction  # a plain attribute: skips nn.Module.__setattr__'s checks
        return out

    def _forward_prob(self) -> Union[float, torch.Tensor]:
        """This training forward's probability. Forwards never change the ramp (the optimiser steps do)."""
        if torch.compiler.is_compiling():
            return self.prob_now  # a graph input: no guard on the ramp, no recompilation as it rises
        if not self.ramp.steps:
            return self.ramp.target
        if self.prob_now.device.type != 'cpu':
            return self.prob_now  # read on the device: no host sync
        return self.current_prob  # free on the CPU; keeps the host seed-rate cache and the prob == 0 shortcut

    def _check_eager_forward(self) -> None:
        if self.ramp.steps and self.ramp.driver is None:
            warnings.warn(f'{type(self).__name__}(ramp_steps={self.ramp.steps}) is in no model whose optimiser '
                          f'steps are counted, so its ramp does not advance: call timm_fmd.set_schedule_step(model, '
                          f'0) on the model that holds it, or drive it with timm_fmd.step_schedule(model)')
        # Activation checkpointing restores torch's RNG states before it recomputes a forward (inside the
        # backward pass), not an explicit generator's: the recompute would draw another mask.
        if self.generator is not None and torch._C._current_graph_task_id() != -1:
            raise RuntimeError(f'{type(self).__name__}.generator is set, and this forward runs inside a backward '
                               f'pass (recomputed by activation checkpointing): it would draw another mask than '
                               f'the original forward. Leave generator=None (torch.manual_seed seeds the op) with '
                               f'checkpointing')

    def realised_fraction(self) -> Optional[float]:
        """The distorted fraction of the last training forward (reading it may synchronise a device)."""
        return None if self.last_fraction is None else float(self.last_fraction)

    def _next_repr(self) -> str:
        nl = self.next_layer
        if nl is None:
            return f'none (w={NO_NEXT_LAYER_WEIGHT})'
        if isinstance(nl, torch.Tensor):
            return f'weight{tuple(nl.shape)}'
        return type(nl).__name__

    def extra_repr(self) -> str:
        parts = [f'prob={self.prob:g}']
        if self.ramp.steps:
            parts.append(f'current={self.current_prob:.4g} (ramp {int(self.ramp_count)}/{self.ramp.steps})')
        realised = self.realised_fraction()
        if realised is not None:
            parts.append(f'realised={realised:.4f}')
        if self.block_size is not None:
            parts.append(f'block_size={self.block_size}' + (', shared_mask=True' if self.shared_mask else ''))
        parts += [f'gamma={self.gamma:g}', f'lam={self.lam:g}', f'steps={self.steps}', f'mode={self.mode}',
                  f'next_layer={self._next_repr()}']
        if self.layout is not None:
            parts.append(f'layout={self.layout}')
        return ', '.join(parts)


class BlockFeatureMapDistortion(FeatureMapDistortion):
    """Block feature map distortion: DropBlock-style square blocks distorted together (paper, Sec. "Extension
    to Convolutional Layers").

    Args:
        prob: target expected fraction of distorted elements (the realised fraction, not DropBlock's
            nominal rate: the seed rate is solved for the map and block size).
        block_size: side of the square blocks; odd or even; clamped to the map.
        shared_mask: one mask per sample shared by all channels (DropBlock's original choice)
            instead of one per channel (the paper's block FMD).
        **kwargs: as :class:`FeatureMapDistortion`.
    """

    def __init__(self, prob: float = 0.1, block_size: int = 7, *, shared_mask: bool = False, **kwargs):
        super().__init__(prob, **kwargs)
        self.block_size = check_positive_int(block_size, 'block_size')
        if not isinstance(shared_mask, bool):
            raise TypeError(f'shared_mask must be a bool, got {shared_mask!r}')
        self.shared_mask = shared_mask

    def expected_fraction(self, height: int, width: int) -> float:
        """The expected distorted fraction at the current probability on an ``height x width`` map."""
        rate = block_seed_rate(self.current_prob, height, width, self.block_size)
        return expected_block_fraction(rate, height, width, self.block_size)
