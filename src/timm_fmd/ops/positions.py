"""Where a mask distorts a feature map, and how the distorted values are written back.

The reference op (:func:`timm_fmd.ops.distortion.feature_map_distortion`) works on *positions*: the
elements a mask selects. Three representations with one interface (``per_sample``, ``per_channel``,
``per_position``, ``features``, ``normal`` (drawn with ``torch.randn(**draw)``), ``pick`` (the distorted
elements' entries of a full map, in ``normal``'s order), ``batch_sum``, ``combine``, ``fraction``):

* :class:`_DensePositions` -- the mask as a 0/1 weight over the whole map: no host synchronisation,
  so it is the one for accelerators and ``torch.compile``;
* :class:`_SparsePositions` -- coordinates of the distorted elements: draws and writes touch only
  them (CPU);
* :class:`_SharedPositions` -- a channel-shared mask as an ``(n, C)`` grid of coordinates (CPU).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ['positions', 'flat']

def flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor's memory."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class _DensePositions:
    """Distorted positions as a 0/1 weight broadcastable to the map: no synchronisation (GPU, compile).

    Arithmetic on a float weight rather than ``torch.where`` on the bool mask: inductor's CPU code
    generator has no vectorised bool-to-float conversion (torch 2.14), and on a GPU both cost the same.
    """

    def __init__(self, mask: torch.Tensor, xc: torch.Tensor, dtype: torch.dtype):
        self.weight = mask.to(dtype)  # .to(), not a bool view: inductor cannot lower views of bool tensors
        self.map_shape = xc.shape
        self.fraction = self.weight.mean()  # same for a channel-shared mask: every channel shares it
        self.scale = torch.where(self.fraction < 1, 1 / (1 - self.fraction), torch.ones_like(self.fraction))

    def per_sample(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *[1] * (len(self.map_shape) - 1))

    def per_channel(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(1, -1, *[1] * (len(self.map_shape) - 2))

    def per_position(self, d: torch.Tensor) -> torch.Tensor:
        return d[None]

    def features(self, xc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return xc.to(dtype)

    def zeros(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros((), dtype=dtype, device=self.weight.device)

    def normal(self, dtype: torch.dtype, draw: dict) -> torch.Tensor:
        return torch.randn(self.map_shape, dtype=dtype, device=self.weight.device, **draw)

    def pick(self, full: torch.Tensor) -> torch.Tensor:
        return full

    def batch_sum(self, v: torch.Tensor) -> torch.Tensor:
        return (v * self.weight).sum(0)

    def combine(self, xc: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        keep = ((1 - self.weight) * self.scale).to(xc.dtype)
        return xc * keep + (values * self.weight * self.scale).to(xc.dtype)


class _WriteAt(torch.autograd.Function):
    """``out = x * scale`` with ``values`` written at memory offsets ``index``.

    Its derivative is ``scale`` off ``index`` and zero on it: the distortion is a constant for the
    weights' backward pass. Both passes touch the map once plus the distorted elements only.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        out = torch.empty_like(x)  # x is dense, so ``out`` has x's strides and ``index`` addresses both
        torch.mul(x, scale, out=out)
        flat(out)[index] = values
        ctx.save_for_backward(index)
        ctx.scale, ctx.layout = scale, (x.shape, x.stride())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        grad_x = torch.empty_strided(*ctx.layout, dtype=grad.dtype, device=grad.device)
        torch.mul(grad, ctx.scale, out=grad_x)
        flat(grad_x)[index] = 0
        return grad_x, None, None, None


