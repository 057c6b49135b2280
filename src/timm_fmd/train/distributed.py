"""torchrun / DDP set-up and the few collectives the trainer needs.

``torchrun --nproc_per_node N -m timm_fmd train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`setup` reads them and starts NCCL on GPUs or gloo on CPUs. Without them it
is a single process and every helper here is a cheap identity.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ['DistEnv', 'setup', 'cleanup', 'unwrap', 'all_reduce_sum', 'all_gather_objects', 'broadcast_object',
           'assert_in_sync']


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device(name: str, local_rank: int, distributed: bool) -> torch.device:
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(name)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f'--device {name}: CUDA is not available on this machine')
        if distributed:  # one GPU per rank
            device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    return device


def setup(device: str = 'auto') -> DistEnv:
    """Join the process group started by torchrun (if any) and pick this rank's device."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank, local_rank = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    env = DistEnv(rank, world_size, local_rank, _device(device, local_rank, world_size > 1))
    if env.distributed and not dist.is_initialized():
        backend = 'nccl' if env.device.type == 'cuda' else 'gloo'
        dist.init_process_group(backend, device_id=env.device if backend == 'nccl' else None)
    return env


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


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
