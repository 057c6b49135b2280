"""DDP with gloo on CPU: two processes against one (a few steps of a BatchNorm-free model)."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from timm_fmd.train.distributed import DistEnv, all_gather_objects, all_reduce_sum, assert_in_sync, setup, unwrap
from timm_fmd.train.loop import fit
from timm_fmd.train.report import MetricsLog

from .conftest import quick_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_single_process_helpers_are_identities():
    env = setup('cpu')
    assert env == DistEnv(0, 1, 0, torch.device('cpu')) and env.is_main and not env.distributed
    t = torch.ones(2)
    assert all_reduce_sum(t, env) is t and all_gather_objects('x', env) == ['x']
    model = torch.nn.Linear(2, 2)
    assert unwrap(torch.compile(model)) is model
    assert_in_sync(model, env)


def _drift_worker(rank: int, port: int, results) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE='2',
                      LOCAL_RANK=str(rank))
    env = setup('cpu')
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
