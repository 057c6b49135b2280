"""A CPU stand-in for a CUDA graph, for testing captured training steps without a GPU.

A CUDA graph records the kernels one call launches and replays them: with the arguments they had at capture
(Python numbers are frozen), reading and writing the same memory (tensors that outlive the call, such as
parameters, optimiser state and static buffers, are updated in place; intermediates are recomputed), and no
host synchronisation is allowed while capturing. :class:`RecordedGraph` does the same one level up: it records
every aten op that the captured function dispatches (forward, autograd's backward, the optimiser, the EMA) and
replays that list, frozen scalars and all, substituting each op's fresh outputs for the ones recorded. An op
that reads a device value on the host (``.item()``, ``nonzero``, ...) fails the capture, as on a GPU.

It has the interface of ``timm_fmd.train.graphs.CudaGraph``; unlike a CUDA capture, its capture also runs
the step once (``executes_on_capture``).
"""
from typing import Any, Callable, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

HOST_SYNCS = {'aten._local_scalar_dense.default', 'aten.item.default', 'aten.is_nonzero.default',
              'aten.equal.default', 'aten.nonzero.default', 'aten.masked_select.default', 'aten._unique2.default',
              'aten.unique_consecutive.default', 'aten.repeat_interleave.Tensor'}


class HostSyncInCapture(RuntimeError):
    pass


class _Record(TorchDispatchMode):
    def __init__(self, ops: List[Tuple[Any, tuple, dict, Any]]):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if str(func) in HOST_SYNCS:
            raise HostSyncInCapture(f'{func} reads a device value on the host inside the captured step')
        out = func(*args, **kwargs)
        if func.namespace != 'profiler':  # record_function markers: no computation
            self.ops.append((func, args, kwargs, out))
        return out


class RecordedGraph:
    """``eager(fn)`` runs ``fn``; ``capture(fn)`` runs and records it; ``replay()`` re-runs the recorded ops."""

    executes_on_capture = True

    def __init__(self, device: Any = None):
        self.ops: List[Tuple[Any, tuple, dict, Any]] = []
        self.replays = 0

    def eager(self, fn: Callable[[], None]) -> None:
        fn()

    def capture(self, fn: Callable[[], None]) -> None:
        self.ops = []
        with _Record(self.ops):
            fn()

    @torch.no_grad()
    def replay(self) -> None:
        fresh = {}  # id of a recorded output -> this replay's tensor

        def sub(value):
            return fresh.get(id(value), value) if isinstance(value, torch.Tensor) else value

        for func, args, kwargs, out in self.ops:
            new = func(*tree_map(sub, args), **tree_map(sub, kwargs))
            for old, now in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
                if isinstance(old, torch.Tensor):
                    fresh[id(old)] = now
        self.replays += 1
