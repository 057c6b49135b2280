"""``fit(cfg)``: train and validate a timm model, with or without Feature Map Distortion.

Read top-down: :func:`fit` chooses the run directory, builds everything (:func:`_build`: data,
model and weights are checked before any file is written), resumes if asked, creates the directory
(:func:`_start`; a start that fails before its first checkpoint removes it again), then runs epochs
of :func:`train_one_epoch` and :func:`evaluate`, checkpointing as it
goes. The FMD probability ramp (Tang et al., Experiments: p rises linearly from 0, following
DropBlock) counts the optimiser's steps by itself (see ``timm_fmd.ops.schedule``); a resumed run puts
it back at its global step with ``timm_fmd.set_schedule_step``.

Exact resume: a checkpoint holds the weights, optimiser, scheduler, scaler and EMA, each rank's
global RNG states and running epoch sums, and the position (epoch, micro-batches consumed, global
step). Data order and augmentation are functions of ``(seed, epoch, sample)`` (see ``data.py``),
so skipping the consumed samples reproduces the rest of the epoch bit for bit on the same
hardware.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.layers import convert_sync_batchnorm
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad

import timm_fmd
from . import distributed as D
from .checkpoint import (atomic_write, capture_rng, load_checkpoint, restore_rng, save_checkpoint, save_weights,
                         weights_for_saving)
from .config import FMD_DEFAULTS, FMD_FIELDS, TrainConfig, resolved_lr, save_config, validate
from .data import Loaders, Splits, build_mixup, build_splits, loaders_for_model, steps_per_epoch
from .device_data import device_loaders
from .evaluate import autocast, evaluate, hits
from .graphs import CapturableEma, GraphedStep, check_graph_config, optimizer_kwargs
from .model import base_architecture, create_model, is_fmd, pretrained_source
from .rademacher import erc_layers, layer_erc
from .report import MetricsLog, Progress, hardware, plot_curves, tensorboard_writer, write_json

__all__ = ['fit', 'train_one_epoch', 'Interrupted']


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # micro-batches consumed in the current epoch
    global_step: int = 0  # optimiser steps
    best: Optional[Dict[str, float]] = None
    sums: List[float] = field(default_factory=lambda: [0.0] * 4)  # this rank's loss*n, top1, top5 hits, n
    epoch_train_time: float = 0.0  # seconds of the current epoch's training so far
    erc: Optional[Dict[str, Dict[str, float]]] = None  # the last ERC estimate per layer (--erc-every)
    train_time: float = 0.0  # training seconds of finished epochs
    train_images: int = 0  # images trained on in finished epochs (all ranks)
    wall_time: float = 0.0  # wall seconds of earlier sessions
    skipped: set = field(default_factory=set)  # this rank's training images --skip-corrupt skipped so far
    val_images: int = 0  # images the last validation evaluated (all ranks; unreadable ones skipped)


@dataclass
class Run:
    """Everything a run builds once."""

    cfg: TrainConfig
    env: D.DistEnv
    run_dir: Path
    splits: Splits
    loaders: Loaders
    model: nn.Module  # the plain model (FMD schedule, checkpoints)
    train_model: nn.Module  # DDP and/or compiled wrapper used for training steps
    ema: Optional[ModelEmaV3]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    mixup: Any
    autocast: Callable[[], Any]
    steps_per_epoch: int
    started: float = field(default_factory=time.time)
    graph: Optional[GraphedStep] = None  # --cuda-graph: the captured training step

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped :func:`fit`; ``str()`` says what the run kept and the command that goes on from it
    (empty on ranks other than 0)."""


