"""A start that fails leaves nothing that blocks a rerun, and each error's advice works when followed
(every test below does what the message says and checks that the run then goes through)."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import timm
import torch
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors.torch import save_file

import timm_fmd
from timm_fmd import cli
from timm_fmd.train import fit, loop
from timm_fmd.train.config import save_config
from timm_fmd.train.data import DataError
from timm_fmd.train.model import _hub_failure

from .conftest import make_image_folder, quick_config


def _cli(*argv: str) -> int:
    return cli.main(['train', *argv])


def _quick_args(data, out, *more: str) -> list:
    """quick_config's settings as command-line options."""
    return ['--data-dir', str(data), '--model', 'test_efficientnet', '--img-size', '16', '-b', '8', '--epochs', '1',
            '-j', '0', '--output', str(out), '--experiment', 'run', '--checkpoint-interval', '0', '--warmup-epochs',
            '0', '--lr', '0.05', *more]


def test_empty_class_folder(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', {'train': 8, 'val': 2})
    (data / 'train' / 'ghost').mkdir()
    assert _cli(*_quick_args(data, tmp_path / 'out')) == 2
    assert capsys.readouterr().err == (f"timm-fmd train: error: class folder(s) with no images in {data / 'train'}: "
                                       "['ghost'] (add images to them or remove them)\n")
    assert not (tmp_path / 'out' / 'run').exists()
    (data / 'train' / 'ghost').rmdir()  # the advice
    assert _cli(*_quick_args(data, tmp_path / 'out')) == 0


def test_unreadable_image_in_the_first_batch_then_skip_corrupt(tmp_path, capsys):
    """workers=1: the error comes from a DataLoader worker, its own one-line message first. --skip-corrupt then
    trains on the other 23 images and says so once; results.json counts only the images used."""
    data = make_image_folder(tmp_path / 'data', {'train': 8, 'val': 2})
    bad = data / 'train' / 'circle' / '000.png'
    bad.write_bytes(b'not a png')
    assert _cli(*_quick_args(data, tmp_path / 'out', '-j', '1', '--epochs', '2')) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"timm-fmd train: error: cannot decode image '{bad}': UnidentifiedImageError")
    assert err.endswith('(fix or remove it, or pass --skip-corrupt) [in DataLoader worker process 0]\n')
    assert err.count('\n') == 1 and not (tmp_path / 'out' / 'run').exists()
    assert _cli(*_quick_args(data, tmp_path / 'out', '-j', '1', '--epochs', '2', '--skip-corrupt')) == 0
    out = capsys.readouterr().out
    assert out.count(f"warning: rank 0 skipped 1 unreadable image(s): ['{bad}']") == 1  # not once per epoch
    data_info = json.loads((tmp_path / 'out' / 'run' / 'results.json').read_text())['data']
    assert (data_info['train_size'], data_info['skipped_train_images']) == (23, 1)
    assert (data_info['val_size'], data_info['skipped_val_images']) == (6, 0)


