"""Data for the trainer: data sets (folder, tar, embedded digits), transforms, samplers, loaders.

Reproducibility is built into the sampler rather than the loader: every epoch has one permutation
and one augmentation seed *per sample*, both drawn from ``(seed, epoch)``. A sample's random
augmentation is therefore the same whichever process, worker or batch position handles it. That
makes three things exact: resuming in the middle of an epoch (skip the consumed samples, the rest
is unchanged), any number of loader workers, and a DDP run whose global batch holds the same
samples as a single-process run with the summed batch size (ranks take interleaved shards).
"""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, create_dataset, create_transform, resolve_data_config
from torch.utils.data import DataLoader, Sampler, default_collate
from torchvision import transforms as T

from .config import TrainConfig
from .images import load_rgb

__all__ = ['DataError', 'load_rgb', 'Splits', 'Loaders', 'digits_root', 'build_splits', 'steps_per_epoch', 'data_args',
           'build_transforms',
           'build_loaders', 'loaders_for_model', 'build_mixup', 'SampleDataset', 'EpochSampler', 'cache_root']

_logger = logging.getLogger(__name__)

_EVAL_SPLITS = ('val', 'validation', 'test')
_DIGITS_VERSION = 'digits-v1'


# -------------------------------------------------------------------------------- embedded digits
def cache_root() -> Path:
    """Where timm-fmd caches data it derives: ``$TIMM_FMD_CACHE``, default ``~/.cache/timm_fmd``."""
    return Path(os.environ.get('TIMM_FMD_CACHE') or Path.home() / '.cache' / 'timm_fmd')