def fit(cfg: TrainConfig) -> Dict[str, Any]:
    """Train ``cfg.model`` as configured; write the run directory; return the results dict.

    Raises :class:`Interrupted` (a ``KeyboardInterrupt``) on Ctrl-C, after removing a run directory that has
    no checkpoint yet."""
    cfg = validate(cfg)
    env = D.setup(cfg.device)
    run = None
    try:
        run = _build(cfg, env, _run_dir(cfg, env))  # data, model, weights: all checked before any file is written
        pos = _resume(run) if cfg.resume else Position()
        if not cfg.resume:
            _seed(cfg.seed + env.rank)  # identical init above, then one FMD-mask stream per rank
        timm_fmd.set_schedule_step(run.model, pos.global_step)  # the optimiser's steps advance it from here
        metrics = MetricsLog.read(run.run_dir / 'metrics.csv', max_epoch=pos.epoch, write=env.is_main)
        tb = None
        if env.is_main:
            _start(run)
            tb = tensorboard_writer(run.run_dir)
        for epoch in range(pos.epoch, cfg.epochs):
            epoch_start = time.perf_counter() - pos.epoch_train_time
            row = train_one_epoch(run, pos, epoch)
            row.update(evaluate(run.eval_model, run.loaders.val, env, run.autocast, cfg.channels_last))
            pos.val_images = row.pop('val_images')
            row['erc'] = _erc(run, pos, epoch)
            D.assert_in_sync(run.model, env)
            row['epoch_time_s'] = time.perf_counter() - epoch_start
            metrics.append(row)
            _end_epoch(run, pos, epoch, row)
            if env.is_main:
                plot_curves(metrics.rows, run.run_dir / 'curves.png', title=cfg.model)  # published: no run name
                _log_epoch(tb, row)
        results = _results(run, pos, metrics.rows)
        if env.is_main:
            write_json(run.run_dir / 'results.json', results)
            if tb is not None:
                tb.close()
            _log_end(run, results)
        return results
    except BaseException as e:
        if run is not None and env.is_main:
            _remove_unstarted(run)
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, Interrupted):
            raise Interrupted(_interruption(cfg, run) if env.is_main else '') from None
        raise
    finally:
        D.cleanup(env)


# ------------------------------------------------------------------------------------------- set-up
# What a run directory holds before its first checkpoint: a directory of only these is an unstarted run.
_RUN_FILES = frozenset({'config.yaml', 'checkpoints', 'metrics.csv', 'curves.png', 'tensorboard'})


def _first_checkpoint(run_dir: Path) -> Path:
    return run_dir / 'checkpoints' / 'last.state.pt'


def _unstarted(run_dir: Path) -> bool:
    """A run directory that a start which failed or was killed left before its first checkpoint."""
    return (run_dir.is_dir() and not _first_checkpoint(run_dir).exists()
            and {p.name for p in run_dir.iterdir()} <= _RUN_FILES)


def _run_dir(cfg: TrainConfig, env: D.DistEnv) -> Path:
    """The run directory: ``--resume``'s, or a free ``<output>/<experiment>`` chosen by rank 0.

    Nothing is created here (see :func:`_start`): a start that fails while checking the data, the
    model or its weights leaves no directory behind. An ``--experiment`` directory that an earlier
    start left without a first checkpoint is free and is started afresh.
    """
    if cfg.resume:
        run_dir = Path(cfg.resume)
        if not _first_checkpoint(run_dir).is_file():
            if _unstarted(run_dir) and (run_dir / 'config.yaml').is_file():
                raise FileNotFoundError(f'--resume: {run_dir} stopped before its first checkpoint, so there is '
                                        f'nothing to resume; start it afresh with `timm-fmd train -c '
                                        f'{run_dir / "config.yaml"}`')
            raise FileNotFoundError(f'--resume: {run_dir} holds no checkpoints/last.state.pt to resume from')
        return run_dir
    outcome = None
    if env.is_main:
        parent = Path(cfg.output)
        name = cfg.experiment or f"{cfg.model.replace('/', '_').replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = parent / name
        if cfg.experiment and run_dir.exists() and any(run_dir.iterdir()) and not _unstarted(run_dir):
            if _first_checkpoint(run_dir).is_file():
                advice = f'continue it with `timm-fmd train --resume {run_dir}`'
            else:
                advice = 'it holds files timm-fmd did not write'
            outcome = ('error', f'--experiment: {run_dir} already holds a run; {advice}, or pass another --experiment')
        else:
            for i in range(2, 1000):  # default names: never reuse a directory
                if cfg.experiment or not run_dir.exists():
                    break
                run_dir = parent / f'{name}-{i}'
            outcome = ('ok', str(run_dir))
    status, value = D.broadcast_object(outcome, env)
    if status == 'error':
        raise ValueError(value)
    return Path(value)


