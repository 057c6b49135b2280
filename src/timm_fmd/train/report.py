"""What a run reports: progress bar or log lines, metrics.csv, results.json, curves, TensorBoard.

The curves follow Figure 1 of Tang et al. (AAAI 2020): accuracy and loss per epoch, training
dashed and validation solid, so that the train-validation gap a regulariser closes is visible;
:func:`plot_comparison` puts an FMD run and its baseline on one figure.
"""
from __future__ import annotations

import csv
import io
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .checkpoint import atomic_path, atomic_write

__all__ = ['METRIC_COLUMNS', 'MetricsLog', 'write_json', 'plot_curves', 'plot_comparison', 'Progress', 'hardware',
           'tensorboard_writer']

METRIC_COLUMNS = ('epoch', 'step', 'lr', 'fmd_prob', 'train_loss', 'train_top1', 'train_top5', 'val_loss',
                  'val_top1', 'val_top5', 'images_per_sec', 'epoch_time_s', 'erc')


# ------------------------------------------------------------------------------------------- files
def _cell(value: Any) -> str:
    if value is None:
        return ''
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back to the same float
    return str(value)


def _parse(value: str) -> Optional[float]:
    return None if value == '' else float(value)


class MetricsLog:
    """The rows of ``metrics.csv`` (one per finished epoch), rewritten atomically on every append."""

    def __init__(self, path: Union[str, Path], rows: Optional[List[Dict[str, Any]]] = None, write: bool = True):
        self.path, self.rows, self.write = Path(path), list(rows or []), write

    @classmethod
    def read(cls, path: Union[str, Path], max_epoch: Optional[int] = None, write: bool = True) -> 'MetricsLog':
        """Load an existing file, keeping epochs ``<= max_epoch`` (later rows belong to lost work).

        With ``write=False`` (ranks other than 0) rows are kept in memory only.
        """
        rows = []
        if Path(path).is_file():
            with open(path, newline='') as f:
                for raw in csv.DictReader(f):
                    row = {k: _parse(raw.get(k) or '') for k in METRIC_COLUMNS}
                    row['epoch'], row['step'] = int(row['epoch']), int(row['step'])
                    if max_epoch is None or row['epoch'] <= max_epoch:
                        rows.append(row)
        return cls(path, rows, write)

    def append(self, row: Dict[str, Any]) -> None:
        missing = set(METRIC_COLUMNS) - set(row)
        if missing:
            raise ValueError(f'metrics row lacks {sorted(missing)}')
        self.rows.append({k: row[k] for k in METRIC_COLUMNS})
        if not self.write:
            return
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator='\n')
        writer.writerow(METRIC_COLUMNS)
        writer.writerows([[_cell(r[k]) for k in METRIC_COLUMNS] for r in self.rows])
        atomic_write(self.path, buf.getvalue())


def write_json(path: Union[str, Path], obj: Any) -> None:
    """``json.dump`` atomically (NaN/inf become null: strict JSON)."""
    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o
    atomic_write(path, json.dumps(clean(obj), indent=2) + '\n')


# ------------------------------------------------------------------------------------------ curves
def _rows(run: Union[str, Path, Sequence[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    if isinstance(run, (str, Path)):
        path = Path(run)
        return MetricsLog.read(path / 'metrics.csv' if path.is_dir() else path).rows
    return list(run)


def _draw(axes: Any, rows: List[Dict[str, Any]], label: str, color: Optional[str]) -> None:
    epochs = [r['epoch'] for r in rows]
    for ax, metric in zip(axes, ('top1', 'loss')):
        for split, style in (('train', '--'), ('val', '-')):
            values = [r[f'{split}_{metric}'] for r in rows]
            if any(v is not None for v in values):
                ax.plot(epochs, [math.nan if v is None else v for v in values], style, color=color,
                        label=f'{label} {split}'.strip())


def _figure(runs: List[tuple], path: Union[str, Path], title: str) -> None:
    # The Agg canvas directly, not pyplot: no global backend switch inside a user's session.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4), layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for rows, label, color in runs:
        _draw(axes, rows, label, color)
    axes[1].set_yscale('log')  # early epochs' validation loss can be orders of magnitude above the rest
    for ax, ylabel in zip(axes, ('top-1 accuracy (%)', 'loss (log scale)')):
        ax.set_xlabel('epoch')
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize='small')
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=100)


def plot_curves(run: Union[str, Path, Sequence[Dict[str, Any]]], path: Union[str, Path], title: str = '') -> None:
    """Training (dashed) and validation (solid) top-1 and loss per epoch, as a PNG at ``path``.

    ``run`` is a run directory, a ``metrics.csv`` path or a list of metric rows.
    """
    _figure([(_rows(run), '', 'tab:blue')], path, title)


def plot_comparison(runs: Sequence[Union[str, Path]], path: Union[str, Path],
                    labels: Optional[Sequence[str]] = None, title: str = '') -> None:
    """Several runs (e.g. an FMD run and its baseline) on one figure, one colour per run."""
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f'labels: got {len(labels)} for {len(runs)} runs')
    labels = labels or [Path(r).name for r in runs]
    colors = ('tab:red', 'tab:blue', 'tab:green', 'tab:orange', 'tab:purple', 'tab:brown')
    _figure([(_rows(r), label, colors[i % len(colors)]) for i, (r, label) in enumerate(zip(runs, labels))],
            path, title)


