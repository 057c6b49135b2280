"""benchmarks/paper_gpu.py: the paper's rows as trainer configs, the data it hands the trainer, parallel runs
pinned to their own cores, and a killed run resumed rather than restarted."""
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import timm_fmd.ops.capture as capture
from timm_fmd.train.report import MetricsLog

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('paper_gpu', ROOT / 'benchmarks' / 'paper_gpu.py')
paper_gpu = importlib.util.module_from_spec(_spec)
sys.modules['paper_gpu'] = paper_gpu  # dataclasses resolve their annotations through sys.modules
_spec.loader.exec_module(paper_gpu)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    monkeypatch.setenv('TIMM_FMD_CACHE', str(tmp_path_factory.getbasetemp() / 'cache'))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')


def _cifar_like(root: Path, train_per_class=8, test_per_class=4, classes=('cat', 'airplane', 'ship')) -> Path:
    """ImageFolder tars of 32x32 JPEGs, like the CIFAR-10 ones (train/<class>/NNNN.jpg members)."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', train_per_class), ('test', test_per_class)):
        with tarfile.open(root / f'{split}.tar', 'w') as tf:
            for label, name in enumerate(sorted(classes)):
                for i in range(n):
                    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g)
                    pixels[:, :, label] = 255  # a learnable colour per class
                    buffer = io.BytesIO()
                    Image.fromarray(pixels.numpy()).save(buffer, format='JPEG')
                    info = tarfile.TarInfo(f'{split}/{name}/{i:04d}.jpg')
                    info.size = buffer.tell()
                    buffer.seek(0)
                    tf.addfile(info, buffer)
    return root


@pytest.fixture(scope='module')
def tars(tmp_path_factory):
    return _cifar_like(tmp_path_factory.mktemp('cifar'))


def _members(tar: Path):
    with tarfile.open(tar) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


# ------------------------------------------------------------------------------------------------- rows
def _config(table, method, argv=('--device', 'cpu'), seed=0):
    args = paper_gpu.parse_args(['--out', '/tmp/unused', *argv])
    return paper_gpu.train_config(paper_gpu.RunSpec(table, method, seed), args, Path('/data'))


def test_table1_rows_are_the_papers_recipe():
    for method in ('none', 'dropout', 'fmd'):
        cfg = _config(1, method)
        assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == (500, 128, 0.01, 0.9, 0.0)
        assert (cfg.sched, cfg.decay_milestones, cfg.decay_rate, cfg.warmup_epochs) == ('multistep', [200, 300, 400],
                                                                                      0.1, 0)
        assert cfg.no_aug and cfg.data_dir == '/data' and cfg.experiment == f't1-{method}-s0'
    assert (_config(1, 'none').model, _config(1, 'none').model_kwargs) == ('paper_cnn', {'drop_rate': 0.0})
    assert _config(1, 'dropout').model_kwargs == {'drop_rate': 0.5}
    fmd = _config(1, 'fmd')
    assert (fmd.model, fmd.fmd_prob, fmd.fmd_gamma, fmd.fmd_block_size, fmd.fmd_stages) == (
        'fmd_paper_cnn', 0.5, 5.0, 0, [-2, -1])
    assert fmd.fmd_ramp_epochs == 500  # from 0 over the whole run


def test_table2_rows_are_the_papers_recipe_and_the_releases_fmd():
    for method in ('none', 'dropblock', 'fmd-release', 'fmd-text'):
        cfg = _config(2, method, seed=3)
        assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == (200, 128, 0.1, 0.9, 5e-4)
        assert (cfg.decay_milestones, cfg.decay_rate, cfg.warmup_epochs, cfg.warmup_lr) == ([60, 120, 160], 0.2, 1,
                                                                                          0.0)
        assert cfg.opt_kwargs == {'filter_bias_and_bn': False}  # decay on every parameter, as the release
        assert (cfg.no_aug, cfg.crop_pad, cfg.hflip, cfg.rotate) == (False, 4, 0.5, 15.0) and cfg.seed == 3
    assert _config(2, 'none').model_kwargs['drop_block_rate'] == 0.0
    assert _config(2, 'dropblock').model_kwargs == {'drop_block_rate': 0.05, 'drop_block_size': 6}
    for method, gamma, prob in (('fmd-release', 5.0, 0.076), ('fmd-text', 30.0, 0.05)):
        cfg = _config(2, method)
        assert (cfg.model, cfg.fmd_gamma, cfg.fmd_prob, cfg.fmd_block_size, cfg.fmd_stages, cfg.fmd_sites) == (
            'fmd_cifar_preresnet56', gamma, prob, 6, [-1], ['conv'])
        assert cfg.fmd_ramp_epochs == 200


def test_device_settings_follow_the_device_and_the_ops_capability(monkeypatch):
    cpu = _config(2, 'none')
    assert (cpu.data_on_device, cpu.cuda_graph, cpu.amp, cpu.channels_last, cpu.device) == (True, False, False, False,
                                                                                           'cpu')
    args = paper_gpu.parse_args(['--out', '/tmp/unused', '--device', 'cpu'])
    args.device = 'cuda'  # as parse_args leaves it on a GPU machine
    monkeypatch.setattr(capture, '_DECLARED', {})
    cfgs = {m: paper_gpu.train_config(paper_gpu.RunSpec(2, m, 0), args, Path('/d')) for m in ('none', 'fmd-text')}
    assert cfgs['none'].cuda_graph and (cfgs['none'].amp, cfgs['none'].amp_dtype) == (True, 'bfloat16')
    assert cfgs['none'].channels_last and not cfgs['fmd-text'].cuda_graph  # FMD waits for a capture-safe op
    capture.declare_capture_safe('cuda')
    assert paper_gpu.train_config(paper_gpu.RunSpec(2, 'fmd-text', 0), args, Path('/d')).cuda_graph


def test_shorter_runs_scale_the_schedule():
    cfg = _config(2, 'fmd-text', ('--device', 'cpu', '--epochs', '20'))
    assert (cfg.epochs, cfg.decay_milestones, cfg.fmd_ramp_epochs) == (20, [6, 12, 16], 20.0)
    cfg = _config(1, 'fmd', ('--device', 'cpu', '--epochs', '1'))
    assert (cfg.epochs, cfg.decay_milestones, cfg.fmd_ramp_epochs) == (1, [1], 1.0)


def test_cli_rejects_bad_input(capsys):
    for argv, message in ((['--table', '2', '--methods', 'dropout'], 'none is a row of table(s) [2]'),
                          (['--epochs', '0'], 'expected an integer >= 1, got 0'),
                          (['--seeds', '-1'], '--seeds must be integers >= 0'),
                          (['--device', 'cpu', '--cuda-graph'], '--cuda-graph: needs a CUDA device'),
                          (['--device', 'cpu', '--mps', 'on'], '--mps on: MPS shares a CUDA device, got --device cpu')):
        with pytest.raises(SystemExit):
            paper_gpu.parse_args(argv)
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- MPS
def _fake_mps(tmp_path, monkeypatch, rc=0):
    """A stand-in nvidia-cuda-mps-control first on PATH: it logs its arguments, pipe directory and input."""
    bin_dir, log = tmp_path / 'bin', tmp_path / 'mps.log'
    bin_dir.mkdir()
    fake = bin_dir / paper_gpu.MPS_CONTROL
    fake.write_text(f'#!/bin/sh\necho "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY" >> {log}\n'
                    f'if [ "$1" = "-d" ]; then echo boom >&2; exit {rc}; fi\ncat >> {log}\n')
    fake.chmod(0o755)
    monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
    return log


def _client_ok(env):
    assert os.path.isdir(env['CUDA_MPS_PIPE_DIRECTORY'])  # checked while the daemon runs
    return None


def test_mps_daemon_runs_for_the_runs_and_quits_after(tmp_path, monkeypatch, capsys):
    log = _fake_mps(tmp_path, monkeypatch)
    with paper_gpu.mps('auto', wanted=True, client_check=_client_ok) as env:
        pipe = env['CUDA_MPS_PIPE_DIRECTORY']
        assert os.path.isdir(pipe) and os.path.isdir(env['CUDA_MPS_LOG_DIRECTORY'])
        assert log.read_text() == f'args=-d pipe={pipe}\n'  # started, not yet told to quit
    assert log.read_text() == f'args=-d pipe={pipe}\nargs= pipe={pipe}\nquit\n'
    assert not os.path.exists(os.path.dirname(pipe)) and 'MPS control daemon started' in capsys.readouterr().out
    for mode, wanted in (('off', True), ('auto', False)):  # not asked for, or a single run / no GPU
        with paper_gpu.mps(mode, wanted) as env:
            assert env == {}
    assert log.read_text().count('args=-d') == 1


def test_mps_missing_or_failing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('PATH', str(tmp_path))  # no nvidia-cuda-mps-control
    with paper_gpu.mps('auto', wanted=True) as env:
        assert env == {}
    assert 'note: no nvidia-cuda-mps-control on PATH: the runs take turns on the GPU' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='--mps on: nvidia-cuda-mps-control .* is not on PATH'):
        with paper_gpu.mps('on', wanted=True):
            pass
    monkeypatch.setenv('PATH', os.defpath)
    log = _fake_mps(tmp_path, monkeypatch, rc=1)
    with paper_gpu.mps('auto', wanted=True, client_check=_client_ok) as env:
        assert env == {}
    assert 'note: nvidia-cuda-mps-control -d failed: boom; the runs take turns on the GPU' in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r'--mps on: nvidia-cuda-mps-control -d failed: boom'):
        with paper_gpu.mps('on', wanted=True, client_check=_client_ok):
            pass
    log.unlink()
    (tmp_path / 'bin' / paper_gpu.MPS_CONTROL).unlink()
    (tmp_path / 'bin').rmdir()
    log = _fake_mps(tmp_path, monkeypatch)  # starts, but refuses clients: told to quit, not used
    with paper_gpu.mps('auto', wanted=True, client_check=lambda env: 'cudaErrorMpsConnectionFailed') as env:
        assert env == {}
    assert 'note: the MPS daemon served no CUDA client: cudaErrorMpsConnectionFailed; the runs take turns' in \
        capsys.readouterr().out
    assert log.read_text().endswith('quit\n')


def test_runs_get_the_mps_environment(tmp_path, monkeypatch):
    launched = []

    class Process:
        pid = os.getpid()

    def popen(command, **kwargs):
        launched.append(kwargs['env'])
        return Process()

    monkeypatch.setattr(paper_gpu.subprocess, 'Popen', popen)
    job = paper_gpu.Job(paper_gpu.RunSpec(1, 'none', 0), _config(1, 'none'), tmp_path / 'runs' / 'run')
    (tmp_path / 'logs').mkdir()
    paper_gpu._launch(job, [0], tmp_path, {'CUDA_MPS_PIPE_DIRECTORY': '/tmp/mps.x/pipe'})
    assert launched[0]['CUDA_MPS_PIPE_DIRECTORY'] == '/tmp/mps.x/pipe' and launched[0]['OMP_NUM_THREADS'] == '1'


# ------------------------------------------------------------------------------------------------- data
def test_pack_subset_and_tars(tars, tmp_path):
    originals = {split: _members(tars / f'{split}.tar') for split in paper_gpu.SPLITS}
    assert paper_gpu.training_data(tars, tmp_path, None) == tars  # tars as they are: used in place
    paths = paper_gpu.main(['--data-dir', str(tars), '--pack', str(tmp_path / 'packed'), '--device', 'cpu'])['packed']
    assert [Path(p).name for p in paths] == ['train.jpeg.pt', 'test.jpeg.pt']
    unpacked = paper_gpu.training_data(tmp_path / 'packed', tmp_path / 'out', None)
    assert unpacked == tmp_path / 'out' / 'data'
    for split in paper_gpu.SPLITS:
        assert _members(unpacked / f'{split}.tar') == originals[split]  # names and bytes
    subset = paper_gpu.training_data(tars, tmp_path / 'out', 5)
    for split in paper_gpu.SPLITS:
        members = _members(subset / f'{split}.tar')
        assert len(members) == 5 and all(originals[split][name] == data for name, data in members.items())
    assert paper_gpu.subset_indices(24, 5) == paper_gpu.subset_indices(24, 5) == sorted(paper_gpu.subset_indices(24, 5))


def test_missing_data_is_an_error_not_a_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'no train.tar, train/ or train.jpeg.pt .*nothing is downloaded'):
        paper_gpu.training_data(tmp_path, tmp_path / 'out', None)


def test_results_table_means_over_seeds():
    runs = [dict(table=2, method=m, seed=s, epochs=200, final_test_top1=v, best_test_top1=v + 0.1,
                 final_train_top1=99.0, seconds_per_epoch=1.0, minutes=3.5, paper_top1=p)
            for m, s, v, p in (('fmd-text', 0, 94.0, 94.5), ('fmd-text', 1, 94.4, 94.5), ('none', 0, 93.0, 93.95))]
    table = paper_gpu.results_table(runs).splitlines()
    assert table[2] == '| 2 | none | 1 | 200 | 93.00 | 93.10 | 99.00 | 1.0 | 3.5 | 93.95 |'  # the paper's order
    assert table[3] == '| 2 | fmd-text | 2 | 200 | 94.20 ± 0.28 | 94.30 ± 0.28 | 99.00 ± 0.00 | 1.0 ± 0.0 | ' \
                       '3.5 ± 0.0 | 94.50 |'


# ---------------------------------------------------------------------------------------- runs (processes)
QUICK = ['--table', '1', '--subset', '24', '--batch-size', '8', '--device', 'cpu']


def test_rows_run_in_parallel_processes_on_their_own_cores(tars, tmp_path, capsys):
    payload = paper_gpu.main([*QUICK, '--methods', 'none', 'fmd', '--epochs', '1', '--parallel', '2',
                              '--data-dir', str(tars), '--out', str(tmp_path)])
    runs = {r['method']: r for r in payload['runs']}
    assert sorted(runs) == ['fmd', 'none'] and json.loads((tmp_path / 'results.json').read_text())['runs'] == \
        json.loads(json.dumps(payload['runs']))
    (a,), (b,) = runs['none']['attempts'], runs['fmd']['attempts']
    assert a['kind'] == b['kind'] == 'fresh' and a['returncode'] == b['returncode'] == 0
    assert a['affinity'] == a['cores'] and b['affinity'] == b['cores']  # pinned before the program started
    if len(os.sched_getaffinity(0)) >= 2:
        assert not set(a['cores']) & set(b['cores'])
    assert a['start'] < b['end'] and b['start'] < a['end']  # at the same time
    for run in runs.values():
        assert run['epochs'] == 1 and 0 <= run['final_test_top1'] <= 100 and run['paper_top1'] in (81.99, 85.24)
        assert run['results']['data']['train_size'] == 24 and run['results']['data']['val_size'] == 12
        assert run['results']['model'] in ('paper_cnn', 'fmd_paper_cnn') and not run['cuda_graph']
    table = (tmp_path / 'table.md').read_text()
    assert '| 1 | none | 1 | 1 |' in table and '| 85.24 |' in table and table in capsys.readouterr().out + '\n'


def test_a_killed_run_is_resumed_not_restarted(tars, tmp_path):
    """The whole command is killed after the run's first epoch checkpoint; the same command again resumes it."""
    argv = [*QUICK, '--methods', 'none', '--epochs', '4', '--data-dir', str(tars), '--out', str(tmp_path)]
    proc = subprocess.Popen([sys.executable, str(ROOT / 'benchmarks' / 'paper_gpu.py'), *argv], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    run_dir = tmp_path / 'runs' / 't1-none-s0'
    state = run_dir / 'checkpoints' / 'last.state.pt'
    deadline = time.time() + 240
    while not state.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its training process
    proc.wait(timeout=30)
    assert state.is_file() and not (run_dir / 'results.json').is_file(), 'the run ended before it could be killed'
    epoch = torch.load(state, weights_only=True)['epoch']  # a later row may be written, its checkpoint not
    done = MetricsLog.read(run_dir / 'metrics.csv', max_epoch=epoch).rows
    assert 1 <= len(done) == epoch < 4
    payload = paper_gpu.main(argv)
    run, = payload['runs']
    assert [a['kind'] for a in run['attempts']] == ['resume']
    rows = MetricsLog.read(run_dir / 'metrics.csv').rows
    assert [r['epoch'] for r in rows] == [1, 2, 3, 4] and rows[:len(done)] == done
    assert run['results']['global_steps'] == 4 * 3  # 24 images / batch 8, every epoch trained once


@pytest.mark.cuda
def test_table2_rows_on_cuda(tars, tmp_path):
    """The GPU settings end to end: data on the device, CUDA graphs (FMD rows where the op is capture-safe),
    bf16, channels_last, two processes at once on the one GPU."""
    payload = paper_gpu.main(['--table', '2', '--methods', 'none', 'fmd-text', '--subset', '24', '--batch-size', '8',
                              '--epochs', '2', '--device', 'cuda', '--parallel', '2', '--data-dir', str(tars),
                              '--out', str(tmp_path)])
    runs = {r['method']: r for r in payload['runs']}
    assert runs['none']['cuda_graph'] and runs['fmd-text']['cuda_graph'] == capture.capture_safe('cuda')
    assert all(r['results']['global_steps'] == 6 and r['epochs'] == 2 for r in runs.values())
    assert payload['gpu'] and '| 2 | none | 1 | 2 |' in payload['table']