def digits_root(cache_dir: Optional[str] = None) -> Path:
    """The embedded digits data set as an ImageFolder (``train/``, ``val/``), written once on first use.

    Source: the UCI ML "Optical Recognition of Handwritten Digits" data set (Alpaydin & Kaynak, 1998;
    CC BY 4.0), in the 1,797-image 8x8 copy shipped by scikit-learn (pixel values 0..16), stored in
    ``timm_fmd/data/digits.npz``. Images are written as 32x32 grayscale PNGs (bilinear upscaling)
    with a fixed 80/20 train/val split (seed 0), into ``$TIMM_FMD_CACHE`` (default
    ``~/.cache/timm_fmd``). The folder is built in a temporary directory and renamed into place, so
    concurrent first uses (e.g. torchrun ranks) never see a half-written copy.
    """
    cache = Path(cache_dir) if cache_dir else cache_root()
    root = cache / _DIGITS_VERSION
    if root.is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with resources.files('timm_fmd').joinpath('data/digits.npz').open('rb') as f:
        data = np.load(f)
        images, labels = data['images'], data['labels']
    order = np.random.default_rng(0).permutation(len(labels))
    n_val = len(labels) // 5
    tmp = Path(tempfile.mkdtemp(prefix=f'.{_DIGITS_VERSION}.', dir=cache))
    try:
        for rank, i in enumerate(order):
            split = 'val' if rank < n_val else 'train'
            folder = tmp / split / str(int(labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (images[i].astype(np.uint16) * 255 + 8) // 16  # 0..16 -> 0..255
            img = Image.fromarray(pixels.astype(np.uint8)).resize((32, 32), Image.Resampling.BILINEAR)
            img.save(folder / f'{i:04d}.png')
        os.rename(tmp, root)
    except OSError:
        if not root.is_dir():  # not a lost race with another process: a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ------------------------------------------------------------------------------------------ splits
@dataclass
class Splits:
    """The training and validation samples: a timm reader each plus the indices used from it."""

    train_reader: Any
    train_indices: np.ndarray
    val_reader: Any
    val_indices: np.ndarray
    label_names: List[str]
    info: Dict[str, Any] = field(default_factory=dict)  # name, val_split, carve_seed (for results.json)


def _class_map(reader: Any) -> Dict[str, int]:
    return getattr(reader, 'class_to_idx', None) or getattr(reader, 'class_name_to_idx')


def _find(parent: Path, names: Sequence[str]) -> Optional[Path]:
    for name in names:
        for cand in (parent / name, parent / f'{name}.tar'):
            if cand.exists():
                return cand
    return None


def _reader(path: Path, class_map: Optional[Dict[str, int]] = None) -> Any:
    """A timm reader for an ImageFolder directory or tar, with the checks timm leaves out."""
    if path.is_dir():
        classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith('.'))
        if not classes:
            raise ValueError(f'data split {path} has no class folders (expected {path}/<class>/<image>)')
    try:
        reader = create_dataset('', root=str(path), search_split=False, class_map=class_map or '').reader
    except Exception as e:  # timm's messages do not always name the path
        raise ValueError(f'cannot read the data split {path}: {e}') from e
    if path.is_dir():
        empty = sorted(set(classes) - set(_class_map(reader)))
        if empty:
            raise ValueError(f'class folder(s) with no images in {path}: {empty} (add images to them or remove them)')
    if len(reader) == 0:
        raise ValueError(f'data split {path} holds no images')
    return reader


def build_splits(cfg: TrainConfig) -> Splits:
    """Resolve ``cfg.data_dir`` into training and validation samples (carving one when absent)."""
    if cfg.data_dir is None:
        root, name = digits_root(), 'digits'
    else:
        root, name = Path(cfg.data_dir).expanduser(), cfg.data_dir
        if not root.exists():
            raise FileNotFoundError(f'--data-dir: {root} does not exist')
        if root.is_dir() and not any(root.iterdir()):
            raise ValueError(f'--data-dir: {root} is empty')
        if root.is_file() and not root.name.endswith('.tar'):
            raise ValueError(f'--data-dir: {root} is a file but not a .tar archive')
    if root.is_file():  # e.g. cifar10-jpg/train.tar, with test.tar beside it
        train_path = root
        parent = root.parent if root.name == f'{cfg.train_split}.tar' else None
    else:
        train_path = _find(root, [cfg.train_split])
        parent = root if train_path is not None else None
        train_path = train_path or root  # class folders directly under --data-dir
    val_names = [cfg.val_split] if cfg.val_split else list(_EVAL_SPLITS)
    val_path = _find(parent, val_names) if parent is not None else None
    if cfg.val_split and val_path is None:
        raise FileNotFoundError(f'--val-split: no {cfg.val_split}/ or {cfg.val_split}.tar beside {train_path}')

    train = _reader(train_path)
    classes = _class_map(train)
    label_names = [c for c, _ in sorted(classes.items(), key=lambda kv: kv[1])]
    if val_path is not None:
        val = _reader(val_path)
        extra = sorted(set(_class_map(val)) - set(classes))
        if extra:
            raise ValueError(f'validation split {val_path} has classes missing from {train_path}: {extra}')
        if _class_map(val) != classes:  # fewer classes: index them as the training split does
            val = _reader(val_path, class_map=classes)
        train_idx, val_idx = np.arange(len(train)), np.arange(len(val))
        info = dict(name=name, val_split=_split_kind(val_path), carve_seed=None)
    else:
        val = train
        order = np.random.default_rng(cfg.carve_seed).permutation(len(train))
        n_val = max(1, int(round(len(train) * cfg.carve_fraction)))
        if n_val >= len(train):
            raise ValueError(f'--carve-fraction {cfg.carve_fraction} leaves no training images of {len(train)}')
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        info = dict(name=name, val_split='carved', carve_seed=cfg.carve_seed)
    if cfg.train_subset is not None:
        if cfg.train_subset > len(train_idx):
            raise ValueError(f'--train-subset {cfg.train_subset} exceeds the {len(train_idx)} training images')
        pick = np.random.default_rng(cfg.subset_seed).permutation(len(train_idx))[:cfg.train_subset]
        train_idx = np.sort(train_idx[pick])
        info.update(train_subset=cfg.train_subset, subset_seed=cfg.subset_seed)
    info.update(train_size=len(train_idx), val_size=len(val_idx))
    return Splits(train, train_idx, val, val_idx, label_names, info)


def steps_per_epoch(cfg: TrainConfig, train_size: int, world_size: int) -> int:
    """Optimiser steps an epoch: full batches per rank (the sampler pads ranks to equal shares)."""
    steps = math.ceil(train_size / world_size) // cfg.batch_size // cfg.grad_accum_steps
    if steps == 0:
        raise ValueError(f'--batch-size: {train_size} training images make no full optimiser step of '
                         f'{cfg.batch_size} x {cfg.grad_accum_steps} accumulation x {world_size} processes')
    return steps


def _split_kind(path: Path) -> str:
    stem = path.name[:-4] if path.name.endswith('.tar') else path.name
    return 'test' if stem == 'test' else 'val'


# -------------------------------------------------------------------------------------- transforms
def data_args(cfg: TrainConfig) -> Dict[str, Any]:
    """The settings that override the model's own for ``timm.data.resolve_data_config``."""
    args = dict(img_size=cfg.img_size, mean=cfg.mean, std=cfg.std, interpolation=cfg.interpolation,
                crop_pct=cfg.crop_pct)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if v is not None}


