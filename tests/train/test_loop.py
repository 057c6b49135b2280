"""End-to-end training runs (tiny model, 16x16 images, a few steps each)."""
import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open

from timm_fmd.train import TrainConfig, evaluate_checkpoint, fit
from timm_fmd.train.checkpoint import load_weights
from timm_fmd.train.config import DIGITS_RECIPE, add_arguments, config_from_args, config_from_dict, load_yaml
from timm_fmd.train.report import METRIC_COLUMNS, MetricsLog

from .conftest import quick_config

RESULT_KEYS = {'model', 'architecture', 'pretrained', 'num_classes', 'label_names', 'model_kwargs', 'fmd', 'data',
               'epochs', 'global_steps', 'batch_size', 'seed', 'best', 'final', 'train_val_gap', 'evaluated_weights',
               'param_count', 'wall_time_s', 'images_per_sec', 'checkpoint', 'versions', 'hardware'}
TIMING = ('images_per_sec', 'epoch_time_s')


def metrics(run_dir: Path, drop=TIMING):
    return [{k: v for k, v in r.items() if k not in drop} for r in MetricsLog.read(run_dir / 'metrics.csv').rows]


@pytest.fixture(scope='module')
def fmd_run(tiny_data, tmp_path_factory):
    """Two epochs of an FMD model: 6 steps an epoch, the ramp over 1.5 epochs (9 steps)."""
    out = tmp_path_factory.mktemp('runs')
    cfg = quick_config(tiny_data, out, model='fmd_test_efficientnet', epochs=2, fmd_prob=0.2, fmd_ramp_epochs=1.5,
                       fmd_stage_scale=[1.0, 1.0], checkpoint_interval=4)
    return cfg, fit(cfg), out / 'run'


def test_fit_writes_the_run_directory(fmd_run):
    cfg, results, run_dir = fmd_run
    assert sorted(p.name for p in run_dir.iterdir()) == ['checkpoints', 'config.yaml', 'curves.png', 'metrics.csv',
                                                         'results.json']
    assert sorted(p.name for p in (run_dir / 'checkpoints').iterdir()) == ['best.safetensors', 'last.safetensors',
                                                                           'last.state.pt']
    assert RESULT_KEYS <= set(results) and json.loads((run_dir / 'results.json').read_text()) == results
    assert (results['model'], results['architecture'], results['num_classes']) == ('fmd_test_efficientnet',
                                                                                   'test_efficientnet', 3)
    assert results['label_names'] == ['circle', 'square', 'stripes'] and results['global_steps'] == 12
    assert results['fmd'] == dict(prob=0.2, block_size=7, stages=[-2, -1], sites=['conv', 'skip'], gamma=1.0, lam=0.0,
                                  steps=1, mode='approx', shared_mask=False, stage_scale=[1.0, 1.0], ramp_steps=9)
    assert results['data']['input_size'] == [3, 16, 16] and results['data']['val_split'] == 'val'
    assert results['final']['epoch'] == 2 and results['evaluated_weights'] == 'model'
    assert results['train_val_gap'] == pytest.approx(results['final']['train_top1'] - results['final']['val_top1'])
    rows = MetricsLog.read(run_dir / 'metrics.csv').rows
    assert [r['epoch'] for r in rows] == [1, 2] and [r['step'] for r in rows] == [6, 12]
    assert [r['fmd_prob'] for r in rows] == pytest.approx([0.2 * 6 / 9, 0.2])  # the ramp: one step per optimiser step
    assert all(r[k] is not None for r in rows for k in METRIC_COLUMNS if k != 'erc')
    assert all(r['erc'] is None for r in rows) and results['erc'] is None  # --erc-every is off by default
    with Image.open(run_dir / 'curves.png') as img:
        assert img.format == 'PNG'
    with safe_open(str(run_dir / 'checkpoints' / 'best.safetensors'), 'pt') as f:
        meta = f.metadata()
        assert set(f.keys()) == set(timm.create_model('test_efficientnet', num_classes=3).state_dict())
    assert meta['architecture'] == 'test_efficientnet' and meta['model'] == 'fmd_test_efficientnet'
    assert int(meta['epoch']) == results['best']['epoch'] and meta['format'] == 'pt'
    state = torch.load(run_dir / 'checkpoints' / 'last.state.pt', weights_only=True)
    assert (state['epoch'], state['global_step'], state['batch_in_epoch']) == (2, 12, 0)
    assert ('tensorboard' in os.listdir(run_dir)) == _has_tensorboard()


