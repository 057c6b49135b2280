"""Whether the op may be captured in a CUDA graph on a device: the capability a trainer asks before capturing.

A CUDA graph replays the kernels recorded at capture with the arguments they had then. An op that reads its
ramped probability as a Python float, solves its block seed rate on the host, or synchronises with the host
(``.item()``, ``nonzero``) is frozen or broken under replay: the ramp would stay where it was at capture. The
op is capture-safe on a device type when its training forward and backward there read the probability from
the module's device tensor ``prob_now``, draw their randomness on the device from torch's generator and never
synchronise with the host. The code path with those properties declares it with :func:`declare_capture_safe`
(the fused Triton path does, for CUDA, when Triton is importable), saying which sites it covers; nothing else
is assumed, so an undeclared device, or a site the declared path does not cover, is not capture-safe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn as nn

__all__ = ['capture_safe', 'capture_blocker', 'declare_capture_safe']


@dataclass(frozen=True)
class _Declaration:
    covers: Callable[[nn.Module], bool]
    requires: str


_DECLARED: Dict[str, _Declaration] = {}


def declare_capture_safe(device_type: str, covers: Callable[[nn.Module], bool] = lambda op: True,
                         requires: str = 'any site') -> None:
    """Declare the op's training forward and backward on ``device_type`` (e.g. ``'cuda'``) capture-safe for the
    FMD modules ``covers(op)`` accepts; ``requires`` says which those are, for error messages."""
    if not isinstance(device_type, str) or not device_type:
        raise TypeError(f'device_type must be a device type name such as "cuda", got {device_type!r}')
    _DECLARED[torch.device(device_type).type] = _Declaration(covers, requires)


def capture_blocker(device: Union[str, torch.device], model: Optional[nn.Module] = None) -> Optional[str]:
    """Why FMD training on ``device`` cannot be captured (of ``model``'s FMD sites, or of the op in general when
    ``model`` is ``None``); ``None`` when it can. A model without FMD sites never is blocked."""
    from .distortion import FeatureMapDistortion  # here: distortion imports the fused path, which declares
    device = torch.device(device)
    sites = None if model is None else [(name, m) for name, m in model.named_modules()
                                        if isinstance(m, FeatureMapDistortion)]
    if sites == []:
        return None
    declared = _DECLARED.get(device.type)
    if declared is None:
        return f'no capture-safe path of the FMD op is available on {device.type} here'
    outside = [name for name, op in sites or () if not declared.covers(op)]
    if outside:
        return (f'{len(outside)} FMD site(s) outside the capture-safe path, which needs {declared.requires}: '
                f'{", ".join(outside[:3])}{", ..." if len(outside) > 3 else ""}')
    return None


def capture_safe(device: Union[str, torch.device], model: Optional[nn.Module] = None) -> bool:
    """True when FMD modules training on ``device`` (all of ``model``'s, if given) may run inside a captured CUDA
    graph; see :func:`capture_blocker` for the reason when not."""
    return capture_blocker(device, model) is None
