"""The layer that consumes a distorted feature map: the paper's ``K^{l+1}``.

FMD's objective (Eq. 11 / Eq. 21) is the empirical Rademacher complexity of the *next* layer's
pre-activation output ``o^{l+1} = K^{l+1} f^l``, bias omitted as in the paper. This module
wraps that layer as a linear map on one feature map in canonical layout ``(C, *spatial)``:

* :meth:`NextLayer.apply` -- ``Q = K * G`` (Eq. 9 inner product / Eq. 19 convolution);
* :meth:`NextLayer.transpose_row` -- the adjoint of one output channel ``k``: ``K[k]^T r``, the
  transposed convolution that carries the gradient of ``sum |Q[k]|`` back to ``G`` (Eq. 22);
* :meth:`NextLayer.channel_max` -- ``K_M``, the column-wise max of the weight (Eq. 15).

``nn.Linear`` and ``nn.Conv2d`` with zero padding are computed directly (stride, padding,
dilation and groups respected, depthwise included). Any other layer -- a timm wrapper such as
``Conv2dSame`` or ``StdConv2d``, or a ``Conv2d`` subclass with its own ``forward`` -- is run
through its own ``forward`` (bias removed), and its transpose comes from autograd, so its exact
semantics (dynamic 'same' padding, weight standardisation) are respected.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.grad import conv2d_input

__all__ = ['NextLayer', 'resolve_next_layer', 'NO_NEXT_LAYER_WEIGHT', 'ONE_BY_ONE_FACTOR']

# the approx mode's per-channel weight w_c (Eq. 15 / 22) as in the authors' release:
NO_NEXT_LAYER_WEIGHT = 0.01  # when no next layer is known
ONE_BY_ONE_FACTOR = 0.1  # times the window mean, for a 1x1 next convolution


def resolve_next_layer(layer: nn.Module) -> nn.Module:
    """``layer`` itself if it is a ``Linear``/``Conv2d``, else the first one inside it (e.g. a ConvNormAct)."""
    for m in layer.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            return m
    raise TypeError(
        f'next_layer must be an nn.Linear, an nn.Conv2d or a module containing one, got {type(layer).__name__}')


class NextLayer:
    """A linear or 2-D convolutional layer seen as the linear map ``K`` of the paper.

    Args:
        layer: a module (``nn.Linear``, ``nn.Conv2d``, or a wrapper containing one), or a bare weight
            tensor of shape ``(K, C)`` or ``(K, C, kh, kw)`` (enough for ``mode='approx'``, which only
            needs ``K_M``; ungrouped convolution is assumed for a bare tensor).
    """

    def __init__(self, layer: Union[nn.Module, torch.Tensor]):
        if isinstance(layer, torch.Tensor):
            self.module = None
            self._weight = layer.detach()
            self.groups = 1
        elif isinstance(layer, nn.Module):
            self.module = resolve_next_layer(layer)
            self._weight = None
            self.groups = getattr(self.module, 'groups', 1)
        else:
            raise TypeError(f'next_layer must be an nn.Module or a weight tensor, got {type(layer).__name__}')
        if self.weight.ndim not in (2, 4):
            raise ValueError(
                f'next_layer weight must have shape (K, C) or (K, C, kh, kw), got {tuple(self.weight.shape)}')
        self.kind = 'linear' if self.weight.ndim == 2 else 'conv'
        m = self.module
        # The direct path applies only where the module's forward is exactly the textbook op.
        self.direct = m is None or (
            type(m).forward is nn.Linear.forward
            or (type(m).forward is nn.Conv2d.forward and m.padding_mode == 'zeros' and not isinstance(m.padding, str))
        )

    @property
    def weight(self) -> torch.Tensor:
        """The current weight, read from the module at each use: optimiser steps and ``.to()`` stay visible."""
        return self._weight if self.module is None else self.module.weight.detach()

    @property
    def _shape(self) -> torch.Size:
        return (self._weight if self.module is None else self.module.weight).shape  # no detached view: host time

    @property
    def in_channels(self) -> int:
        return self._shape[1] * self.groups

    @property
    def window(self) -> int:
        """Kernel area ``kh * kw`` (1 for a linear layer)."""
        return 1 if self.kind == 'linear' else self._shape[2] * self._shape[3]

    def check_fits(self, channels: int, spatial_dims: int) -> None:
        """Raise ``ValueError`` unless this layer can consume a map of ``channels`` x ``spatial_dims`` dims."""
        if self.kind == 'conv' and spatial_dims != 2:
            raise ValueError(
                f'next_layer is a 2-D convolution (weight {tuple(self.weight.shape)}) but the feature map '
                f'has {spatial_dims} spatial dims; a conv next layer needs a (B, C, H, W) feature map')
        if self.in_channels != channels:
            raise ValueError(
                f'next_layer expects {self.in_channels} input channels (weight {tuple(self.weight.shape)}, '
                f'groups={self.groups}) but the feature map has {channels} channels')

    def channel_max(self) -> torch.Tensor:
        """``K_M``: per input channel, the max over the output channels it feeds (Eq. 15).

        Shape ``(C,)`` for a linear layer and ``(C, kh, kw)`` for a convolution (grouped and depthwise
        convolutions take the max within the channel's own group).
        """
        w = self.weight
        if self.kind == 'linear':
            return w.amax(0)
        out_ch, in_per_group, kh, kw = w.shape
        grouped = w.reshape(self.groups, out_ch // self.groups, in_per_group, kh, kw)
        return grouped.amax(1).reshape(self.groups * in_per_group, kh, kw)

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        """``Q = K * g`` without bias for one map ``g`` of shape ``(C, *spatial)``; returns ``(K, *spatial')``."""
        if not self.direct:
            return self._module_apply(g)
        w = self.weight.to(g.dtype)
        if self.kind == 'linear':
            return (w @ g.reshape(g.shape[0], -1)).reshape(w.shape[0], *g.shape[1:])
        m = self.module
        if m is None:
            return F.conv2d(g[None], w)[0]
        return F.conv2d(g[None], w, None, m.stride, m.padding, m.dilation, m.groups)[0]

    def transpose_row(self, k: torch.Tensor, r: torch.Tensor, in_shape: Tuple[int, ...]) -> torch.Tensor:
        """``K[k]^T r``: the adjoint of output channel ``k`` (a 1-element index tensor) applied to ``r``.

        ``r`` has the spatial shape of ``Q[k]``; the result has ``in_shape`` = ``(C, *spatial)``. ``k``
        stays a tensor so that nothing synchronises with the device.
        """
        if not self.direct:
            return self._module_transpose_row(k, r, in_shape)
        w_k = self.weight.index_select(0, k).to(r.dtype)
        if self.kind == 'linear':
            return (w_k.t() @ r.reshape(1, -1)).reshape(in_shape)
        m = self.module
        stride, padding, dilation = (m.stride, m.padding, m.dilation) if m is not None else (1, 0, 1)
        in_per_group = w_k.shape[1]
        part = conv2d_input((1, in_per_group) + tuple(in_shape[1:]), w_k, r[None, None], stride, padding, dilation)[0]
        if self.groups == 1:
            return part
        # Only the input channels of k's own group see output channel k; the rest get zero gradient.
        group = torch.div(k, self.weight.shape[0] // self.groups, rounding_mode='floor')
        channels = group * in_per_group + torch.arange(in_per_group, device=k.device)
        return part.new_zeros(in_shape).index_copy_(0, channels, part)

    def _module_apply(self, g: torch.Tensor) -> torch.Tensor:
        m = self.module
        x = g.to(self.weight.dtype)
        # forward, not __call__: hooks on the next layer (feature extraction, our own) must not fire.
        q = m.forward(x[None])[0] if self.kind == 'conv' else m.forward(x.movedim(0, -1)).movedim(-1, 0)
        if getattr(m, 'bias', None) is not None:
            q = q - m.bias.reshape(-1, *([1] * (q.ndim - 1)))
        return q.to(g.dtype)

    def _module_transpose_row(self, k: torch.Tensor, r: torch.Tensor, in_shape: Tuple[int, ...]) -> torch.Tensor:
        # K is linear, so its vector-Jacobian product is the same at every point: take it at zero.
        with torch.enable_grad():
            z = torch.zeros(in_shape, dtype=r.dtype, device=r.device, requires_grad=True)
            q = self._module_apply(z)
            select = torch.zeros(q.shape[0], dtype=r.dtype, device=r.device).index_fill_(0, k, 1.0)
            grad_q = select.reshape(-1, *([1] * r.ndim)) * r[None]
            (d,) = torch.autograd.grad(q, z, grad_q)
        return d
