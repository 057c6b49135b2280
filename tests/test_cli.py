import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from timm_fmd import FMDSettings, cli


def test_commands_and_help(capsys):
    parser = cli.build_parser()
    assert {'train', 'eval'} <= set(parser._subparsers._group_actions[0].choices)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(['train', '--help'])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ('--model', '--pretrained', '--data-dir', '--batch-size', '--decay-milestones', '--fmd-prob',
                   '--fmd-ramp-epochs', '--model-kwargs', '--torchcompile', '--resume', '--skip-corrupt'):
        assert option in out
    assert cli.main([]) == 2  # no command: usage


def test_a_command_is_one_function(capsys, monkeypatch):
    monkeypatch.setattr(cli, '_COMMANDS', list(cli._COMMANDS))

    @cli.command('hello', 'say hello', cli.arg('name'), cli.arg('--times', type=int, default=1))
    def hello(args):
        print(' '.join(['hello', args.name] * args.times))
        return 0

    assert cli.main(['hello', 'fmd', '--times', '2']) == 0
    assert capsys.readouterr().out == 'hello fmd hello fmd\n'


def test_user_errors_print_one_line_and_exit_2(capsys, tmp_path):
    assert cli.main(['train', '--epochs', '0', '--output', str(tmp_path)]) == 2
    assert capsys.readouterr().err == 'timm-fmd train: error: --epochs: got 0, expected an integer >= 1\n'
    assert cli.main(['eval', '--checkpoint', str(tmp_path / 'x.safetensors')]) == 2
    assert capsys.readouterr().err == (f"timm-fmd eval: error: --checkpoint: {tmp_path / 'x.safetensors'} does not "
                                       f"exist; expected a run directory (evaluated at its checkpoints/best.safetensors)"
                                       f" or RUN_DIR/checkpoints/<best|last>.safetensors\n")


def test_train_and_eval_end_to_end_through_python_m(tmp_path):
    """``python -m timm_fmd`` (what torchrun runs): train the embedded digits for one short epoch, then
    evaluate the best checkpoint from the command line."""
    env_args = dict(capture_output=True, text=True, timeout=180,
                    env=dict(os.environ, TIMM_FMD_CACHE=str(tmp_path / 'cache'), OMP_NUM_THREADS='1'))
    train = subprocess.run([sys.executable, '-m', 'timm_fmd', 'train', '--model', 'test_efficientnet',
                            '--img-size', '16', '--epochs', '1', '-j', '0', '--output', str(tmp_path),
                            '--experiment', 'digits'], **env_args)
    assert train.returncode == 0, train.stderr
    lines = train.stdout.splitlines()
    assert '\r' not in train.stdout  # not a terminal: plain lines, no bar
    assert re.fullmatch(r'epoch 1/1 \[22/22\] step 22 loss \S+ lr \S+ img_s \d+ top1 \S+ eta 0s', lines[-4]), lines
    results = json.loads((tmp_path / 'digits' / 'results.json').read_text())
    best = results['best']['val_top1']
    assert lines[-2:] == [f'best val top-1 {best:.2f}% at epoch 1 of 1; final {best:.2f}%',
                          f"run directory: {tmp_path / 'digits'}"]
    evaluated = subprocess.run([sys.executable, '-m', 'timm_fmd', 'eval', '--checkpoint',
                                str(tmp_path / 'digits' / 'checkpoints' / 'best.safetensors')], **env_args)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)['val_top1'] == results['best']['val_top1']


def test_progress_bar_in_a_terminal(tmp_path):
    """Under a pseudo-terminal the epoch is a live tqdm bar (images, images/s, ETA), redrawn in place."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 40, 150, 0, 0))  # 150 columns
    proc = subprocess.Popen([sys.executable, '-m', 'timm_fmd', 'train', '--model', 'test_efficientnet', '--img-size',
                             '16', '--epochs', '1', '-j', '0', '--train-subset', '256', '-b', '32', '--log-interval',
                             '2', '--output', str(tmp_path), '--experiment', 'tty'], stdout=slave, stderr=slave,
                            env=dict(os.environ, TIMM_FMD_CACHE=str(tmp_path / 'cache'), OMP_NUM_THREADS='1'))
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=180) == 0
    text = b''.join(chunks).decode()
    bars = re.findall(r'epoch 1/1: +(\d+)%\|[^|]*\| (\d+)/256 \[[0-9:]+<[0-9:?]+, +[0-9.?]+img/s', text)
    assert ('100', '256') in bars and len({done for _, done in bars}) >= 3, text  # it moved, step by step
    assert '\r' in text and 'loss=' in text and 'run directory: ' in text


def test_describe_prints_the_site_table(capsys):
    assert cli.main(['describe', 'resnet18', '--fmd-prob', '0.05', '--fmd-stages', '-1', '--fmd-shared-mask',
                     '--input-size', '3', '64', '64']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == 'ResNet: 7 FMD sites at input (3, 64, 64), ramp 0/0 steps, gamma=1.0'
    assert 'layer4.0.drop_block' in lines[3] and '0.05/0.05' in lines[3] and '7 shared' in lines[3]
    assert lines[-1].startswith('expected: ') and 'last: the fraction it distorted in its last training forward' in \
        lines[-1]
    assert cli.main(['describe', 'resnet18', '--input-size', '3', '64', '64']) == 0  # no FMD asked for: off
    assert capsys.readouterr().out == ('ResNet: no FMD sites (FMD is OFF)\nresnet18 is a plain timm name: `timm-fmd '
                                       'describe fmd_resnet18` (or any --fmd-* option) shows where FMD goes, with the '
                                       'registry\'s defaults for the options left unset\n')
    assert cli.main(['describe', 'fmd_resnet18']) == 0  # the advice: the registry's defaults
    twin = capsys.readouterr().out
    assert twin.startswith('ResNet: 14 FMD sites at input (3, 224, 224), ramp 0/0 steps, gamma=1.0\n')
    assert cli.main(['describe', 'resnet18', '--fmd-prob', str(FMDSettings().prob)]) == 0  # an --fmd-* option
    assert capsys.readouterr().out == twin  # at its default value: the same sites as the twin
    assert cli.main(['describe', 'resnet5O']) == 2
    assert 'did you mean resnet50' in capsys.readouterr().err


def test_erc_of_a_saved_run(tmp_path, capsys, monkeypatch):
    from timm_fmd.train import config_from_dict, fit, load_yaml
    from timm_fmd.train.config import DIGITS_RECIPE
    monkeypatch.setenv('TIMM_FMD_CACHE', str(tmp_path / 'cache'))
    fit(config_from_dict(dict(load_yaml(DIGITS_RECIPE), epochs=1, workers=0, output=str(tmp_path), experiment='run',
                              train_subset=256, batch_size=32)))  # FMD in the last stage's convs
    checkpoint = str(tmp_path / 'run' / 'checkpoints' / 'best.safetensors')
    capsys.readouterr()  # the training's own progress lines
    assert cli.main(['erc', '--checkpoint', checkpoint, '--batches', '2', '--draws', '16']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == 'ERC at batch size 32 (2 batches x 16 draws)'
    assert out[1].startswith('stages.2.0.conv2') and ' +- ' in out[1]  # the layers after the FMD sites
    assert cli.main(['erc', '--checkpoint', str(tmp_path / 'run'), '--batches', '2', '--draws', '16']) == 0
    assert capsys.readouterr().out.splitlines() == out  # a run directory: its best checkpoint