def _has_tensorboard() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_eval_reproduces_the_logged_validation(fmd_run):
    _, results, run_dir = fmd_run
    best = results['best']
    evaluated = evaluate_checkpoint(run_dir / 'checkpoints' / 'best.safetensors')
    assert (evaluated['val_top1'], evaluated['val_top5'], evaluated['val_loss']) == (
        best['val_top1'], best['val_top5'], best['val_loss'])
    assert evaluated['epoch'] == best['epoch'] and evaluated['val_size'] == 12


def test_eval_on_the_training_samples(fmd_run, tiny_data, tmp_path):
    _, _, run_dir = fmd_run
    checkpoint = run_dir / 'checkpoints' / 'last.safetensors'
    on_train = evaluate_checkpoint(checkpoint, split='train')
    assert on_train['train_size'] == 48 and 'val_top1' not in on_train
    # reference: the same training images offered as the validation split of another data folder
    (tmp_path / 'train').symlink_to(tiny_data / 'train')
    (tmp_path / 'val').symlink_to(tiny_data / 'train')
    as_val = evaluate_checkpoint(checkpoint, data_dir=str(tmp_path))
    assert as_val['val_size'] == 48
    assert (on_train['train_top1'], on_train['train_loss']) == (as_val['val_top1'], as_val['val_loss'])
    with pytest.raises(ValueError, match=r"split must be one of \('val', 'train'\), got 'test'"):
        evaluate_checkpoint(checkpoint, split='test')


