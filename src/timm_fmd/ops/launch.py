"""Launching a Triton kernel with the arguments a shape fixes bound once (host time of an eager call).

``kernel[grid](*args, **kwargs)`` makes Triton bind and specialise every argument on every call (its generated
binder, then a cache-key string): 14-19 us per launch of the fused op's kernels on the development CPU, three launches
per op call, about a third of the op's host time (``benchmarks/bench_host.py``). A :class:`Launch` holds what a
map's shape fixes -- the grid, the trailing arguments (sizes, strides, tiles) and the constexpr keywords -- and is
called with the leading ones (tensors, per-call floats). The first call with a given *key* goes through Triton
(``JITFunction.run``: bind, specialise, find or compile the kernel, launch), which returns the
:class:`triton.compiler.CompiledKernel` it launched; later calls with the same key call that kernel's launcher
directly, ``compiled[grid](*values)``, with the values ``JITFunction.run`` gives the same launcher: every positional
argument, then the kernel's remaining parameters in signature order (Triton 3.6 and 3.8 alike).

The key covers what Triton's binder specialises the leading arguments on: each tensor's dtype and whether its address
is a multiple of 16, and the type of every other argument (floats are never specialised; an int's value would be, so
the key holds it). The fixed arguments and keywords are the Launch's own; Triton specialises its ints (1 becomes a
constant, multiples of 16 are marked) once for good. ``tests/ops/fused/test_launch.py`` checks both against Triton's
own binder. What the direct call skips, all of it fixed for this package's kernels: Triton's pre-run hooks (none
registered), its check that the globals a kernel read are unchanged (module constants), its re-reading of
``TRITON_DEBUG``, of the instrumentation knob and (3.8) of the stage-inspection hook at every launch, and its kernel
cache (a Launch keeps the kernel of its first launch). Where a launch returns no compiled kernel (Triton's
interpreter, ``TRITON_INTERPRET=1``; a test's stand-in kernel) every call goes through ``kernel[grid]``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch

__all__ = ['Launch', 'leading_key']

ALIGNMENT = 16  # bytes: Triton's divisibility specialisation of pointers


def leading_key(args: Sequence[Any]) -> tuple:
    """What decides the compiled kernel among launches that differ only in these leading arguments: each tensor's
    dtype and 16-byte alignment, each int's value (Triton would specialise it), every other argument's type (floats,
    bools and ``None`` are specialised on their type only)."""
    return tuple([(arg.dtype, arg.data_ptr() % ALIGNMENT == 0) if isinstance(arg, torch.Tensor)
                  else (int, arg) if type(arg) is int else type(arg) for arg in args])  # a list: faster than a genexpr


class Launch:
    """One launch configuration of a ``@triton.jit`` kernel: ``grid``, the trailing positional arguments ``fixed``
    and the keywords (constexprs by name, options such as ``num_warps``) bound once.

    ``launch(kernel, *leading)`` runs ``kernel[grid](*leading, *fixed, **kwargs)``; after its first call for a key
    (:func:`leading_key`), without Triton's binder (see the module docstring). The kernel is passed at each call, so
    that a test may stand in for it; a launcher made for one kernel object is never used for another.
    """

    def __init__(self, grid: Sequence[int], fixed: Sequence[Any], kwargs: Dict[str, Any]):
        self.grid = tuple(grid)
        self.fixed = tuple(fixed)
        self.kwargs = dict(kwargs)
        self._kernel: Any = None
        self._direct: Dict[tuple, Callable[..., None]] = {}

    def __call__(self, kernel: Any, *leading: Any) -> None:
        if kernel is not self._kernel:
            self._kernel, self._direct = kernel, {}
        key = leading_key(leading)
        run = self._direct.get(key)
        if run is not None:
            run(*leading)
            return
        compiled = kernel[self.grid](*leading, *self.fixed, **self.kwargs)
        run = self._launcher(kernel, compiled, len(leading))
        if run is not None:
            self._direct[key] = run

    def _launcher(self, kernel: Any, compiled: Any, n_leading: int) -> Optional[Callable[..., None]]:
        """``compiled``'s launcher taking the leading arguments (the rest bound), or ``None`` when the launch returned
        no compiled kernel."""
        try:
            from triton.compiler import CompiledKernel
        except ImportError:  # pragma: no cover - kernels need triton
            return None
        if not isinstance(compiled, CompiledKernel):
            return None
        run = compiled[self.grid + (1,) * (3 - len(self.grid))]  # unlike kernel[grid], it reads three entries
        n_positional = n_leading + len(self.fixed)
        rest = kernel.params[n_positional:]  # constexprs by name (a default where one is not given, as Triton binds)
        tail = self.fixed + tuple(self.kwargs.get(param.name, param.default) for param in rest)
        return lambda *leading: run(*leading, *tail)

    def __repr__(self) -> str:
        return f'Launch(grid={self.grid}, fixed={self.fixed}, kwargs={self.kwargs})'
