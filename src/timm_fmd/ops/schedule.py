"""Linear ramp of the distortion probability.

The paper (Experiments) raises the distortion probability linearly from 0 to the target ``p``,
following DropBlock (Ghiasi et al., 2018). The ramp state is a plain Python counter, not a
tensor: reading it never synchronises with a device, and it adds no ``state_dict`` key, so an
FMD checkpoint still loads into the plain timm architecture with ``strict=True``. A trainer
resumes the ramp by calling :func:`set_schedule_step` with its saved global step.

Two ways to drive the ramp:

* **explicitly** — a trainer calls :func:`step_schedule` once per optimiser step (or
  :func:`set_schedule_step`). The first explicit call switches the module to *driven* mode.
* **by itself** — until somebody drives it, each training-mode forward of a module advances its
  own ramp by one. This is what makes ``--model fmd_resnet50`` work inside timm's ``train.py``,
  which knows nothing about FMD. Under ``torch.compile`` drive it explicitly: a compiled forward
  reads the op's probability from a device tensor that the functions below update in place (no
  recompilation as the ramp rises), and does not advance the Python counter itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch.nn as nn

__all__ = ['LinearRamp', 'step_schedule', 'set_schedule_step', 'schedule_step', 'current_prob']


@dataclass
class LinearRamp:
    """``value = target * min(1, count / steps)``; ``steps == 0`` means no ramp (the target at once)."""

    target: float
    steps: int = 0
    count: int = 0
    driven: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f'ramp_steps must be an int >= 0, got {self.steps!r}')

    @property
    def value(self) -> float:
        if self.steps == 0 or self.count >= self.steps:
            return self.target
        return self.target * self.count / self.steps

    def advance(self, n: int = 1) -> None:
        self.count += n

    def set(self, count: int) -> None:
        if count < 0:
            raise ValueError(f'step must be >= 0, got {count}')
        self.count = count


def _ramp_modules(model: nn.Module) -> Iterator[nn.Module]:
    # Duck-typed on purpose: this module sits below the op and must not import it.
    for m in model.modules():
        if isinstance(getattr(m, 'ramp', None), LinearRamp):
            yield m


def _drive(model: nn.Module, move) -> None:
    for m in _ramp_modules(model):
        m.ramp.driven = True
        move(m.ramp)
        sync = getattr(m, 'sync_ramp', None)  # the op mirrors its probability into a device tensor
        if sync is not None:
            sync()


def step_schedule(model: nn.Module, n: int = 1) -> None:
    """Advance the probability ramp of every FMD module in ``model`` by ``n`` optimiser steps."""
    _drive(model, lambda ramp: ramp.advance(n))


def set_schedule_step(model: nn.Module, step: int) -> None:
    """Put every ramp in ``model`` at global step ``step`` (used when resuming a run)."""
    _drive(model, lambda ramp: ramp.set(step))


def schedule_step(model: nn.Module) -> Optional[int]:
    """The ramp position of the first FMD module in ``model``, or ``None`` when it has none."""
    return next((m.ramp.count for m in _ramp_modules(model)), None)


def current_prob(model: nn.Module) -> Optional[float]:
    """The largest current (ramped) probability over the FMD modules of ``model``, or ``None``."""
    values = [m.ramp.value for m in _ramp_modules(model)]
    return max(values) if values else None
