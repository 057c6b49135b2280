"""Linear ramp of the distortion probability, counted in optimiser steps.

The paper (Experiments) raises the distortion probability linearly from 0 to the target ``p``,
following DropBlock (Ghiasi et al., 2018): ``p_t = p * min(1, t / ramp_steps)`` after ``t`` training
steps.

**The rule.** A model's ramp advances by one when ``optimizer.step()`` runs on an optimiser holding any
of the model's parameters (once per training iteration when several optimisers each step a part of
it), however the forward was run; :func:`set_schedule_step` puts it at step ``n`` (resume). Forwards
never change the ramp, so compiled forwards, forwards recomputed by activation checkpointing, the
micro-batches of gradient accumulation and the forwards of an EMA copy all see the probability of the
current step. A step that ``GradScaler`` skips (inf/NaN gradients) never calls ``optimizer.step()`` and
is not counted.

**State.** Each op (duck-typed here: a module with a :class:`LinearRamp` ``ramp``, the buffers below
and a ``current_prob`` property) holds two 0-dim non-persistent buffers -- no ``state_dict`` key, so an
FMD checkpoint still loads into the plain timm architecture with ``strict=True``, and ``.to()`` moves
them with the model:

* ``ramp_count`` (int64): the steps counted. An integer buffer, so ``model.half()`` and
  ``model.to(torch.bfloat16)`` leave it exact;
* ``prob_now`` (float32): ``p * min(1, ramp_count / ramp_steps)``, the probability of the next training
  forward (the op keeps it float32 under dtype conversions).

**Counting.** One global step post hook (``torch.optim.optimizer.register_optimizer_step_post_hook``,
installed at import) advances the ramps of every counted model whose parameters the stepping optimiser
holds -- frozen parameters do not matter, any one held is enough -- with four ``torch._foreach_*`` ops
over all of the model's ops: no host synchronisation, no per-op launches, and recorded into a CUDA
graph that captures the optimiser step, so every replay advances the ramp. Counted models are those
built by :func:`timm_fmd.apply_fmd` (every ``fmd_<arch>``) and those passed to
:func:`set_schedule_step` (a model assembled from the ops by hand). A deep copy or an unpickled counted
model counts its own optimisers' steps from its first eager training forward. Ops without a ramp
(``ramp_steps == 0``) are never touched.

``step_schedule(model, n)`` is for loops without a torch optimiser: it switches the model's ops to
manual driving for good (the hook leaves them alone, so no step is counted twice) and advances them.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ['LinearRamp', 'step_schedule', 'set_schedule_step', 'schedule_step', 'current_prob', 'count_steps',
           'refresh_probs']


@dataclass
class LinearRamp:
    """``target * min(1, count / steps)``; ``steps == 0`` means no ramp (the target at once).

    The count itself lives on the device, in the op's ``ramp_count`` buffer. ``driver`` says what advances
    it: ``None`` (nothing yet), ``'optimizer'`` (the step hook) or ``'manual'`` (:func:`step_schedule`).
    """

    target: float
    steps: int = 0
    driver: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f'ramp_steps must be an int >= 0, got {self.steps!r}')

    def value(self, count: int) -> float:
        """The probability after ``count`` steps."""
        if self.steps == 0 or count >= self.steps:
            return self.target
        return self.target * count / self.steps


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f'{name} must be an int >= 0, got {value!r}')
    return value


def _ramp_ops(model: nn.Module, ramped_only: bool = True) -> List[nn.Module]:
    # Duck-typed on purpose: this module sits below the op and must not import it.
    return [m for m in model.modules()
            if isinstance(getattr(m, 'ramp', None), LinearRamp) and (m.ramp.steps or not ramped_only)]


@torch.no_grad()
def refresh_probs(ops: Sequence[nn.Module]) -> None:
    """Write ``target * min(1, ramp_count / steps)`` into the ``prob_now`` of each op (all with ``steps > 0``).

    Three multi-tensor device ops for all ``ops`` together: no host synchronisation.
    """
    probs = [op.prob_now for op in ops]
    torch._foreach_copy_(probs, [op.ramp_count for op in ops])
    torch._foreach_mul_(probs, [op.ramp.target / op.ramp.steps for op in ops])
    torch._foreach_clamp_max_(probs, [op.ramp.target for op in ops])


@torch.no_grad()
def _advance(ops: Sequence[nn.Module], n: int) -> None:
    torch._foreach_add_([op.ramp_count for op in ops], n)
    refresh_probs(ops)


def step_schedule(model: nn.Module, n: int = 1) -> None:
    """Advance the ramp of every FMD op in ``model`` by ``n`` steps by hand (loops without a torch optimiser).

    The ops are driven by hand from then on: the optimiser hook no longer counts them, so a step is never
    counted twice. Raises ``ValueError`` for an ``n`` that is not an int >= 0.
    """
    n = _check_count(n, 'n')
    ops = _ramp_ops(model)
    for op in ops:
        op.ramp.driver = 'manual'
    if ops:
        _advance(ops, n)


def set_schedule_step(model: nn.Module, step: int) -> None:
    """Put every ramp in ``model`` at step ``step`` (resume); ``step`` is an int >= 0 (else ``ValueError``).

    From then on ``model``'s optimiser steps are counted (for a model assembled from the ops by hand this
    call is what starts the counting); ops driven by :func:`step_schedule` stay driven by hand.
    """
    step = _check_count(step, 'step')
    ops = _ramp_ops(model)
    if not ops:
        return
    with torch.no_grad():
        counts = [op.ramp_count for op in ops]
        torch._foreach_zero_(counts)
        torch._foreach_add_(counts, step)
    refresh_probs(ops)
    if _counter_key(model) is not None or any(op.ramp.driver is None for op in ops):
        count_steps(model)  # a counted model, its copy, or a model assembled by hand


def schedule_step(model: nn.Module) -> Optional[int]:
    """The steps counted by the first op with a ramp in ``model``, or ``None`` when none has a ramp.

    Reads a device tensor (may synchronise): for reporting, not for the training step.
    """
    ops = _ramp_ops(model)
    return int(ops[0].ramp_count) if ops else None


def current_prob(model: nn.Module) -> Optional[float]:
    """The largest probability of the next training forward over the FMD ops of ``model``, or ``None``.

    Reads device tensors (may synchronise): for reporting.
    """
    values = [m.current_prob for m in _ramp_ops(model, ramped_only=False)]
    return max(values) if values else None


# ---------------------------------------------------------------------------------- step counting
class _StepCounter:
    """The ops with a ramp of one counted model; also the model's forward pre-hook.

    Installed on the model, so a deep copy or an unpickled model carries its own counter listing its own
    ops, and this hook starts counting the copy at its first eager training forward.
    """

    def __init__(self) -> None:
        self.ops: List[nn.Module] = []

    def __call__(self, model: nn.Module, args: Any) -> None:
        if not torch.compiler.is_compiling() and model.training and model not in _COUNTED:
            _COUNTED[model] = self


class _Holdings:
    """Which counted models one optimiser holds parameters of, valid while its param groups are unchanged."""

    def __init__(self, key: tuple, optimizer: torch.optim.Optimizer) -> None:
        self.key = key
        self.ids = {id(p) for group in optimizer.param_groups for p in group['params']}
        self.models: 'weakref.WeakKeyDictionary[nn.Module, bool]' = weakref.WeakKeyDictionary()

    def holds(self, model: nn.Module) -> bool:
        held = self.models.get(model)
        if held is None:
            held = self.models[model] = any(id(p) in self.ids for p in model.parameters())
        return held


_COUNTED: 'weakref.WeakKeyDictionary[nn.Module, _StepCounter]' = weakref.WeakKeyDictionary()
_HOLDINGS: 'weakref.WeakKeyDictionary[torch.optim.Optimizer, _Holdings]' = weakref.WeakKeyDictionary()
_STEPPED: 'weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet]' = weakref.WeakKeyDictionary()


def count_steps(model: nn.Module) -> None:
    """Count the optimiser steps of ``model`` in the ramps of its FMD ops (see the module docstring).

    Idempotent. Call it again after adding or removing FMD ops: it lists them anew (a model left without
    ops with a ramp is no longer counted). Ops driven by :func:`step_schedule` stay driven by hand.
    """
    ops = _ramp_ops(model)
    hooks = model._forward_pre_hooks
    key = _counter_key(model)
    if not ops:
        if key is not None:
            del hooks[key]
        _COUNTED.pop(model, None)
        return
    if key is None:
        counter = _StepCounter()
        model.register_forward_pre_hook(counter)
    else:
        counter = hooks[key]
    for op in ops:
        if op.ramp.driver is None:
            op.ramp.driver = 'optimizer'
    counter.ops = ops
    _COUNTED[model] = counter


def _counter_key(model: nn.Module) -> Optional[int]:
    return next((k for k, h in model._forward_pre_hooks.items() if isinstance(h, _StepCounter)), None)


def _holdings(optimizer: torch.optim.Optimizer) -> _Holdings:
    key = tuple((id(group['params']), len(group['params'])) for group in optimizer.param_groups)
    holdings = _HOLDINGS.get(optimizer)
    if holdings is None or holdings.key != key:  # new, or its param groups changed (add_param_group, ...)
        holdings = _HOLDINGS[optimizer] = _Holdings(key, optimizer)
    return holdings


def _starts_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether this step of ``optimizer`` begins a new training step of ``model``.

    Several optimisers may each step a part of one model in the same iteration (Muon for the matrices and
    AdamW for the rest), or one inside another (timm's Lookahead around its base optimiser,
    ZeroRedundancyOptimizer around its local one): a model's step ends when an optimiser that already
    stepped it steps again, so each iteration counts once. The first step of a new optimiser while the
    previous one is still alive joins the previous step (one step behind per switch).
    """
    stepped = _STEPPED.get(model)
    if stepped is None:
        stepped = _STEPPED[model] = weakref.WeakSet()
    new = not stepped or optimizer in stepped
    if new:
        stepped.clear()
    stepped.add(optimizer)
    return new


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """The global step post hook: advance the ramps of the counted models ``optimizer`` holds."""
    if not _COUNTED:
        return
    holdings = _holdings(optimizer)
    advanced = set()  # an op listed by two counted models (a model and its counted submodule) moves once
    for model, counter in list(_COUNTED.items()):
        if counter.ops and holdings.holds(model) and _starts_step(model, optimizer):
            ops = [op for op in counter.ops if op.ramp.driver == 'optimizer' and id(op) not in advanced]
            advanced.update(id(op) for op in ops)
            if ops:
                _advance(ops, 1)


register_optimizer_step_post_hook(_count_optimizer_step)