# ---------------------------------------------------------------------------------------- progress
class Progress:
    """One epoch's progress: a live bar on a terminal, a plain line per update otherwise, or nothing.

    On a terminal, tqdm's bar moves every optimiser step (:meth:`advance`, host-side only) and shows
    images/s and the epoch's ETA; the statistics after it change at each :meth:`update`. Elsewhere
    (a log file, a pipe) each :meth:`update` prints one line with the same numbers. ``enabled`` is
    false on ranks other than 0.

    Args:
        total: optimiser steps in the epoch.
        desc: the prefix, e.g. ``'epoch 3/12'``.
        images_per_step: images of one optimiser step over all processes (the rate's unit).
        tty: force the terminal (True) or line (False) form; default: ``sys.stdout.isatty()``.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, tty: Optional[bool] = None,
                 images_per_step: int = 1, start: int = 0):
        self.total, self.desc, self.enabled, self.images_per_step = total, desc, enabled, images_per_step
        self.done, self.first, self.start = start, start, time.perf_counter()
        self.bar = None
        if enabled and (sys.stdout.isatty() if tty is None else tty):
            from tqdm import tqdm
            self.bar = tqdm(total=total * images_per_step, initial=start * images_per_step, desc=desc, unit='img',
                            dynamic_ncols=True, leave=False, file=sys.stdout, smoothing=0.1)

    def advance(self, done: int) -> None:
        """``done`` of ``total`` steps are finished (the bar moves; no line is printed)."""
        if self.bar is not None:
            self.bar.update((done - self.done) * self.images_per_step)
        self.done = done

    def update(self, done: int, **stats: Any) -> None:
        """``done`` steps are finished, with ``stats`` (already formatted values) to show."""
        if not self.enabled:
            return
        self.advance(done)
        if self.bar is not None:
            self.bar.set_postfix(stats, refresh=True)
            return
        text = ' '.join(f'{k} {v}' for k, v in stats.items())
        print(f'{self.desc} [{done}/{self.total}] {text} eta {self._eta()}', flush=True)

    def _eta(self) -> str:
        elapsed, steps = time.perf_counter() - self.start, self.done - self.first
        if steps <= 0:
            return '?'
        return f'{elapsed / steps * (self.total - self.done):.0f}s'

    def write(self, message: str) -> None:
        """Print ``message`` on its own line (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def hardware(device: Any, world_size: int) -> Dict[str, Any]:
    """What a run trained on, for results.json and the model card: the device kind and model name, the
    number of processes and torch's CPU threads per process (CPU results depend on the thread count)."""
    kind = getattr(device, 'type', str(device))
    if kind == 'cuda':
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open('/proc/cpuinfo') as f:
                name = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), name)
        except OSError:
            pass
    return dict(device=kind, name=name, processes=world_size, threads=torch.get_num_threads())


def tensorboard_writer(run_dir: Union[str, Path]) -> Any:
    """A TensorBoard ``SummaryWriter`` into ``run_dir/tensorboard``, or ``None`` without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(Path(run_dir) / 'tensorboard'))