def _flat_index(coords: Sequence[torch.Tensor], sizes: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Row-major index of ``coords`` in an array of ``sizes`` (zeros shaped ``like`` for no coordinates)."""
    index = torch.zeros_like(like)
    for coord, size in zip(coords, sizes):
        index = index * size + coord
    return index


def _memory_offsets(coords: Sequence[torch.Tensor], strides: Sequence[int]) -> torch.Tensor:
    return sum(coord * stride for coord, stride in zip(coords, strides))


class _GatheredPositions:
    """What the CPU representations share: distorted elements gathered at memory ``offsets`` in ``xc``."""

    offsets: torch.Tensor
    device: torch.device

    def _set_fraction(self, fraction: float) -> None:
        self.fraction = fraction
        self.scale = 1.0 / (1.0 - fraction) if fraction < 1.0 else 1.0

    def features(self, xc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return flat(xc)[self.offsets].to(dtype)

    def zeros(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros((), dtype=dtype, device=self.device)


class _SparsePositions(_GatheredPositions):
    """Distorted positions as coordinates: draws and writes touch only the distorted elements (CPU)."""

    def __init__(self, mask: torch.Tensor, xc: torch.Tensor, dtype: torch.dtype):
        self.map_shape, self.device = xc.shape, mask.device
        coords = mask.nonzero().unbind(1)
        self.sample, self.channel = coords[0], coords[1]
        # flat index into one map (C, *spatial): the positions of D and of the batch sum G
        self.position = _flat_index(coords[1:], xc.shape[1:], self.sample)
        self.offsets = _memory_offsets(coords, xc.stride())
        self.count = self.sample.numel()
        self._set_fraction(self.count / xc.numel())

    def per_sample(self, v: torch.Tensor) -> torch.Tensor:
        return v[self.sample]

    def per_channel(self, v: torch.Tensor) -> torch.Tensor:
        return v[self.channel]

    def per_position(self, d: torch.Tensor) -> torch.Tensor:
        return d.reshape(-1)[self.position]

    def normal(self, dtype: torch.dtype, draw: dict) -> torch.Tensor:
        return torch.randn(self.count, dtype=dtype, device=self.device, **draw)

    def pick(self, full: torch.Tensor) -> torch.Tensor:
        return full.reshape(full.shape[0], -1)[self.sample, self.position]

    def batch_sum(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.map_shape[1:].numel(), dtype=v.dtype, device=self.device)
        return out.index_add_(0, self.position, v.expand(self.count)).reshape(self.map_shape[1:])

    def combine(self, xc: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        values = (values * self.scale).to(xc.dtype).expand(self.count)
        return _WriteAt.apply(xc, self.offsets, values, self.scale)


class _SharedPositions(_GatheredPositions):
    """Distorted positions of a channel-shared mask: every channel at ``n`` positions, an ``(n, C)`` grid.

    Per-channel quantities broadcast along the grid instead of being gathered, and the rescaling
    multiplies by the small ``(B, 1, *spatial)`` keep mask, as DropBlock does (CPU).
    """

    def __init__(self, mask: torch.Tensor, xc: torch.Tensor, dtype: torch.dtype):
        self.map_shape, self.device = xc.shape, mask.device
        self.area = xc.shape[2:].numel()
        coords = mask[:, 0].nonzero().unbind(1)  # (sample, *spatial) of each distorted position
        self.sample = coords[0]
        self.position = _flat_index(coords[1:], xc.shape[2:], self.sample)  # flat spatial index
        offsets = _memory_offsets(coords, (xc.stride(0),) + xc.stride()[2:])
        chan = torch.arange(xc.shape[1], device=mask.device)
        self.offsets = offsets[:, None] + chan[None, :] * xc.stride(1)  # (n, C) memory offsets in xc
        self.count = self.offsets.numel()
        self._set_fraction(self.sample.numel() / (mask.numel() or 1))
        self.keep = (~mask).to(xc.dtype) * self.scale

    def per_sample(self, v: torch.Tensor) -> torch.Tensor:
        return v[self.sample][:, None]

    def per_channel(self, v: torch.Tensor) -> torch.Tensor:
        return v[None, :]

    def per_position(self, d: torch.Tensor) -> torch.Tensor:
        return d.reshape(d.shape[0], self.area)[:, self.position].t()

    def normal(self, dtype: torch.dtype, draw: dict) -> torch.Tensor:
        return torch.randn(self.offsets.shape, dtype=dtype, device=self.device, **draw)

    def pick(self, full: torch.Tensor) -> torch.Tensor:
        return full.reshape(*full.shape[:2], self.area)[self.sample, :, self.position]

    def batch_sum(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.map_shape[1], self.area, dtype=v.dtype, device=self.device)
        return out.index_add_(1, self.position, v.expand(self.offsets.shape).t()).reshape(self.map_shape[1:])

    def combine(self, xc: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        out = xc * self.keep  # its backward is grad * keep: zero at distorted positions
        with torch.no_grad():  # the distortion is a constant for the backward pass
            flat(out)[self.offsets] = (values * self.scale).to(xc.dtype).expand(self.offsets.shape)
        return out


def positions(mask: torch.Tensor, xc: torch.Tensor, dtype: torch.dtype):
    # Explicit coordinates need one host read of the mask's nonzero count: free on the CPU, a
    # synchronisation on an accelerator, a graph break under torch.compile. Use the dense mask there.
    if xc.device.type == 'cpu' and not torch.compiler.is_compiling():
        shared = mask.shape[1] == 1 and xc.shape[1] > 1
        return (_SharedPositions if shared else _SparsePositions)(mask, xc, dtype)
    return _DensePositions(mask, xc, dtype)