def _start(run: Run) -> None:
    """Create the run directory (rank 0) with its ``config.yaml``, once everything is built."""
    if not run.cfg.resume and run.run_dir.exists():  # an unstarted run's leftovers (checked in _run_dir)
        shutil.rmtree(run.run_dir)
    (run.run_dir / 'checkpoints').mkdir(parents=True, exist_ok=True)
    atomic_write(run.run_dir / 'config.yaml', save_config(dataclasses.replace(
        run.cfg, output=str(run.run_dir.parent), experiment=run.run_dir.name, resume=None)))


def _remove_unstarted(run: Run) -> None:
    """After a failure before the first checkpoint, remove what this start wrote: nothing blocks a rerun."""
    if not run.cfg.resume and not _first_checkpoint(run.run_dir).exists():
        shutil.rmtree(run.run_dir, ignore_errors=True)


def _interruption(cfg: TrainConfig, run: Optional[Run]) -> str:
    """What an interrupted start or run kept, and the command that goes on from there."""
    run_dir = run.run_dir if run is not None else Path(cfg.resume) if cfg.resume else None
    if run_dir is not None and _first_checkpoint(run_dir).is_file():
        return f'interrupted; continue the run from its last checkpoint with `timm-fmd train --resume {run_dir}`'
    return 'interrupted before the first checkpoint, so nothing was kept; run the same command again to start afresh'


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _build(cfg: TrainConfig, env: D.DistEnv, run_dir: Path) -> Run:
    _seed(cfg.seed)
    splits = build_splits(cfg)
    n_steps = steps_per_epoch(cfg, len(splits.train_indices), env.world_size)
    model = create_model(cfg, len(splits.label_names), n_steps)
    if cfg.cuda_graph:
        check_graph_config(cfg, env.device, env.world_size, model)
    if not is_fmd(cfg.model) and env.is_main:
        print(f'note: {cfg.model} is not an fmd_<arch> model: training without Feature Map Distortion', flush=True)
    cuda = env.device.type == 'cuda'
    if cfg.data_on_device:
        loaders = device_loaders(cfg, splits, model, env.device, env.rank, env.world_size)
    else:
        loaders = loaders_for_model(cfg, splits, model, env.rank, env.world_size, pin_memory=cfg.pin_mem and cuda)
    if env.is_main:
        for warning in timm_fmd.oversized_blocks(model, loaders.data_config['input_size']):
            print(f'warning: {warning}', flush=True)
    if cfg.sync_bn and not env.distributed and env.is_main:
        print('note: --sync-bn has no effect in a single process', flush=True)
    if cfg.sync_bn and env.distributed:
        if not cuda:
            raise ValueError('--sync-bn: torch SyncBatchNorm needs CUDA devices')
        model = convert_sync_batchnorm(model)
        timm_fmd.reapply_fmd(model)  # the conversion drops FMD's forward hooks: re-install them now
    model.to(env.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if is_fmd(cfg.model) and env.is_main:
        print(timm_fmd.site_summary(model), flush=True)  # the sites every training forward runs
    if cuda:  # fastest conv algorithms; GPU runs are not bit-reproducible anyway (atomics)
        torch.backends.cudnn.benchmark = True
    lr = resolved_lr(cfg, env.world_size)
    if cfg.lr is None and env.is_main:
        print(f'note: --lr {lr:.4g} (timm\'s rule for a global batch of '
              f'{cfg.batch_size * cfg.grad_accum_steps * env.world_size}; pass --lr to choose)', flush=True)
    if 0 < cfg.epochs <= cfg.warmup_epochs and env.is_main:  # e.g. the digits recipe with --epochs 1: chance level
        print(f'warning: all {cfg.epochs} epoch(s) are warm-up (--warmup-epochs {cfg.warmup_epochs}): the learning '
              f'rate never reaches {lr:.4g}; pass more --epochs, or --warmup-epochs 0', flush=True)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, **{**cfg.opt_kwargs, **optimizer_kwargs(cfg)})
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, decay_epochs=cfg.decay_epochs,
        decay_milestones=cfg.decay_milestones, decay_rate=cfg.decay_rate, min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, step_on_epochs=not cfg.sched_on_updates,
        updates_per_epoch=n_steps)
    ema_class = CapturableEma if cfg.cuda_graph else ModelEmaV3
    ema = ema_class(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup) if cfg.model_ema else None
    train_model = D.wrap_ddp(model, env)
    if cfg.torchcompile:
        train_model = torch.compile(train_model, backend=cfg.torchcompile)
    mixup = build_mixup(cfg, len(splits.label_names))
    if mixup is not None:
        loss_fn: nn.Module = SoftTargetCrossEntropy()  # Mixup already smoothed the targets
    elif cfg.smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()
    run = Run(cfg=cfg, env=env, run_dir=run_dir, splits=splits, loaders=loaders, model=model,
              train_model=train_model, ema=ema, optimizer=optimizer, scheduler=scheduler,
              scaler=torch.amp.GradScaler(env.device.type, enabled=cfg.amp and cfg.amp_dtype == 'float16'),
              loss_fn=loss_fn.to(env.device), mixup=mixup, steps_per_epoch=n_steps,
              autocast=autocast(cfg, env.device))
    if cfg.cuda_graph:
        run.graph = GraphedStep(lambda x, target, y, step: _train_step(run, x, target, y, True, step), optimizer, ema,
                                device=env.device)
    return run


