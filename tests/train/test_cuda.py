"""The trainer on a real GPU (``@pytest.mark.cuda``: skipped without CUDA; ``python -m pytest -m cuda``).

The embedded digits (1,437 training images, 22 steps of 64 an epoch) with an FMD ResNet-20 in bf16 autocast and
channels_last, pinned batches, EMA and a mid-epoch checkpoint; resume; fp16 with the grad scaler; torchrun with
one process (an NCCL group of one) and, given two GPUs, two. GPU runs are not bit-reproducible (atomic adds in
backward kernels, cuDNN autotuning), so resumed and uninterrupted runs are compared with tolerances.
"""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm_fmd.train import TrainConfig, fit
from timm_fmd.train.checkpoint import capture_rng, restore_rng
from timm_fmd.train.report import MetricsLog

pytestmark = pytest.mark.cuda

# a step schedule decayed after each epoch: the first epoch of a 1-epoch and of a 2-epoch run train alike, so a
# resumed run can be compared with an uninterrupted one (cosine per update differs in the first epoch already: on
# the H200 the first epochs' losses were 2.37 and 2.44)
DIGITS = dict(data_dir=None, model='fmd_cifar_resnet20', img_size=32, crop_pct=1.0, batch_size=64, opt='momentum',
              lr=0.1, sched='step', decay_epochs=1.0, decay_rate=0.5, warmup_epochs=0, fmd_prob=0.1,
              fmd_block_size=3, workers=2, log_interval=1000)
CLI_DIGITS = ['--model', 'fmd_cifar_resnet20', '--img-size', '32', '--crop-pct', '1.0', '-b', '64', '--lr', '0.1',
              '--warmup-epochs', '0', '-j', '2', '--epochs', '1', '--amp', '--amp-dtype', 'bfloat16',
              '--channels-last', '--device', 'cuda', '--experiment', 'run']


def _gpu_config(out: Path, **overrides) -> TrainConfig:
    values = dict(DIGITS, output=str(out), experiment='run', device='cuda', amp=True, amp_dtype='bfloat16',
                  channels_last=True, pin_mem=True, model_ema=True, model_ema_decay=0.9, checkpoint_interval=10)
    values.update(overrides)
    return TrainConfig(**values)


def _rows(run_dir: Path):
    return MetricsLog.read(run_dir / 'metrics.csv').rows


def test_cuda_rng_round_trip_on_the_run_device():
    device = torch.device('cuda', torch.cuda.current_device())
    state = capture_rng(device)
    expected = torch.rand(1000, device=device)
    torch.rand(10, device=device)
    restore_rng(state, device)
    assert state['cuda'].dtype == torch.uint8 and torch.equal(torch.rand(1000, device=device), expected)
    if torch.cuda.device_count() > 1:  # a rank resumed on another GPU continues the same stream
        other = torch.device('cuda', 1 if device.index == 0 else 0)
        restore_rng(state, other)
        assert torch.equal(torch.rand(1000, device=other).to(device), expected)


def test_trainer_on_cuda_bf16_channels_last_then_resume(tmp_path):
    full = fit(_gpu_config(tmp_path / 'full', epochs=2))
    fit(_gpu_config(tmp_path / 'part', epochs=1))
    state = torch.load(tmp_path / 'part' / 'run' / 'checkpoints' / 'last.state.pt', weights_only=True)
    cuda_rng = state['ranks'][0]['rng']['cuda']
    assert isinstance(cuda_rng, torch.Tensor) and cuda_rng.dtype == torch.uint8  # the GPU's own stream
    resumed = fit(_gpu_config(tmp_path / 'part', epochs=2, resume=str(tmp_path / 'part' / 'run')))
    assert full['global_steps'] == resumed['global_steps'] == 44 and full['evaluated_weights'] == 'ema'
    a, b = _rows(tmp_path / 'full' / 'run'), _rows(tmp_path / 'part' / 'run')
    assert [r['step'] for r in a] == [r['step'] for r in b] == [22, 44]
    # the same seeds and data order: equal up to GPU non-determinism, which grows over the steps
    assert b[0]['train_loss'] == pytest.approx(a[0]['train_loss'], rel=0.02)
    assert b[1]['train_loss'] == pytest.approx(a[1]['train_loss'], rel=0.1)
    # it learns: 10 classes, chance is 10% +- 1.6% on the 359 validation images (this schedule on CPU in fp32: 22.8%
    # after two epochs, train loss 2.48 -> 2.15; resumed and uninterrupted runs equal there bit for bit)
    for rows in (a, b):
        assert rows[1]['train_loss'] < rows[0]['train_loss'] and rows[1]['val_top1'] > 15


def test_fp16_with_the_grad_scaler_on_cuda(tmp_path):
    results = fit(_gpu_config(tmp_path, epochs=1, amp_dtype='float16', model_ema=False, checkpoint_interval=0))
    state = torch.load(tmp_path / 'run' / 'checkpoints' / 'last.state.pt', weights_only=True)
    assert state['scaler']['scale'] > 0 and results['global_steps'] == 22
    assert math.isfinite(results['final']['train_loss'])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port',
           str(_free_port()), '-m', 'timm_fmd', 'train', *CLI_DIGITS, '--output', str(out)]
    return subprocess.run(cmd, env=dict(os.environ, NCCL_DEBUG='VERSION', OMP_NUM_THREADS='2'),
                          capture_output=True, text=True, timeout=300)


def test_torchrun_one_process_trains_with_nccl(tmp_path):
    """torchrun --nproc_per_node 1: an NCCL group of one on cuda:0, DDP, the collectives; NCCL_DEBUG=VERSION
    makes NCCL print its version when the communicator starts (eagerly, as init_process_group gets device_id)."""
    done = _torchrun(1, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert 'NCCL version' in done.stdout + done.stderr
    results = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert results['world_size'] == 1 and results['global_steps'] == 22


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs 2 CUDA devices')
def test_torchrun_two_processes_on_two_gpus(tmp_path):
    """Two ranks, one GPU each (cuda:LOCAL_RANK); the trainer checks every epoch that they hold equal weights."""
    done = _torchrun(2, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert results['world_size'] == 2 and results['global_steps'] == 11  # 1,437 images / (2 x 64)