def build_transforms(cfg: TrainConfig, data_config: Dict[str, Any]) -> Tuple[Any, Any]:
    """``(train, eval)`` transforms: timm's, plus the CIFAR-style pad crop and rotation of the paper."""
    size = data_config['input_size'][-2:]
    common = dict(interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'])
    eval_tf = create_transform(size, is_training=False, crop_pct=data_config['crop_pct'],
                               crop_mode=data_config.get('crop_mode'), **common)
    if cfg.no_aug:
        return create_transform(size, is_training=True, no_aug=True, **common), eval_tf
    timm_mode = cfg.train_crop_mode if cfg.train_crop_mode != 'pad' else 'rrc'
    primary, secondary, final = create_transform(
        size, is_training=True, separate=True, train_crop_mode=timm_mode, scale=cfg.scale, ratio=cfg.ratio,
        hflip=cfg.hflip, vflip=cfg.vflip, color_jitter=cfg.color_jitter, auto_augment=cfg.aa,
        re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount, **common)
    if cfg.train_crop_mode == 'pad':  # Tang et al. (CIFAR): random crop with padding, flip, rotation
        ops = [T.Resize(size), T.CenterCrop(size), T.RandomCrop(size, padding=cfg.crop_pad)]
        ops += [T.RandomHorizontalFlip(cfg.hflip)] if cfg.hflip > 0 else []
        ops += [T.RandomVerticalFlip(cfg.vflip)] if cfg.vflip > 0 else []
    else:
        ops = list(primary.transforms)
    if cfg.rotate > 0:
        ops.append(T.RandomRotation(cfg.rotate, interpolation=T.InterpolationMode.BILINEAR))
    return T.Compose(ops + list(secondary.transforms) + list(final.transforms)), eval_tf


def build_mixup(cfg: TrainConfig, num_classes: int) -> Optional[Mixup]:
    """timm's batch Mixup/CutMix (it also applies label smoothing to the mixed targets), or ``None``."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                 num_classes=num_classes)


# ------------------------------------------------------------------------------ dataset and sampler
class DataError(ValueError):
    """A sample that cannot be loaded; the message names the file and what to do.

    Raised inside a DataLoader worker, it reaches the main process rebuilt by torch from text
    (``Caught DataError in DataLoader worker process N.`` and the worker's whole traceback). The
    constructor recognises that text and puts the original message first again, so the user reads
    one line; the worker's traceback stays in ``worker_traceback``.
    """

    def __init__(self, message: str):
        self.worker_traceback: Optional[str] = None
        head = f'Caught {type(self).__name__} '
        if message.startswith(head):
            where, _, traceback = message.partition('\n')
            marker = f'{type(self).__module__}.{type(self).__qualname__}: '
            self.worker_traceback = traceback
            message = f"{traceback.rpartition(marker)[2].strip()} [{where[len(head):].rstrip('.')}]"
        super().__init__(message)


@contextmanager
def _seeded() -> Iterator[Any]:
    """Seed ``random``, NumPy and torch (CPU) per sample; in the main process restore them after."""
    main = torch.utils.data.get_worker_info() is None
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if main else None

    def reseed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.random.default_generator.manual_seed(seed)  # CPU only: never touches CUDA generators
    try:
        yield reseed
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class SampleDataset(torch.utils.data.Dataset):
    """Samples ``indices`` of a timm reader; items are fetched by ``(position, augmentation_seed)``.

    Images are decoded by :func:`~timm_fmd.train.images.load_rgb`. An unreadable image raises
    :class:`DataError` naming the file, or with ``skip_corrupt`` yields ``(None, filename)`` which
    :func:`collate` drops and reports.
    """

    def __init__(self, reader: Any, indices: np.ndarray, transform: Any, skip_corrupt: bool = False):
        self.reader, self.indices, self.transform, self.skip_corrupt = reader, indices, transform, skip_corrupt

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, pos: int) -> Tuple[Optional[Image.Image], Any]:
        index = int(self.indices[pos])
        try:
            fobj, target = self.reader[index]
            with fobj:
                return load_rgb(fobj, self._name(index)), int(target)
        except Exception as e:
            name = self._name(index)
            if self.skip_corrupt:
                return None, name
            reason = str(e) if isinstance(e, ValueError) else f'cannot read image {name!r}: {type(e).__name__}: {e}'
            raise DataError(f'{reason} (fix or remove it, or pass --skip-corrupt)') from e

    def _name(self, index: int) -> str:
        name = self.reader.filename(index, absolute=True)
        return f'{self.reader.root}::{name}' if os.path.isfile(self.reader.root) else name  # a member of a tar

    def __getitems__(self, items: Sequence[Tuple[int, int]]) -> List[Tuple[Any, Any]]:
        out = []
        with _seeded() as reseed:
            for pos, seed in items:
                img, target = self._load(pos)
                if img is not None:
                    reseed(seed)
                    img = self._transform(img, pos)
                out.append((img, target))
        return out

    def _transform(self, img: Image.Image, pos: int) -> Any:
        try:
            return self.transform(img)
        except Exception as e:  # raised in a worker, a bare traceback would not say which image
            name = self._name(int(self.indices[pos]))
            raise DataError(f'the transform failed on image {name!r} ({img.width}x{img.height}): '
                            f'{type(e).__name__}: {e}') from e

    def __getitem__(self, item: Tuple[int, int]) -> Tuple[Any, Any]:
        return self.__getitems__([item])[0]


def collate(batch: List[Tuple[Any, Any]]) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """Stack the readable samples; return the file names of the skipped ones as the third item."""
    skipped = [target for img, target in batch if img is None]
    kept = [(img, target) for img, target in batch if img is not None]
    if not kept:
        raise DataError(f'every image of a batch is unreadable, e.g. {skipped[:3]}: is the data set broken?')
    x, y = default_collate(kept)
    return x, y, skipped


class EpochSampler(Sampler):
    """Yields ``(position, augmentation_seed)``; shuffled per epoch from ``(seed, epoch)``, sharded by rank.

    With ``pad`` (training) the order is padded to a multiple of ``num_replicas`` as
    ``DistributedSampler`` does; without it (validation) every sample is seen exactly once overall.
    :meth:`set_epoch` takes the number of this rank's samples already consumed, for resuming.
    """

    def __init__(self, size: int, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0, pad: bool = True):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.num_replicas, self.rank, self.pad = num_replicas, rank, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def positions(self) -> np.ndarray:
        """This rank's sample positions for the epoch, from ``start`` on (what iterating yields, without seeds)."""
        return self._positions()[self.start:]

    def _positions(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        if self.pad and self.size % self.num_replicas:
            order = np.concatenate([order, order[:self.num_replicas - self.size % self.num_replicas]])
        return order[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        seeds = np.random.default_rng([self.seed, self.epoch, 1]).integers(0, 2 ** 63 - 1, size=self.size)
        for pos in self._positions()[self.start:]:
            yield int(pos), int(seeds[pos])

    def __len__(self) -> int:
        return max(0, len(self._positions()) - self.start)


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    train_sampler: EpochSampler
    data_config: Dict[str, Any]  # input size, mean, std, interpolation, crop of the transforms


def build_loaders(cfg: TrainConfig, splits: Splits, transforms: Tuple[Any, Any], rank: int = 0,
                  world_size: int = 1, pin_memory: bool = False, data_config: Optional[Dict[str, Any]] = None
                  ) -> Loaders:
    """Training and validation loaders for this rank (validation unpadded: exact metrics after a sum)."""
    train_ds = SampleDataset(splits.train_reader, splits.train_indices, transforms[0], cfg.skip_corrupt)
    val_ds = SampleDataset(splits.val_reader, splits.val_indices, transforms[1], cfg.skip_corrupt)
    train_sampler = EpochSampler(len(train_ds), True, cfg.seed, world_size, rank, pad=True)
    val_sampler = EpochSampler(len(val_ds), False, cfg.seed, world_size, rank, pad=False)
    common = dict(num_workers=cfg.workers, pin_memory=pin_memory, collate_fn=collate,
                  persistent_workers=cfg.workers > 0,
                  generator=torch.Generator().manual_seed(cfg.seed))  # keeps loaders off the global RNG
    train = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=train_sampler, drop_last=True, **common)
    val = DataLoader(val_ds, batch_size=cfg.validation_batch_size or cfg.batch_size, sampler=val_sampler,
                     drop_last=False, **common)
    return Loaders(train, val, train_sampler, data_config or {})


def loaders_for_model(cfg: TrainConfig, splits: Splits, model: torch.nn.Module, rank: int = 0, world_size: int = 1,
                      pin_memory: bool = False) -> Loaders:
    """:func:`build_loaders` with the transforms of ``model``'s data config under ``cfg``'s overrides."""
    data_config = resolve_data_config(data_args(cfg), model=model)
    return build_loaders(cfg, splits, build_transforms(cfg, data_config), rank, world_size, pin_memory, data_config)
