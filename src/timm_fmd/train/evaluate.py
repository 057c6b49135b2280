"""Evaluation: the validation loop of training, and ``timm-fmd eval`` of a saved checkpoint.

Both run the same code on the same inputs, so evaluating ``best.safetensors`` reproduces the
validation accuracy logged for its epoch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.validation import check_choice
from . import distributed as D
from .checkpoint import load_weights
from .config import TrainConfig, config_from_dict, load_yaml, merge, validate
from .data import build_splits, loaders_for_model
from .model import create_model

__all__ = ['autocast', 'hits', 'evaluate', 'LoadedRun', 'resolve_checkpoint', 'load_run', 'evaluate_checkpoint']


def autocast(cfg: TrainConfig, device: torch.device) -> Callable[[], Any]:
    """A factory of the run's autocast context (a no-op context without ``--amp``). Under ``--cuda-graph``
    without the cast cache, which must not outlive a captured step."""
    dtype = torch.float16 if cfg.amp_dtype == 'float16' else torch.bfloat16
    return functools.partial(torch.autocast, device.type, dtype=dtype, enabled=cfg.amp,
                             cache_enabled=not cfg.cuda_graph)


def hits(output: torch.Tensor, target: torch.Tensor) -> tuple:
    """Top-1 and top-5 hit counts (top-k = top-(number of classes) when there are fewer than 5)."""
    top = output.topk(min(5, output.shape[1]), dim=1).indices.eq(target[:, None])
    return top[:, 0].sum(), top.any(dim=1).sum()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, env: D.DistEnv, autocast: Callable[[], Any],
             channels_last: bool = False) -> Dict[str, float]:
    """Validation loss, top-1 and top-5 (percent) of ``model`` over ``loader``, summed over ranks, and
    ``val_images``: how many images that is (an unreadable one skipped by ``--skip-corrupt`` is not)."""
    model.eval()
    sums, count = torch.zeros(3, dtype=torch.float64, device=env.device), 0
    for x, y, _ in loader:
        x, y = D.to_device(env.device, x, y)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            output = model(x)
        loss = F.cross_entropy(output.float(), y, reduction='sum')
        top1, top5 = hits(output, y)
        sums += torch.stack([loss.double(), top1.double(), top5.double()])
        count += len(y)
    loss, top1, top5, n = D.all_reduce_sum(torch.cat([sums, sums.new_tensor([count])]), env).tolist()
    return dict(val_loss=loss / n, val_top1=100.0 * top1 / n, val_top5=100.0 * top5 / n, val_images=int(n))


@dataclass
class LoadedRun:
    """A saved run rebuilt for evaluation: its config, process group, data, model and loaders."""

    cfg: TrainConfig
    env: D.DistEnv
    splits: Any
    model: nn.Module
    loaders: Any
    metadata: Dict[str, str]


_EXPECTED = ('expected a run directory (evaluated at its checkpoints/best.safetensors) or '
             'RUN_DIR/checkpoints/<best|last>.safetensors')


def resolve_checkpoint(checkpoint: Union[str, Path]) -> Path:
    """The weights file ``checkpoint`` names: ``RUN_DIR/checkpoints/<name>.safetensors`` itself, or for a run
    directory its ``checkpoints/best.safetensors`` (the weights ``timm-fmd publish RUN_DIR`` publishes).

    Raises ``FileNotFoundError`` naming ``--checkpoint`` and what was expected for anything else."""
    path = Path(checkpoint)
    if path.is_dir():
        if not (path / 'config.yaml').is_file():
            raise FileNotFoundError(f'--checkpoint: {path} is not a run directory (it has no config.yaml); {_EXPECTED}')
        best = path / 'checkpoints' / 'best.safetensors'
        if not best.is_file():
            last = path / 'checkpoints' / 'last.safetensors'
            other = f'; its latest weights: --checkpoint {last}' if last.is_file() else ''
            raise FileNotFoundError(f'--checkpoint: {path} has no checkpoints/best.safetensors yet (written when its '
                                    f'first epoch is validated){other}')
        return best
    if not path.is_file():
        raise FileNotFoundError(f'--checkpoint: {path} does not exist; {_EXPECTED}')
    if path.suffix != '.safetensors' or path.parent.name != 'checkpoints' or \
            not (path.parent.parent / 'config.yaml').is_file():
        raise FileNotFoundError(f'--checkpoint: {path} is not a .safetensors file in the checkpoints/ folder of a run '
                                f'directory (whose config.yaml rebuilds the model and transforms); {_EXPECTED}')
    return path


@contextlib.contextmanager
def load_run(checkpoint: Union[str, Path], data_dir: Optional[str] = None, batch_size: Optional[int] = None,
             workers: Optional[int] = None, device: Optional[str] = None, split: str = 'val') -> Iterator[LoadedRun]:
    """Rebuild the run of ``RUN_DIR/checkpoints/<name>.safetensors`` (or of ``RUN_DIR``, at its best
    checkpoint: :func:`resolve_checkpoint`) with those weights loaded.

    The model, transforms and split come from ``RUN_DIR/config.yaml``; ``data_dir`` points the same
    split logic at another copy of the data (or another data set with the same classes). With
    ``split='train'`` the evaluation loader (``loaders.val``) holds the run's training samples under
    the evaluation transform: what the model fits on them, free of augmentation and regularisers.
    """
    check_choice(split, 'split', ('val', 'train'))
    checkpoint = resolve_checkpoint(checkpoint)
    config_path = checkpoint.parent.parent / 'config.yaml'
    weights, metadata = load_weights(checkpoint)
    overrides = dict(data_dir=data_dir, validation_batch_size=batch_size, workers=workers, device=device)
    cfg = validate(merge(config_from_dict(load_yaml(config_path)),
                         {k: v for k, v in overrides.items() if v is not None}))
    env = D.setup(cfg.device)
    try:
        splits = build_splits(cfg)
        if split == 'train':
            splits = dataclasses.replace(splits, val_reader=splits.train_reader, val_indices=splits.train_indices)
        model = create_model(cfg, len(splits.label_names), steps_per_epoch=0, pretrained=False)
        model.load_state_dict(weights)
        loaders = loaders_for_model(cfg, splits, model, env.rank, env.world_size)
        model.to(env.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        yield LoadedRun(cfg, env, splits, model, loaders, metadata)
    finally:
        D.cleanup(env)


def evaluate_checkpoint(checkpoint: Union[str, Path], data_dir: Optional[str] = None,
                        batch_size: Optional[int] = None, workers: Optional[int] = None,
                        device: Optional[str] = None, split: str = 'val') -> Dict[str, Any]:
    """Evaluate the weights of ``RUN_DIR/checkpoints/<name>.safetensors`` (or ``RUN_DIR``: its best) on the run's
    validation split (see :func:`load_run`): reproduces the validation accuracy logged for the checkpoint's epoch.

    ``split='train'`` evaluates on the run's training samples instead (keys ``train_loss``,
    ``train_top1``, ``train_top5``, ``train_size``), in eval mode without augmentation.
    """
    checkpoint = resolve_checkpoint(checkpoint)  # a run directory: reported as the file evaluated
    with load_run(checkpoint, data_dir, batch_size, workers, device, split) as run:
        metrics = evaluate(run.model, run.loaders.val, run.env, autocast(run.cfg, run.env.device),
                           run.cfg.channels_last)
    images = metrics.pop('val_images')
    if split == 'train':
        return dict({k.replace('val_', 'train_'): v for k, v in metrics.items()}, checkpoint=str(checkpoint),
                    epoch=int(run.metadata['epoch']), train_size=images, data=run.splits.info['name'])
    return dict(metrics, checkpoint=str(checkpoint), epoch=int(run.metadata['epoch']), val_size=images,
                data=run.splits.info['name'], val_split=run.splits.info['val_split'])
