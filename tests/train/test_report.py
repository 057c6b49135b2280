import json
import math
import re

import pytest
import torch
from PIL import Image

from timm_fmd.train.report import (METRIC_COLUMNS, MetricsLog, Progress, hardware, plot_comparison, plot_curves,
                                   write_json)


def row(epoch, **values):
    base = {k: None for k in METRIC_COLUMNS}
    base.update(epoch=epoch, step=10 * epoch, lr=0.1, train_loss=1.0 / epoch, val_loss=1.2 / epoch,
                train_top1=50.0 + epoch, val_top1=45.0 + epoch, train_top5=90.0, val_top5=88.0 + 1 / 3,
                images_per_sec=100.0, epoch_time_s=1.5)
    base.update(values)
    return base


def test_metrics_csv_header_empty_cells_and_exact_floats(tmp_path):
    log = MetricsLog(tmp_path / 'metrics.csv')
    log.append(row(1))
    log.append(row(2, train_top1=None, train_top5=None, fmd_prob=0.05))
    lines = (tmp_path / 'metrics.csv').read_text().splitlines()
    assert lines[0] == ','.join(METRIC_COLUMNS) == ('epoch,step,lr,fmd_prob,train_loss,train_top1,train_top5,val_loss,'
                                                    'val_top1,val_top5,images_per_sec,epoch_time_s,erc')
    assert lines[1].split(',')[3] == '' and lines[2].split(',')[5:7] == ['', '']
    back = MetricsLog.read(tmp_path / 'metrics.csv')
    assert back.rows == log.rows  # floats survive the text round trip exactly
    assert [r['epoch'] for r in MetricsLog.read(tmp_path / 'metrics.csv', max_epoch=1).rows] == [1]
    with pytest.raises(ValueError, match='lacks'):
        log.append({'epoch': 3})


def test_rows_stay_in_memory_when_not_writing(tmp_path):
    log = MetricsLog(tmp_path / 'metrics.csv', write=False)
    log.append(row(1))
    assert len(log.rows) == 1 and not (tmp_path / 'metrics.csv').exists()


def test_write_json_is_strict(tmp_path):
    write_json(tmp_path / 'r.json', {'a': math.nan, 'b': [1.5, math.inf], 'c': 'x'})
    assert json.loads((tmp_path / 'r.json').read_text()) == {'a': None, 'b': [1.5, None], 'c': 'x'}


def test_curves_and_comparison_are_pngs(tmp_path):
    for name in ('fmd', 'baseline'):
        log = MetricsLog(tmp_path / name / 'metrics.csv')
        for epoch in (1, 2, 3):
            log.append(row(epoch, train_top1=None if name == 'fmd' else 60.0))
    plot_curves(tmp_path / 'fmd', tmp_path / 'curves.png', title='fmd')
    plot_comparison([tmp_path / 'fmd', tmp_path / 'baseline'], tmp_path / 'both.png', labels=['FMD', 'baseline'])
    for png in ('curves.png', 'both.png'):
        with Image.open(tmp_path / png) as img:
            assert img.format == 'PNG' and img.size == (1000, 400)
    with pytest.raises(ValueError, match='labels'):
        plot_comparison([tmp_path / 'fmd'], tmp_path / 'x.png', labels=['a', 'b'])


def test_progress_lines_without_a_terminal(capsys):
    progress = Progress(4, 'epoch 1/2', tty=False, images_per_step=8)
    progress.advance(1)  # a step between updates prints nothing
    progress.update(2, loss='0.5000')
    progress.write('warning: something')
    progress.close()
    silent = Progress(4, 'epoch 1/2', enabled=False)  # ranks other than 0
    silent.update(4, loss='0.1')
    silent.write('not shown')
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and re.fullmatch(r'epoch 1/2 \[2/4\] loss 0\.5000 eta \d+s', lines[0])
    assert lines[1] == 'warning: something'


def test_progress_bar_on_a_terminal(capsys):
    """tqdm's bar: images done of the epoch's images, images/s, the ETA, then the latest statistics."""
    progress = Progress(4, 'epoch 1/2', tty=True, images_per_step=8)
    progress.advance(1)
    progress.update(2, loss='0.2500')
    progress.write('warning: something')
    progress.close()
    out = capsys.readouterr().out
    assert re.search(r'epoch 1/2: +50%\|[^|]*\| 16/32 \[[0-9:]+<[0-9:?]+, +[0-9.?]+img/s, loss=0\.2500\]', out), out
    assert '\rwarning: something' in out or '\nwarning: something' in out


def test_progress_resumed_mid_epoch_counts_from_there(capsys):
    progress = Progress(10, 'epoch 1/1', tty=True, images_per_step=4, start=6)
    progress.update(7, loss='1.0')
    progress.close()
    assert re.search(r' 28/40 \[', capsys.readouterr().out)


def test_hardware_names_the_device(monkeypatch):
    cpu = hardware(torch.device('cpu'), 1)
    assert cpu['device'] == 'cpu' and cpu['name'] and (cpu['processes'], cpu['threads']) == (1, torch.get_num_threads())
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: f'NVIDIA H200 ({device})')
    gpu = hardware(torch.device('cuda', 1), 4)
    assert gpu == dict(device='cuda', name='NVIDIA H200 (cuda:1)', processes=4, threads=torch.get_num_threads())
