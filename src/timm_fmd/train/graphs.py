"""``--cuda-graph``: the training step captured once in a CUDA graph and replayed.

A CIFAR-sized step launches hundreds of small kernels (forward, backward, optimiser, EMA); on a fast GPU
the host's launch time, not the GPU, sets the pace. A CUDA graph records those launches once and replays
them with one call. What that asks of the step, and how the trainer provides it:

* static shapes and addresses: each batch is copied into static buffers that the graph reads (drop_last
  gives every training batch the same shape; another shape is an error);
* no host synchronisation inside (capture fails on one), and nothing that changes from step to step may be
  a host value frozen into the graph: the learning rate and the EMA weight live in device tensors filled
  before every replay (the optimiser runs its fused SGD or capturable Adam/AdamW implementation, which read
  a tensor learning rate; :class:`CapturableEma` reads a tensor weight); the batch's loss and hit counts land
  in a static device tensor that the loop adds to its device-side sums;
* FMD sites only where the op declares itself capture-safe on the device
  (:func:`timm_fmd.ops.capture.capture_safe`; the fused Triton path on CUDA, for sites with ``lam`` 0 and
  ``steps`` 1): its ramped probability and its randomness must live on the device, or replays would freeze
  the ramp at its capture-time value (the ramp itself advances inside ``optimizer.step()``, which is captured);
* warm-up: the first ``warmup_steps`` steps run eagerly on a side stream (cuDNN autotuning, lazily created
  state such as momentum buffers), the next one is captured, and every later step replays it.

The sampler, mixup, the scheduler's per-step learning rate, logging, checkpoints and evaluation run outside
the graph, unchanged, so a run with ``--cuda-graph`` follows the eager run's recipe step for step. Refused
with a clear message: no CUDA device, several processes (DDP), an optimiser other than torch's SGD / Adam /
AdamW (timm's ``sgd``, ``momentum``, ``nesterov``, ``adam``, ``adamw``), and FMD sites the op does not declare
capture-safe on the device.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.nn as nn
from timm.optim import get_optimizer_info
from timm.utils import ModelEmaV3

from ..ops.capture import capture_blocker
from .config import TrainConfig

__all__ = ['check_graph_config', 'optimizer_kwargs', 'CapturableEma', 'CudaGraph', 'GraphedStep', 'capturing']

WARMUP_STEPS = 3
_CAPTURABLE_OPTIMIZERS = {torch.optim.SGD: {'fused': True}, torch.optim.Adam: {'capturable': True},
                          torch.optim.AdamW: {'capturable': True}}
_capturing = False


def capturing() -> bool:
    """True while a :class:`GraphedStep` captures its step: device state must not be filled from host values."""
    return _capturing


def check_graph_config(cfg: TrainConfig, device: torch.device, world_size: int, model: nn.Module) -> None:
    """Raise ``ValueError`` naming the option when ``--cuda-graph`` cannot train ``model`` as configured on
    ``device`` (called when the model is built, before the data is loaded or any file is written)."""
    if device.type != 'cuda':
        raise ValueError(f'--cuda-graph: CUDA graphs need a CUDA device, and this run is on {device} (--device '
                         f'{cfg.device}); drop --cuda-graph to train on {device.type}')
    if world_size > 1:
        raise ValueError(f'--cuda-graph: not with {world_size} processes (DDP\'s gradient all-reduce is not '
                         f'captured here); run one process per GPU without --cuda-graph, or a single process')
    _graph_optimizer(cfg.opt)
    blocker = capture_blocker(device, model)
    if blocker is not None:
        raise ValueError(f'--cuda-graph: {cfg.model} cannot be captured: {blocker} (timm_fmd.ops.capture; replays '
                         f'would freeze its ramped probability or seed); drop --cuda-graph to train it eagerly')


def _graph_optimizer(opt: str) -> type:
    name = opt.lower()
    cls = get_optimizer_info(name.split('_')[-1]).opt_class
    if '_' in name or cls not in _CAPTURABLE_OPTIMIZERS:
        raise ValueError(f'--opt: got {opt!r}, --cuda-graph supports sgd, momentum, nesterov, adam and adamw (torch '
                         f'optimisers that read the learning rate from a device tensor)')
    return cls


def optimizer_kwargs(cfg: TrainConfig) -> Dict[str, Any]:
    """Extra ``create_optimizer_v2`` arguments for ``--cuda-graph``: the implementation that takes a tensor
    learning rate without reading it on the host (fused SGD; capturable Adam / AdamW)."""
    return dict(_CAPTURABLE_OPTIMIZERS[_graph_optimizer(cfg.opt)]) if cfg.cuda_graph else {}


class CapturableEma(ModelEmaV3):
    """timm's ``ModelEmaV3`` (same decay schedule, same ``module``) with the update weight ``1 - decay(step)``
    kept in a device tensor: ``ModelEmaV3`` passes it as a Python float, which a captured graph would keep at
    its capture-time value. ``ema += weight * (model - ema)`` for floating-point entries, copies for the rest.
    """

    def __init__(self, model: nn.Module, **kwargs: Any):
        super().__init__(model, **kwargs)
        device = next(self.module.parameters()).device
        self.weight = torch.zeros((), dtype=torch.float32, device=device)

    def set_step(self, step: Optional[int]) -> None:
        """Put the weight of the update after optimiser step ``step`` into the device tensor."""
        self.weight.fill_(1.0 - self.get_decay(step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        if not capturing():  # under capture the weight is whatever set_step leaves before each replay
            self.set_step(step)
        ema_values, model_values = [], []
        for ema_v, model_v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_v.is_floating_point():
                ema_values.append(ema_v)
                model_values.append(model_v)
            else:
                ema_v.copy_(model_v)
        delta = torch._foreach_sub(model_values, ema_values)
        torch._foreach_mul_(delta, self.weight)
        torch._foreach_add_(ema_values, delta)


class CudaGraph:
    """The CUDA backend of :class:`GraphedStep`: eager steps on a side stream, capture into a ``CUDAGraph``."""

    executes_on_capture = False  # capture records kernels without running them

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def eager(self, fn: Callable[[], None]) -> None:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            fn()
        current.wait_stream(self.stream)

    def capture(self, fn: Callable[[], None]) -> None:
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a loader's pin-memory thread may allocate pinned memory while this thread captures
        with torch.cuda.graph(self.graph, capture_error_mode='thread_local'):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class GraphedStep:
    """``step_fn(x, target, y, global_step) -> sums`` (one optimiser step; ``sums`` a device tensor) run through a
    graph backend: ``warmup_steps`` eager calls, one capture, then replays of the captured step.

    Args:
        step_fn: the eager training step; it must read its inputs only from the three tensors it is given.
        optimizer: its learning rates are copied into device tensors before every step, and the captured
            step reads those (see the module docstring).
        ema: a :class:`CapturableEma` updated inside the step, or ``None``.
        backend: :class:`CudaGraph` by default; an object with ``eager(fn)``, ``capture(fn)``, ``replay()`` and
            ``executes_on_capture``.
    """

    def __init__(self, step_fn: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer,
                 ema: Optional[CapturableEma] = None, backend: Any = None, device: Optional[torch.device] = None,
                 warmup_steps: int = WARMUP_STEPS):
        if ema is not None and not isinstance(ema, CapturableEma):
            raise TypeError(f'ema must be a CapturableEma (a tensor-weight EMA), got {type(ema).__name__}')
        for group in optimizer.param_groups:
            if not (group.get('fused') or group.get('capturable')):
                raise ValueError(f'{type(optimizer).__name__} must be created with fused=True (SGD) or '
                                 f'capturable=True (Adam, AdamW) to read its learning rate from a device tensor')
        if warmup_steps < 1:
            raise ValueError(f'warmup_steps must be >= 1 (lazy optimiser state is created eagerly), got {warmup_steps}')
        self.step_fn, self.optimizer, self.ema, self.warmup_steps = step_fn, optimizer, ema, warmup_steps
        device = device or next(p for g in optimizer.param_groups for p in g['params']).device
        self.backend = backend if backend is not None else CudaGraph(device)
        self.lr = [torch.tensor(float(g['lr']), dtype=torch.float32, device=device) for g in optimizer.param_groups]
        self.static: Optional[List[torch.Tensor]] = None
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.calls, self.captured, self._step = 0, False, 0

    def __call__(self, x: torch.Tensor, target: torch.Tensor, y: torch.Tensor, global_step: int) -> torch.Tensor:
        """Train on one batch as optimiser step ``global_step``; returns the static ``sums`` tensor of this
        batch (loss * n, top-1 and top-5 hits), valid until the next call."""
        inputs = (x, target, y)
        if self.static is None:
            self.static = [torch.empty_like(t) for t in inputs]  # keeps strides (channels_last)
        for name, buf, t in zip(('x', 'target', 'y'), self.static, inputs):
            if (buf.shape, buf.dtype, buf.stride()) != (t.shape, t.dtype, t.stride()):
                raise ValueError(f'--cuda-graph: batch {name} of shape {tuple(t.shape)} {t.dtype} differs from the '
                                 f'captured {tuple(buf.shape)} {buf.dtype}: the graph needs one batch shape')
            buf.copy_(t)
        self._step = global_step
        for value, group in zip(self.lr, self.optimizer.param_groups):
            value.fill_(group['lr'])  # the scheduler's float for this step
        if self.ema is not None:
            self.ema.set_step(global_step)
        if self.calls < self.warmup_steps:
            self.backend.eager(self._body)
        elif not self.captured:
            self._capture()
            if not self.backend.executes_on_capture:
                self.backend.replay()
        else:
            self.backend.replay()
        self.calls += 1
        return self.sums

    def _body(self) -> None:
        self.sums.copy_(self.step_fn(*self.static, self._step))

    def _capture(self) -> None:
        global _capturing
        with self._tensor_lr():
            _capturing = True
            try:
                self.backend.capture(self._body)
            finally:
                _capturing = False
        self.captured = True

    @contextlib.contextmanager
    def _tensor_lr(self) -> Iterator[None]:
        """The optimiser's groups read ``self.lr`` while the step is captured; the scheduler's floats after."""
        groups = self.optimizer.param_groups
        floats = [g['lr'] for g in groups]
        for group, value in zip(groups, self.lr):
            group['lr'] = value
        try:
            yield
        finally:
            for group, value in zip(groups, floats):
                group['lr'] = value