def test_unreachable_hub_for_pretrained_weights_then_a_local_file(tiny_data, tmp_path, monkeypatch, capsys):
    """The Hub client offline with an empty cache fails as an unreachable Hub does, without the retries' wait."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'empty-cache'))
    args = _quick_args(tiny_data, tmp_path / 'out')
    assert _cli(*args, '--pretrained', 'test_efficientnet.r160_in1k') == 2
    err = capsys.readouterr().err
    assert err.startswith('timm-fmd train: error: --pretrained: cannot get the weights of test_efficientnet '
                          '(test_efficientnet.r160_in1k) from the Hugging Face Hub: LocalEntryNotFoundError: ')
    assert err.endswith('. HF_HUB_OFFLINE is set, so only the local cache is searched, and it does not hold them: '
                        'download them once with a connection and HF_HUB_OFFLINE unset, or pass a local weights file: '
                        '--pretrained PATH\n')
    assert 'set HF_HUB_OFFLINE=1' not in err and err.count('\n') == 1
    assert not (tmp_path / 'out' / 'run').exists()
    # the bare flag: the weights the model name's tag selects, named once (no "(True)")
    assert _cli(*args, '--model', 'test_efficientnet.r160_in1k', '--pretrained') == 2
    assert capsys.readouterr().err.startswith('timm-fmd train: error: --pretrained: cannot get the weights of '
                                              'test_efficientnet.r160_in1k from the Hugging Face Hub: ')
    torch.manual_seed(0)
    weights = tmp_path / 'weights.safetensors'
    save_file(timm.create_model('test_efficientnet', num_classes=1000).state_dict(), str(weights))
    assert _cli(*args, '--pretrained', str(weights)) == 0  # the advice: a local file (its classifier is reset)
    results = json.loads((tmp_path / 'out' / 'run' / 'results.json').read_text())
    assert results['pretrained'] == str(weights)


def test_killed_before_the_first_checkpoint(tiny_data, tmp_path, capsys):
    """A start killed before its first checkpoint leaves config.yaml and an empty checkpoints/ (what _started
    writes). --resume explains and gives a command; that command, or the same start again, goes through."""
    cfg = quick_config(tiny_data, tmp_path)
    run_dir = tmp_path / 'run'
    (run_dir / 'checkpoints').mkdir(parents=True)
    (run_dir / 'config.yaml').write_text(save_config(cfg))
    assert _cli('--resume', str(run_dir)) == 2
    assert capsys.readouterr().err == (
        f'timm-fmd train: error: --resume: {run_dir} stopped before its first checkpoint, so there is nothing to '
        f'resume; start it afresh with `timm-fmd train -c {run_dir / "config.yaml"}`\n')
    assert _cli('-c', str(run_dir / 'config.yaml')) == 0  # the advice
    assert (run_dir / 'results.json').is_file()
    shutil.rmtree(run_dir / 'checkpoints')  # again killed early; now the same start reuses the directory
    (run_dir / 'results.json').unlink()
    (run_dir / 'checkpoints').mkdir()
    assert fit(cfg)['global_steps'] == 6


def test_a_finished_run_then_the_resume_advice(tiny_data, tmp_path, capsys):
    args = _quick_args(tiny_data, tmp_path)
    assert _cli(*args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"run directory: {tmp_path / 'run'}"
    assert _cli(*args) == 2
    err = capsys.readouterr().err
    advice = f"`timm-fmd train --resume {tmp_path / 'run'}`"
    assert advice in err
    assert _cli('--resume', str(tmp_path / 'run'), '-c', str(tmp_path / 'run' / 'config.yaml')) == 2
    assert advice in capsys.readouterr().err  # --config with --resume points to the same command
    assert _cli('--resume', str(tmp_path / 'run'), '--epochs', '2') == 0  # the advice, with one more epoch
    assert json.loads((tmp_path / 'run' / 'results.json').read_text())['global_steps'] == 12


def test_a_directory_of_someone_elses_files_is_not_touched(tiny_data, tmp_path, capsys):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'notes.txt').write_text('mine')
    assert _cli(*_quick_args(tiny_data, tmp_path)) == 2
    assert capsys.readouterr().err.endswith('run already holds a run; it holds files timm-fmd did not write, or '
                                            'pass another --experiment\n')
    assert _cli(*_quick_args(tiny_data, tmp_path), '--experiment', 'other') == 0  # the advice
    assert (tmp_path / 'run' / 'notes.txt').read_text() == 'mine'


def test_diverged_loss_then_a_lower_learning_rate(tiny_data, tmp_path, capsys):
    args = _quick_args(tiny_data, tmp_path, '--log-interval', '1')
    assert _cli(*args, '--lr', '1e12') == 2
    err = capsys.readouterr().err
    assert err.startswith('timm-fmd train: error: training loss is ') and 'lower --lr' in err
    assert not (tmp_path / 'run').exists()
    assert _cli(*args) == 0  # the advice: --lr 0.05


def test_fmd_options_need_an_fmd_model(capsys):
    assert _cli('--model', 'resnet18.a1_in1k', '--fmd-prob', '0.2') == 2
    assert 'use --model fmd_resnet18.a1_in1k)' in capsys.readouterr().err
    assert _cli('--model', 'hf-hub:org/name', '--fmd-prob', '0.2') == 2
    assert 'use --model fmd_<its architecture> --pretrained hf-hub:org/name)' in capsys.readouterr().err


def test_data_errors_are_raised_as_data_errors(tmp_path):
    data = make_image_folder(tmp_path / 'data', {'train': 8, 'val': 2})
    (data / 'train' / 'circle' / '000.png').write_bytes(b'')
    with pytest.raises(DataError):
        fit(quick_config(data, tmp_path / 'out'))
    assert not (tmp_path / 'out' / 'run').exists()


def test_a_misspelt_model_is_named_before_anything_is_read(tmp_path, capsys):
    """The factory's message and suggestions, before the (missing) data is looked at or a directory written."""
    with pytest.raises(ValueError) as factory_error:
        timm_fmd.create_model('fmd_resnt18')
    assert _cli('--data-dir', str(tmp_path / 'missing'), '--model', 'fmd_resnt18', '--output', str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err == f'timm-fmd train: error: --model: {factory_error.value}\n'
    assert err.startswith("timm-fmd train: error: --model: unknown model 'fmd_resnt18'; did you mean fmd_resnet18, ")
    assert list(tmp_path.iterdir()) == []


try:  # the HTTP library of the installed huggingface_hub: httpx2 since 2.x, httpx in 1.x
    import httpx2 as _http
except ImportError:
    import httpx as _http


@pytest.mark.parametrize('error, advice', [
    (LocalEntryNotFoundError('An error happened while trying to locate the file on the Hub and we cannot find the '
                             'requested files in the local cache.'),
     'The Hub cannot be reached and the local cache does not hold them: check the connection (and HF_ENDPOINT)'),
    (HfHubHTTPError('404 Client Error.', response=_http.Response(404, request=_http.Request('HEAD', 'http://hub'))),
     'The Hub answered HTTP 404: check the name (timm.list_pretrained()) and, for a private or gated repository, '
     'HF_TOKEN'),
])
def test_the_hub_failure_advice_fits_the_situation(monkeypatch, error, advice):
    """Online, the client falls back to its cache by itself: the advice is never to set HF_HUB_OFFLINE."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    message = _hub_failure('fmd_resnet50.a1_in1k', True, error)
    first = str(error).rstrip('.')
    assert message == (f'--pretrained: cannot get the weights of fmd_resnet50.a1_in1k from the Hugging Face Hub: '
                       f'{type(error).__name__}: {first}. {advice}, or pass a local weights file: --pretrained PATH')


def test_interrupted_after_a_checkpoint_then_the_resume_advice(tiny_data, tmp_path, capsys, monkeypatch):
    """Ctrl-C (a KeyboardInterrupt raised where SIGINT would land) after epoch 1's checkpoint: one line, status 130,
    the run kept; the command it gives finishes the run."""
    end_epoch = loop._end_epoch

    def end_then_interrupt(run, pos, epoch, row):
        end_epoch(run, pos, epoch, row)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, '_end_epoch', end_then_interrupt)
    assert _cli(*_quick_args(tiny_data, tmp_path, '--epochs', '2')) == 130
    run_dir = tmp_path / 'run'
    assert capsys.readouterr().err == (f'timm-fmd train: interrupted; continue the run from its last checkpoint with '
                                       f'`timm-fmd train --resume {run_dir}`\n')
    monkeypatch.setattr(loop, '_end_epoch', end_epoch)
    assert _cli('--resume', str(run_dir)) == 0  # the advice
    assert json.loads((run_dir / 'results.json').read_text())['global_steps'] == 12


def test_interrupted_before_the_first_checkpoint_then_the_same_command(tiny_data, tmp_path, capsys, monkeypatch):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, 'train_one_epoch', interrupt)
    args = _quick_args(tiny_data, tmp_path)
    assert _cli(*args) == 130
    assert capsys.readouterr().err == ('timm-fmd train: interrupted before the first checkpoint, so nothing was kept; '
                                       'run the same command again to start afresh\n')
    assert not (tmp_path / 'run').exists()
    monkeypatch.undo()
    assert _cli(*args) == 0  # the advice


def test_sigint_prints_one_line_and_exits_130(tmp_path):
    """A real Ctrl-C to `python -m timm_fmd train` once a checkpoint exists (a step line is printed after it)."""
    proc = subprocess.Popen([sys.executable, '-m', 'timm_fmd', 'train', '--model', 'test_efficientnet', '--img-size',
                             '16', '--epochs', '50', '-j', '0', '--log-interval', '1', '--checkpoint-interval', '1',
                             '--output', str(tmp_path), '--experiment', 'run'], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TIMM_FMD_CACHE=str(tmp_path / 'cache'), OMP_NUM_THREADS='1'),
                            # a suite started in the background (`cmd &`) inherits SIGINT ignored, and Python then
                            # installs no KeyboardInterrupt handler: give the run the default disposition
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:
            if line.startswith('epoch 1/50 [2/'):  # step 1's checkpoint is written before step 2 is reported
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err == (f"timm-fmd train: interrupted; continue the run from its last checkpoint with "
                   f"`timm-fmd train --resume {tmp_path / 'run'}`\n")
    assert (tmp_path / 'run' / 'checkpoints' / 'last.state.pt').is_file()


def test_eval_takes_a_run_directory_and_names_what_it_expects(tiny_data, tmp_path, capsys):
    assert _cli(*_quick_args(tiny_data, tmp_path)) == 0
    run_dir = tmp_path / 'run'
    capsys.readouterr()
    assert cli.main(['eval', '--checkpoint', str(run_dir)]) == 0
    from_dir = json.loads(capsys.readouterr().out)
    assert cli.main(['eval', '--checkpoint', str(run_dir / 'checkpoints' / 'best.safetensors')]) == 0
    assert json.loads(capsys.readouterr().out) == from_dir  # the same file, reported by its path
    assert from_dir['checkpoint'] == str(run_dir / 'checkpoints' / 'best.safetensors')
    expected = ('expected a run directory (evaluated at its checkpoints/best.safetensors) or '
                'RUN_DIR/checkpoints/<best|last>.safetensors\n')
    assert cli.main(['eval', '--checkpoint', str(tmp_path)]) == 2  # the output folder, one level too high
    assert capsys.readouterr().err == (f'timm-fmd eval: error: --checkpoint: {tmp_path} is not a run directory (it '
                                       f'has no config.yaml); {expected}')
    stray = shutil.copyfile(run_dir / 'checkpoints' / 'best.safetensors', tmp_path / 'best.safetensors')
    assert cli.main(['erc', '--checkpoint', str(stray)]) == 2
    assert capsys.readouterr().err == (
        f'timm-fmd erc: error: --checkpoint: {stray} is not a .safetensors file in the checkpoints/ folder of a run '
        f'directory (whose config.yaml rebuilds the model and transforms); {expected}')
    (run_dir / 'checkpoints' / 'best.safetensors').unlink()  # as before the first validation
    assert cli.main(['eval', '--checkpoint', str(run_dir)]) == 2
    assert capsys.readouterr().err == (
        f"timm-fmd eval: error: --checkpoint: {run_dir} has no checkpoints/best.safetensors yet (written when its first "
        f"epoch is validated); its latest weights: --checkpoint {run_dir / 'checkpoints' / 'last.safetensors'}\n")


def test_data_on_device_says_where_the_crop_mode_came_from(tiny_data, tmp_path, capsys):
    """rrc is the folder default: the refusal says so and what to pass; that option then goes through."""
    args = _quick_args(tiny_data, tmp_path, '--data-on-device')
    assert _cli(*args) == 2
    assert capsys.readouterr().err == (
        "timm-fmd train: error: --train-crop-mode: got 'rrc' (the default), which --data-on-device does not support "
        "(images are stored at the input size: only the pad crop mode); pass --train-crop-mode pad\n")
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text('train_crop_mode: rkrc\nreprob: 0.25\n')
    assert _cli('-c', str(recipe), *args) == 2
    assert capsys.readouterr().err == (  # the first refused option, from the recipe
        f"timm-fmd train: error: --reprob: got 0.25 (set by {recipe}), which --data-on-device does not support (no "
        f"batched random erasing on the device); pass --reprob 0\n")
    assert _cli(*args, '--train-crop-mode', 'rrc') == 2  # typed: no origin to name
    assert "--train-crop-mode: got 'rrc', which --data-on-device" in capsys.readouterr().err
    assert _cli(*args, '--train-crop-mode', 'pad') == 0  # the advice


def test_a_published_recipe_needs_the_data_and_weights_given(tiny_data, tmp_path, capsys):
    """A published train_config.yaml names the data set and 'a local weights file' instead of paths: the error says
    so and gives the command, which then trains."""
    recipe = tmp_path / 'published' / 'train_config.yaml'
    recipe.parent.mkdir()
    fields = quick_config(tiny_data, tmp_path, data_dir='a local image folder', pretrained='a local weights file')
    recipe.write_text(save_config(fields))
    assert _cli('-c', str(recipe)) == 2
    assert capsys.readouterr().err == (
        f"timm-fmd train: error: --data-dir: {recipe} sets data_dir 'a local image folder', which does not exist here "
        f"(a published train_config.yaml names the data set, not a local path); give your copy of the data: "
        f"`timm-fmd train -c {recipe} --data-dir YOUR_COPY`\n")
    assert not (tmp_path / 'run').exists()
    assert _cli('-c', str(recipe), '--data-dir', str(tiny_data)) == 2  # the advice; then the weights
    assert capsys.readouterr().err == (
        f"timm-fmd train: error: --pretrained: {recipe} sets pretrained 'a local weights file', which is not a "
        f"weights file here, an hf-hub:org/repo source or a timm arch.tag (a published train_config.yaml does not "
        f"name local files); give the weights: `timm-fmd train -c {recipe} --pretrained PATH`, or start from scratch: "
        f"--pretrained false\n")
    assert _cli('-c', str(recipe), '--data-dir', str(tiny_data), '--pretrained', 'false') == 0  # that advice
    recipe.write_text(save_config(dataclasses.replace(fields, data_dir=str(tiny_data),
                                                      pretrained='<local path removed>')))
    assert _cli('-c', str(recipe), '--experiment', 'again') == 2
    assert f"--pretrained: {recipe} sets pretrained '<local path removed>', which" in capsys.readouterr().err


def test_a_run_that_is_all_warm_up_says_so(tiny_data, tmp_path, capsys):
    """The digits recipe with --epochs 1: its one epoch is the warm-up, the learning rate never reaches --lr."""
    fit(quick_config(tiny_data, tmp_path, epochs=1, warmup_epochs=1, warmup_lr=0.0))
    assert ('warning: all 1 epoch(s) are warm-up (--warmup-epochs 1): the learning rate never reaches 0.05; pass more '
            '--epochs, or --warmup-epochs 0') in capsys.readouterr().out
    fit(quick_config(tiny_data, tmp_path, experiment='two', epochs=2, warmup_epochs=1))
    assert 'warm-up' not in capsys.readouterr().out
