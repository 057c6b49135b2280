"""Whether the op may be captured in a CUDA graph on a device: the capability a trainer asks before capturing.

A CUDA graph replays the kernels recorded at capture with the arguments they had then. An op that reads its
ramped probability as a Python float, solves its block seed rate on the host, or synchronises with the host
(``.item()``, ``nonzero``) is frozen or broken under replay: the ramp would stay where it was at capture. The
op is capture-safe on a device type when its training forward and backward there read the probability from
the module's device tensor ``prob_now``, draw their randomness on the device from torch's generator and never
synchronise with the host (issue 10's graph-safe path). The code path that has those properties declares it
with :func:`declare_capture_safe`; nothing else does, so an undeclared device answers ``False``.
"""
from __future__ import annotations

from typing import Set, Union

import torch

__all__ = ['capture_safe', 'declare_capture_safe']

_CAPTURE_SAFE: Set[str] = set()


def declare_capture_safe(device_type: str) -> None:
    """Declare the op's training forward and backward on ``device_type`` (e.g. ``'cuda'``) capture-safe."""
    if not isinstance(device_type, str) or not device_type:
        raise TypeError(f'device_type must be a device type name such as "cuda", got {device_type!r}')
    _CAPTURE_SAFE.add(torch.device(device_type).type)


def capture_safe(device: Union[str, torch.device]) -> bool:
    """True when FMD modules training on ``device`` may run inside a captured CUDA graph (see the module doc)."""
    return torch.device(device).type in _CAPTURE_SAFE
