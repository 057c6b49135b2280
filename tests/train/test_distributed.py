"""Process set-up and DDP: device resolution against a faked ``torch.cuda`` (single process, torchrun with
one and two ranks), and with gloo on CPU two processes against one (a few steps of a BatchNorm-free model)."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import timm_fmd.train.distributed as D
# `setup` is called through the module: a test module's own `setup` function is nose-style module set-up to pytest 8.0
from timm_fmd.train.distributed import (DistEnv, all_gather_objects, all_reduce_sum, assert_in_sync, resolve_device,
                                        to_device, unwrap, wrap_ddp)
from timm_fmd.train.loop import fit
from timm_fmd.train.report import MetricsLog

from .conftest import quick_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_single_process_helpers_are_identities():
    env = D.setup('cpu')
    assert env == DistEnv(0, 1, 0, torch.device('cpu')) and env.is_main and not env.distributed
    t = torch.ones(2)
    assert all_reduce_sum(t, env) is t and all_gather_objects('x', env) == ['x']
    model = torch.nn.Linear(2, 2)
    assert unwrap(torch.compile(model)) is model
    assert_in_sync(model, env)


def test_resolve_device_gives_cuda_an_index(fake_cuda):
    cuda = torch.device
    assert resolve_device('auto') == cuda('cuda', 0) and resolve_device('cuda') == cuda('cuda', 0)
    assert resolve_device('cuda:1') == cuda('cuda', 1)  # an explicit index is kept
    assert resolve_device('cpu') == cuda('cpu')
    fake_cuda.current = 1  # the process made cuda:1 current (e.g. torch.cuda.set_device(1) before fit)
    assert resolve_device('cuda') == cuda('cuda', 1) and resolve_device('auto') == cuda('cuda', 1)
    assert resolve_device('cuda', local_rank=0) == cuda('cuda', 0)  # torchrun: LOCAL_RANK wins
    assert resolve_device('cuda:1', local_rank=0) == cuda('cuda', 1)  # one torchrun process may pick its GPU
    with pytest.raises(ValueError, match=r'--device cuda:2: cuda:2 does not exist, this machine has 2 CUDA '
                                         r'device\(s\) \(cuda:0 to cuda:1'):
        resolve_device('cuda:2')
    with pytest.raises(ValueError, match=r'--device cuda under torchrun \(LOCAL_RANK=2\): cuda:2 does not exist, '
                                         r'this machine has 2 CUDA device'):
        resolve_device('cuda', local_rank=2, world_size=3)
    with pytest.raises(ValueError, match='--device cuda:0: all 2 torchrun processes would share that one GPU'):
        resolve_device('cuda:0', local_rank=1, world_size=2)
    with pytest.raises(ValueError, match="--device: 'gpu' is not a device; use auto, cpu, cuda or cuda:N"):
        resolve_device('gpu')
    with pytest.raises(ValueError, match='--device meta: the trainer runs on auto, cpu, cuda or cuda:N, not meta'):
        resolve_device('meta')


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert resolve_device('auto') == torch.device('cpu')
    with pytest.raises(ValueError, match='--device cuda:0: CUDA is not available on this machine'):
        resolve_device('cuda:0')


class _FakeGroup:
    """Records ``init_process_group`` and stands in for DDP (records its keyword arguments)."""

    def __init__(self, monkeypatch):
        self.init_calls, self.ddp_calls, self.initialized = [], [], False
        monkeypatch.setattr(dist, 'is_initialized', lambda: self.initialized)
        monkeypatch.setattr(dist, 'init_process_group', self.init)
        monkeypatch.setattr(D, 'DistributedDataParallel', self.ddp)

    def init(self, backend, **kwargs):
        self.init_calls.append((backend, kwargs))
        self.initialized = True

    def ddp(self, model, **kwargs):
        self.ddp_calls.append(kwargs)
        return model


def test_setup_single_process_on_cuda(fake_cuda, monkeypatch):
    group = _FakeGroup(monkeypatch)
    for name in ('auto', 'cuda', 'cuda:1'):
        env = D.setup(name)
        index = 1 if name == 'cuda:1' else 0
        assert env == DistEnv(0, 1, 0, torch.device('cuda', index)) and not env.distributed
        assert fake_cuda.set_calls[-1] == torch.device('cuda', index)  # always an indexed device
        assert wrap_ddp(torch.nn.Linear(1, 1), env).__class__ is torch.nn.Linear
    assert group.init_calls == [] and group.ddp_calls == []


def test_setup_under_torchrun_with_one_process(fake_cuda, monkeypatch):
    """torchrun --nproc_per_node 1: an NCCL group of one on cuda:LOCAL_RANK, the path of many GPUs."""
    group = _FakeGroup(monkeypatch)
    fake_cuda.current = 1
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    monkeypatch.setenv('LOCAL_RANK', '0')
    env = D.setup('auto')
    assert env == DistEnv(0, 1, 0, torch.device('cuda', 0), torchrun=True) and env.distributed
    assert fake_cuda.set_calls == [torch.device('cuda', 0)]
    assert group.init_calls == [('nccl', dict(device_id=torch.device('cuda', 0)))]
    wrap_ddp(torch.nn.Linear(1, 1), env)
    assert group.ddp_calls == [dict(device_ids=[0], output_device=0)]


def test_setup_under_torchrun_with_two_ranks(fake_cuda, monkeypatch):
    group = _FakeGroup(monkeypatch)
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('LOCAL_RANK', '1')
    env = D.setup('cuda')
    assert env == DistEnv(1, 2, 1, torch.device('cuda', 1), torchrun=True) and not env.is_main
    assert fake_cuda.set_calls == [torch.device('cuda', 1)]
    assert group.init_calls == [('nccl', dict(device_id=torch.device('cuda', 1)))]
    wrap_ddp(torch.nn.Linear(1, 1), env)
    assert group.ddp_calls == [dict(device_ids=[1], output_device=1)]
    with pytest.raises(ValueError, match='--device cuda:0: all 2 torchrun processes would share that one GPU'):
        D.setup('cuda:0')
    monkeypatch.setenv('LOCAL_RANK', '2')  # --nproc_per_node 3 on a machine with 2 GPUs
    with pytest.raises(ValueError, match=r'LOCAL_RANK=2\): cuda:2 does not exist, this machine has 2 CUDA'):
        D.setup('cuda')


def test_setup_under_torchrun_on_cpu_uses_gloo(monkeypatch):
    group = _FakeGroup(monkeypatch)
    monkeypatch.setenv('WORLD_SIZE', '1')
    monkeypatch.setenv('LOCAL_RANK', '0')
    env = D.setup('cpu')
    assert env.device == torch.device('cpu') and group.init_calls == [('gloo', dict(device_id=None))]
    wrap_ddp(torch.nn.Linear(1, 1), env)
    assert group.ddp_calls == [{}]


class _Batch:
    """A tensor stand-in that records how it is copied."""

    def __init__(self, pinned: bool):
        self.pinned, self.copies = pinned, []

    def is_pinned(self) -> bool:
        return self.pinned

    def to(self, device, non_blocking=False):
        self.copies.append((device, non_blocking))
        return self


def test_to_device_copies_asynchronously_only_from_pinned_memory():
    pinned, pageable = _Batch(True), _Batch(False)
    cuda = torch.device('cuda', 1)
    assert to_device(cuda, pinned, pageable) == (pinned, pageable)
    assert pinned.copies == [(cuda, True)] and pageable.copies == [(cuda, False)]


def _drift_worker(rank: int, port: int, results) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE='2',
                      LOCAL_RANK=str(rank))
    env = D.setup('cpu')
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    assert_in_sync(model, env)  # identical replicas pass
    if rank == 1:
        with torch.no_grad():
            model.bias[0] += 1e-6
    try:
        assert_in_sync(model, env)
        results[rank] = 'passed'
    except RuntimeError as e:
        results[rank] = str(e)
    dist.destroy_process_group()


def test_in_sync_check_catches_a_drifted_replica():
    results = mp.Manager().dict()
    mp.start_processes(_drift_worker, args=(_free_port(), results), nprocs=2, start_method='fork')
    assert results[0] == results[1] and 'parameters of rank 1 differ from rank 0' in results[0]


def test_torchrun_matches_one_process_with_the_summed_batch(tiny_data, tmp_path):
    """Two ranks x batch 4 against one process x batch 8 on the same data: the same global batches
    (interleaved shards, per-sample augmentation seeds), gradients averaged by DDP, so equal metrics
    up to float reassociation: losses within 1e-5 (relative), accuracies within one sample.
    The trainer also checks at every epoch end that the ranks hold bitwise-equal weights."""
    model_args = ['--model', 'test_vit', '--model-kwargs', 'img_size=16', 'patch_size=8', 'depth=1']
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
           str(_free_port()), '-m', 'timm_fmd', 'train', '--data-dir', str(tiny_data), '--img-size', '16', '-b', '4',
           '--epochs', '2', '-j', '0', '--output', str(tmp_path / 'ddp'), '--experiment', 'run', '--sched', 'step',
           '--decay-epochs', '1', '--decay-rate', '0.5', '--warmup-epochs', '0', '--lr', '0.05', '--rotate', '0',
           *model_args]
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    single = fit(quick_config(tiny_data, tmp_path / 'one', model='test_vit', epochs=2, batch_size=8, lr=0.05,
                              model_kwargs=dict(img_size=16, patch_size=8, depth=1)))
    ddp_rows = MetricsLog.read(tmp_path / 'ddp' / 'run' / 'metrics.csv').rows
    one_rows = MetricsLog.read(tmp_path / 'one' / 'run' / 'metrics.csv').rows
    assert [r['step'] for r in ddp_rows] == [r['step'] for r in one_rows] == [6, 12]
    for a, b in zip(ddp_rows, one_rows):
        assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-5)
        assert a['val_loss'] == pytest.approx(b['val_loss'], rel=1e-5)
        assert abs(a['train_top1'] - b['train_top1']) <= 100 / 48 and abs(a['val_top1'] - b['val_top1']) <= 100 / 12
    assert single['global_steps'] == 12
