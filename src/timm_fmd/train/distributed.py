"""torchrun / DDP set-up and the few collectives the trainer needs.

``torchrun --nproc_per_node N -m timm_fmd train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`setup` reads them, gives each rank its own GPU (``cuda:LOCAL_RANK``) and starts
NCCL on GPUs or gloo on CPUs. Under torchrun that is so with one process too (``--nproc_per_node 1``
runs the same process group, DDP wrapper and collectives as eight do, so a one-GPU torchrun tests
the multi-GPU path). Without torchrun it is a single process and every helper here is a cheap identity.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ['DistEnv', 'resolve_device', 'setup', 'to_device', 'wrap_ddp', 'cleanup', 'unwrap', 'all_reduce_sum',
           'all_gather_objects', 'broadcast_object', 'assert_in_sync']


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device  # indexed on CUDA (cuda:N)
    torchrun: bool = False  # launched by torchrun: a process group even for one process

    @property
    def distributed(self) -> bool:
        """Whether a process group is used (DDP, collectives): several ranks, or any torchrun launch."""
        return self.world_size > 1 or self.torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: Optional[int] = None, world_size: int = 1) -> torch.device:
    """The device of ``--device name`` for this process, with an index for CUDA (``cuda:N``).

    ``auto`` is CUDA when available, else the CPU. An index-less ``cuda`` becomes ``cuda:LOCAL_RANK``
    under torchrun (``local_rank`` given), else the current CUDA device (``cuda:0`` unless the process
    changed it); an explicit ``cuda:N`` is kept. CUDA calls such as ``torch.cuda.set_device``,
    ``init_process_group(device_id=)`` and ``get_rng_state(device)`` need the index.

    Raises ``ValueError`` naming ``--device`` for an unknown device string, CUDA without a CUDA device,
    an index beyond ``torch.cuda.device_count()``, and one explicit ``cuda:N`` shared by several ranks.
    """
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f'--device: {name!r} is not a device; use auto, cpu, cuda or cuda:N') from None
    if device.type == 'cpu':
        return torch.device('cpu')
    if device.type != 'cuda':
        raise ValueError(f'--device {name}: the trainer runs on auto, cpu, cuda or cuda:N, not {device.type}')
    if not torch.cuda.is_available():
        raise ValueError(f'--device {name}: CUDA is not available on this machine (use --device cpu)')
    count = torch.cuda.device_count()
    if device.index is not None:
        if world_size > 1:
            raise ValueError(f'--device {name}: all {world_size} torchrun processes would share that one GPU; '
                             f'pass --device cuda (each process takes cuda:LOCAL_RANK)')
        index, source = device.index, f'--device {name}'
    elif local_rank is not None:
        index, source = local_rank, f'--device {name} under torchrun (LOCAL_RANK={local_rank})'
    else:
        index, source = torch.cuda.current_device(), f'--device {name}'
    if not 0 <= index < count:
        raise ValueError(f'{source}: cuda:{index} does not exist, this machine has {count} CUDA device(s) '
                         f'(cuda:0 to cuda:{count - 1}; CUDA_VISIBLE_DEVICES may hide some)')
    return torch.device('cuda', index)


def setup(device: str = 'auto') -> DistEnv:
    """Join the process group started by torchrun (if any), pick this rank's device and make it current.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; the device follows :func:`resolve_device`. NCCL
    on CUDA gets the indexed device as ``device_id`` (an eagerly bound communicator); gloo on the CPU.
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    torchrun_rank = os.environ.get('LOCAL_RANK')
    local_rank = int(torchrun_rank) if torchrun_rank is not None else None
    resolved = resolve_device(device, local_rank, world_size)
    if resolved.type == 'cuda':
        torch.cuda.set_device(resolved)
    env = DistEnv(rank, world_size, local_rank or 0, resolved, torchrun=local_rank is not None)
    if env.distributed and not dist.is_initialized():
        cuda = env.device.type == 'cuda'
        dist.init_process_group('nccl' if cuda else 'gloo', device_id=env.device if cuda else None)
    return env


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def to_device(device: torch.device, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """``tensors`` on ``device``: asynchronous copies only from pinned memory (``--pin-mem`` on CUDA),
    where the copy cannot race the host; from pageable memory the copy is an ordinary blocking one."""
    return tuple(t.to(device, non_blocking=t.is_pinned()) for t in tensors)


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when the run has a process group, else ``model`` itself.

    On CUDA DDP gets this rank's device index as ``device_ids`` and ``output_device`` (an index-less
    device is refused there); on the CPU neither, as DDP requires.
    """
    if not env.distributed:
        return model
    if env.device.type == 'cuda':
        return DistributedDataParallel(model, device_ids=[env.device.index], output_device=env.device.index)
    return DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(torch, '_dynamo') and isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum ``tensor`` over ranks (in place, also returned)."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any, env: DistEnv) -> List[Any]:
    """Every rank's ``obj``, indexed by rank (picklable objects; rank-local RNG and meter states)."""
    if not env.distributed:
        return [obj]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def assert_in_sync(model: nn.Module, env: DistEnv) -> None:
    """Raise ``RuntimeError`` unless every rank holds bitwise-equal parameters.

    Compares a float64 fingerprint (sum and sum of squares of each parameter): DDP ranks apply
    identical updates, so any difference means a rank drifted (e.g. rank-local state in a layer).
    """
    if not env.distributed:
        return
    params = [p.detach().double() for p in unwrap(model).parameters()]
    local = torch.stack([torch.stack([p.sum(), p.square().sum()]) for p in params]).to(env.device)
    gathered = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(gathered, local)
    for rank, other in enumerate(gathered[1:], start=1):
        if not torch.equal(other, gathered[0]):
            raise RuntimeError(f'parameters of rank {rank} differ from rank 0 (max fingerprint difference '
                               f'{(other - gathered[0]).abs().max().item():.3g}): the DDP replicas drifted apart')