def test_resume_continues_exactly(fmd_run, tiny_data, tmp_path):
    cfg, results, run_dir = fmd_run
    fit(quick_config(tiny_data, tmp_path, model='fmd_test_efficientnet', epochs=1, fmd_prob=0.2, fmd_ramp_epochs=1.5,
                     fmd_stage_scale=[1.0, 1.0], checkpoint_interval=4))
    resumed = fit(TrainConfig(**{**cfg.__dict__, 'resume': str(tmp_path / 'run')}))
    assert metrics(tmp_path / 'run') == metrics(run_dir)
    assert resumed['best'] == results['best'] and resumed['global_steps'] == 12
    a, b = load_weights(tmp_path / 'run' / 'checkpoints' / 'last.safetensors')[0], load_weights(
        run_dir / 'checkpoints' / 'last.safetensors')[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ema_mixup_accumulation_and_amp(tiny_data, tmp_path):
    results = fit(quick_config(tiny_data, tmp_path, model_ema=True, model_ema_decay=0.5, mixup=0.2, cutmix=1.0,
                               smoothing=0.1, grad_accum_steps=2, batch_size=4, amp=True, amp_dtype='bfloat16',
                               clip_grad=1.0))  # bf16 with channels_last: see test_channels_last_training
    row, = MetricsLog.read(tmp_path / 'run' / 'metrics.csv').rows
    assert row['train_top1'] is None and row['train_top5'] is None and row['train_loss'] > 0
    assert results['evaluated_weights'] == 'ema' and results['train_val_gap'] is None and results['fmd'] is None
    assert results['global_steps'] == 6  # 48 images / (4 x 2 accumulated)
    state = torch.load(tmp_path / 'run' / 'checkpoints' / 'last.state.pt', weights_only=True)
    ema = load_weights(tmp_path / 'run' / 'checkpoints' / 'last.safetensors')[0]
    assert state['model'].keys() == ema.keys()  # trained weights kept for resuming, EMA ones evaluated
    assert any(not torch.equal(state['model'][k], ema[k]) for k in ema)


def test_run_directory_errors(tiny_data, tmp_path):
    fit(quick_config(tiny_data, tmp_path, epochs=1))
    with pytest.raises(ValueError, match='--experiment: .*run already holds a run; continue it with `timm-fmd train '
                                         '--resume .*run`, or pass another --experiment'):
        fit(quick_config(tiny_data, tmp_path))
    with pytest.raises(FileNotFoundError, match='--resume: .*nowhere holds no checkpoints'):
        fit(quick_config(tiny_data, tmp_path, resume=str(tmp_path / 'nowhere')))
    with pytest.raises(ValueError, match='make no full optimiser step'):
        fit(quick_config(tiny_data, tmp_path, experiment='big', batch_size=64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['run']  # the failed start left nothing


def _train_args(data: Path, out: Path):
    return ['--data-dir', str(data), '--model', 'test_efficientnet', '--img-size', '16', '-b', '8', '--epochs', '2',
            '-j', '0', '--output', str(out), '--experiment', 'run', '--log-interval', '1', '--checkpoint-interval', '5',
            '--sched', 'step', '--decay-epochs', '1', '--warmup-epochs', '0']


def _env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def _logged_steps(lines):
    """The global steps of the progress lines ('epoch 1/2 [3/24] step 3 loss ...') among ``lines``."""
    return [int(line.split(' step ')[1].split()[0]) for line in lines if ' step ' in line]


def test_sigkill_mid_epoch_then_resume_loses_at_most_the_interval(small_data, tmp_path):
    """24 steps an epoch; killed after step 12 is logged (the step-10 checkpoint exists), then resumed."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    fit(config_from_args(parser.parse_args(_train_args(small_data, tmp_path / 'ref'))))  # never interrupted
    proc = subprocess.Popen([sys.executable, '-m', 'timm_fmd', 'train', *_train_args(small_data, tmp_path / 'killed')],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = ''
    for line in proc.stdout:
        if _logged_steps([line]) and _logged_steps([line])[0] >= 12:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    last_step = max(_logged_steps([line] + proc.stdout.readlines()))  # it may have run on a little
    proc.stdout.close()
    run_dir = tmp_path / 'killed' / 'run'
    state = torch.load(run_dir / 'checkpoints' / 'last.state.pt', weights_only=True)
    assert state['epoch'] == 0 and state['batch_in_epoch'] > 0  # a mid-epoch checkpoint
    assert 0 <= last_step - state['global_step'] <= 5
    resumed = subprocess.run([sys.executable, '-m', 'timm_fmd', 'train', '--resume', str(run_dir)], env=_env(),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(run_dir) == metrics(tmp_path / 'ref' / 'run')  # as if never interrupted


def test_default_recipe_trains_one_epoch(tmp_path):
    """The default recipe (FMD ResNet-20 on the embedded digits), one epoch at 16x16 to keep it quick."""
    results = fit(config_from_dict(dict(load_yaml(DIGITS_RECIPE), epochs=1, img_size=16, output=str(tmp_path),
                                        experiment='digits')))
    assert results['data']['name'] == 'digits' and results['fmd']['prob'] == 0.1 and results['fmd']['block_size'] == 3
    assert results['final']['val_top1'] > 10.0  # better than chance after one epoch


def test_erc_is_logged_per_epoch_without_touching_training(tiny_data, tmp_path):
    """--erc-every: the ERC of the layers after the FMD sites lands in metrics.csv and results.json, and
    the training itself (losses, accuracies) is the same as without it."""
    runs = {}
    for every in (0, 1):
        cfg = quick_config(tiny_data, tmp_path / str(every), model='fmd_test_efficientnet', epochs=2, fmd_prob=0.2,
                           erc_every=every, erc_batches=2, erc_draws=16)
        runs[every] = (fit(cfg), metrics(tmp_path / str(every) / 'run', drop=TIMING + ('erc',)))
    (plain, plain_rows), (with_erc, erc_rows) = runs[0], runs[1]
    assert erc_rows == plain_rows
    layers = {k: v for k, v in with_erc['erc'].items() if k != 'batch_size'}
    assert layers and all(v['mean'] > 0 and v['se'] >= 0 for v in layers.values())
    logged = [r['erc'] for r in MetricsLog.read(tmp_path / '1' / 'run' / 'metrics.csv').rows]
    assert all(v > 0 for v in logged)
    assert logged[-1] == pytest.approx(sum(v['mean'] for v in layers.values()) / len(layers))


def test_start_up_prints_the_fmd_sites(tiny_data, tmp_path, capsys):
    fit(quick_config(tiny_data, tmp_path, model='fmd_test_efficientnet', fmd_prob=0.2,
                    fmd_stages=[-1], fmd_sites=['conv']))
    out = capsys.readouterr().out
    assert 'FMD: 3 sites (3 linked to a next layer, 0 use the fixed weight 0.01)\n  stage 4 (blocks.4): 3 conv\n' in out


def test_channels_last_training(tiny_data, tmp_path):
    """channels_last in float32. (bf16 autocast with channels_last on CPU gave NaN losses at the first step
    in some test orders with torch 2.14.1, inside torch's own kernels; float32 is unaffected.)"""
    results = fit(quick_config(tiny_data, tmp_path, model='fmd_test_efficientnet', channels_last=True))
    assert results['final']['train_loss'] > 0 and results['final']['val_top1'] is not None