# ------------------------------------------------------------------------------------ train / eval
def train_one_epoch(run: Run, pos: Position, epoch: int) -> Dict[str, Any]:
    """Train from ``pos`` to the end of ``epoch``; return that epoch's training metrics (all ranks)."""
    cfg, env = run.cfg, run.env
    accum, total = cfg.grad_accum_steps, run.steps_per_epoch * cfg.grad_accum_steps
    run.train_model.train()
    run.loaders.train_sampler.set_epoch(epoch, start=pos.batch * cfg.batch_size)
    sums = torch.tensor(pos.sums[:3], dtype=torch.float64, device=env.device)  # loss*n, top-1 and top-5 hits
    count = int(pos.sums[3])
    progress = Progress(run.steps_per_epoch, f'epoch {epoch + 1}/{cfg.epochs}', enabled=env.is_main,
                        images_per_step=cfg.batch_size * accum * env.world_size, start=pos.batch // accum)
    start = time.perf_counter() - pos.epoch_train_time
    batches = iter(run.loaders.train)
    for b in range(pos.batch, total):
        x, y, skipped = next(batches)
        new = sorted(set(skipped) - pos.skipped)
        if new:  # each image once per run, not once per epoch
            pos.skipped.update(new)
            progress.write(f'warning: rank {env.rank} skipped {len(new)} unreadable image(s): {new}')
        x, y = D.to_device(env.device, x, y)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target = y
        if run.mixup is not None:
            x, y = (x[:-1], y[:-1]) if len(x) % 2 else (x, y)  # a skipped image can leave an odd batch
            x, target = run.mixup(x, y)
        stepping = (b + 1) % accum == 0
        if run.graph is not None:  # --cuda-graph: the same step, replayed
            sums += run.graph(x, target, y, pos.global_step + 1)
        else:
            sums += _train_step(run, x, target, y, stepping, pos.global_step + 1)
        count += len(y)
        if not stepping:
            continue
        pos.global_step, pos.batch = pos.global_step + 1, b + 1
        if run.scheduler is not None:
            run.scheduler.step_update(num_updates=pos.global_step)
        step = pos.batch // accum
        if step % cfg.log_interval == 0 or step == run.steps_per_epoch:
            _report(run, progress, step, sums, count, start, pos)
        else:
            progress.advance(step)
        if cfg.checkpoint_interval and pos.global_step % cfg.checkpoint_interval == 0 and b + 1 < total:
            pos.sums, pos.epoch_train_time = sums.tolist() + [count], time.perf_counter() - start
            _save(run, pos)
    progress.close()
    train_time = time.perf_counter() - start
    loss, top1, top5, n = D.all_reduce_sum(torch.cat([sums, sums.new_tensor([count])]), env).tolist()
    pos.train_time, pos.train_images = pos.train_time + train_time, pos.train_images + int(n)
    mixed = run.mixup is not None
    return dict(epoch=epoch + 1, step=pos.global_step, lr=run.optimizer.param_groups[0]['lr'],
                fmd_prob=timm_fmd.current_prob(run.model), train_loss=loss / n,
                train_top1=None if mixed else 100.0 * top1 / n, train_top5=None if mixed else 100.0 * top5 / n,
                images_per_sec=n / train_time)


def _train_step(run: Run, x: torch.Tensor, target: torch.Tensor, y: torch.Tensor, stepping: bool,
                global_step: int) -> torch.Tensor:
    """One micro-batch: forward, backward and, when ``stepping``, optimiser step ``global_step`` with its EMA
    update. Returns the batch's float64 device sums (loss * n, top-1 hits, top-5 hits; hits 0 under mixup)."""
    sync = run.train_model.no_sync() if run.env.distributed and not stepping else contextlib.nullcontext()
    with sync:
        with run.autocast():
            output = run.train_model(x)
            loss = run.loss_fn(output, target)
        run.scaler.scale(loss / run.cfg.grad_accum_steps).backward()
    loss_sum = loss.detach().double() * len(y)
    if run.mixup is None:
        top1, top5 = hits(output.detach(), y)
        sums = torch.stack([loss_sum, top1.double(), top5.double()])
    else:  # accuracy is undefined against mixed targets
        sums = torch.cat([loss_sum[None], loss_sum.new_zeros(2)])
    if stepping:
        _optimizer_step(run)
        if run.ema is not None:
            run.ema.update(run.model, step=global_step)
    return sums


def _optimizer_step(run: Run) -> None:
    if run.cfg.clip_grad is not None:
        run.scaler.unscale_(run.optimizer)
        dispatch_clip_grad(run.model.parameters(), run.cfg.clip_grad, mode=run.cfg.clip_mode)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


def _report(run: Run, progress: Progress, step: int, sums: torch.Tensor, n: int, start: float,
            pos: Position) -> None:
    loss, top1, _ = sums.tolist()  # the only host sync of training, every log_interval steps
    if not math.isfinite(loss):
        raise FloatingPointError(f'training loss is {loss} at step {pos.global_step}: lower --lr, set --clip-grad '
                                 f'or use --amp-dtype bfloat16')
    stats = dict(step=pos.global_step, loss=f'{loss / n:.4f}', lr=f"{run.optimizer.param_groups[0]['lr']:.3g}",
                 img_s=f'{n * run.env.world_size / max(time.perf_counter() - start, 1e-9):.0f}')
    if run.mixup is None:
        stats['top1'] = f'{100.0 * top1 / n:.2f}'
    progress.update(step, **stats)


# ----------------------------------------------------------------------------- epoch end, checkpoints
def _erc(run: Run, pos: Position, epoch: int) -> Optional[float]:
    """Every ``erc_every`` epochs and after the last: the ERC of the layers after the FMD sites (mean
    over layers, per-layer values kept in ``pos.erc``); ``None`` otherwise. Its own seeded draws leave
    the training RNG streams, and so exact resume, untouched."""
    cfg = run.cfg
    if not cfg.erc_every or ((epoch + 1) % cfg.erc_every and epoch + 1 != cfg.epochs):
        return None
    layers = erc_layers(run.eval_model, cfg.fmd_stages or FMD_DEFAULTS.stages, cfg.fmd_sites or FMD_DEFAULTS.sites)
    values = layer_erc(run.eval_model, run.loaders.val, layers, max_batches=cfg.erc_batches, draws=cfg.erc_draws,
                       seed=cfg.seed * 100_003 + epoch, device=run.env.device)
    pos.erc = {p: dict(mean=m, se=s) for p, (m, s) in values.items()}
    return float(sum(m for m, _ in values.values()) / len(values))


def _better(row: Dict[str, Any], best: Optional[Dict[str, float]], metric: str) -> bool:
    if best is None:
        return True
    key = f'val_{metric}'
    return row[key] < best[key] if metric == 'loss' else row[key] > best[key]


def _end_epoch(run: Run, pos: Position, epoch: int, row: Dict[str, Any]) -> None:
    """Best weights, schedule step, then the epoch-end checkpoint (metrics row already written)."""
    if _better(row, pos.best, run.cfg.eval_metric):
        pos.best = {k: row[k] for k in ('epoch', 'val_top1', 'val_top5', 'val_loss')}
        if run.env.is_main:
            save_weights(run.run_dir / 'checkpoints' / 'best.safetensors', weights_for_saving(run.eval_model),
                         _metadata(run, epoch + 1, pos.global_step))
    if run.scheduler is not None:
        run.scheduler.step(epoch + 1, row[f'val_{run.cfg.eval_metric}'])
    pos.epoch, pos.batch, pos.sums, pos.epoch_train_time = epoch + 1, 0, [0.0] * 4, 0.0
    _save(run, pos)


def _metadata(run: Run, epoch: int, global_step: int) -> Dict[str, str]:
    return dict(architecture=base_architecture(run.cfg.model, run.model), model=run.cfg.model, epoch=str(epoch),
                global_step=str(global_step), format='pt')


def _save(run: Run, pos: Position) -> None:
    """Checkpoint ``last``: every rank contributes its RNG and running sums; rank 0 writes."""
    ranks = D.all_gather_objects(dict(rng=capture_rng(run.env.device), sums=pos.sums,
                                      epoch_train_time=pos.epoch_train_time, skipped=sorted(pos.skipped)), run.env)
    if not run.env.is_main:
        return
    state = dict(epoch=pos.epoch, batch_in_epoch=pos.batch, global_step=pos.global_step, best=pos.best,
                 world_size=run.env.world_size, ranks=ranks, optimizer=run.optimizer.state_dict(),
                 scheduler=run.scheduler.state_dict() if run.scheduler is not None else None,
                 scaler=run.scaler.state_dict(), train_time_s=pos.train_time, train_images=pos.train_images,
                 wall_time_s=pos.wall_time + time.time() - run.started, erc=pos.erc, val_images=pos.val_images)
    if run.ema is not None:  # last.safetensors holds the EMA (evaluated) weights; keep the trained ones here
        state['model'] = weights_for_saving(run.model)
    save_checkpoint(run.run_dir / 'checkpoints', 'last', weights_for_saving(run.eval_model),
                    _metadata(run, pos.epoch, pos.global_step), state)


def _resume(run: Run) -> Position:
    weights, _, state = load_checkpoint(run.run_dir / 'checkpoints', 'last')
    # with EMA the weights file holds the EMA weights and the state file the trained ones
    run.model.load_state_dict(state.get('model', weights))
    if run.ema is not None:
        run.ema.module.load_state_dict(weights)
    run.optimizer.load_state_dict(state['optimizer'])
    if run.scheduler is not None and state['scheduler'] is not None:
        run.scheduler.load_state_dict(state['scheduler'])
    if run.scaler.is_enabled() and state['scaler']:
        run.scaler.load_state_dict(state['scaler'])
    pos = Position(epoch=state['epoch'], batch=state['batch_in_epoch'], global_step=state['global_step'],
                   best=state['best'], train_time=state['train_time_s'], train_images=state['train_images'],
                   wall_time=state['wall_time_s'], erc=state.get('erc'),
                   val_images=state.get('val_images', len(run.splits.val_indices)))
    if state['world_size'] == run.env.world_size:
        mine = state['ranks'][run.env.rank]
        restore_rng(mine['rng'], run.env.device)
        pos.sums, pos.epoch_train_time = mine['sums'], mine['epoch_train_time']
        pos.skipped = set(mine.get('skipped', ()))
    elif pos.batch:
        raise ValueError(f'--resume: the checkpoint is mid-epoch from {state["world_size"]} process(es); resume it '
                         f'with the same number (now {run.env.world_size})')
    else:  # a new world size at an epoch boundary: fresh per-rank streams, no longer bit-exact
        _seed(run.cfg.seed + 1000 * pos.epoch + run.env.rank)
        pos.skipped = set().union(*(r.get('skipped', ()) for r in state['ranks']))
    return pos


# ---------------------------------------------------------------------------------------- reporting
def _log_epoch(tb: Any, row: Dict[str, Any]) -> None:
    parts = [f"epoch {row['epoch']}"] + [f'{k} {v:.4g}' for k, v in row.items()
                                        if k not in ('epoch', 'step') and v is not None]
    print(' '.join(parts), flush=True)
    if tb is not None:
        for k, v in row.items():
            if k not in ('epoch', 'step') and v is not None:
                tb.add_scalar(k, v, row['epoch'])


def _log_end(run: Run, results: Dict[str, Any]) -> None:
    """The run's outcome in two lines: the best epoch's accuracy (rounded) and where everything is."""
    best, final = results['best'] or {}, results['final']
    if best.get('val_top1') is not None:
        chosen = '' if run.cfg.eval_metric == 'top1' else f' (best by val {run.cfg.eval_metric})'
        print(f"best val top-1 {best['val_top1']:.2f}% at epoch {best['epoch']} of {run.cfg.epochs}{chosen}; "
              f"final {final['val_top1']:.2f}%", flush=True)
    print(f'run directory: {run.run_dir}', flush=True)


def _results(run: Run, pos: Position, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    cfg, last = run.cfg, (rows[-1] if rows else {})
    settings = timm_fmd.fmd_settings(run.model) if is_fmd(cfg.model) else None
    fmd = None if settings is None else {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()
        if k in FMD_FIELDS + ('ramp_steps',)}
    dc = run.loaders.data_config
    skipped = set().union(*D.all_gather_objects(sorted(pos.skipped), run.env))
    data = dict(run.splits.info, input_size=list(dc['input_size']), mean=list(dc['mean']), std=list(dc['std']),
                interpolation=dc['interpolation'], crop_pct=dc['crop_pct'])
    # the images actually used: --skip-corrupt's skipped ones are not counted
    data.update(train_size=len(run.splits.train_indices) - len(skipped), val_size=pos.val_images)
    if cfg.skip_corrupt:
        data.update(skipped_train_images=len(skipped),
                    skipped_val_images=len(run.splits.val_indices) - pos.val_images)
    final = {k: last.get(k) for k in ('epoch', 'train_loss', 'train_top1', 'val_loss', 'val_top1', 'val_top5')}
    gap = None if final['train_top1'] is None or final['val_top1'] is None else final['train_top1'] - final['val_top1']
    return {
        'model': cfg.model, 'architecture': base_architecture(cfg.model, run.model),
        'pretrained': pretrained_source(cfg, run.model), 'num_classes': len(run.splits.label_names),
        'label_names': run.splits.label_names, 'model_kwargs': cfg.model_kwargs, 'fmd': fmd, 'data': data,
        'epochs': cfg.epochs, 'global_steps': pos.global_step, 'batch_size': cfg.batch_size,
        'world_size': run.env.world_size, 'hardware': hardware(run.env.device, run.env.world_size),
        'seed': cfg.seed, 'best': pos.best, 'final': final, 'train_val_gap': gap,
        'evaluated_weights': 'ema' if run.ema is not None else 'model',
        'param_count': sum(p.numel() for p in run.model.parameters()),
        'wall_time_s': pos.wall_time + time.time() - run.started,
        'images_per_sec': pos.train_images / pos.train_time if pos.train_time else None,
        'checkpoint': 'checkpoints/best.safetensors',
        'erc': None if pos.erc is None else dict(pos.erc, batch_size=cfg.validation_batch_size or cfg.batch_size),
        'versions': {'torch': torch.__version__, 'timm': timm.__version__, 'timm_fmd': timm_fmd.__version__},
    }
