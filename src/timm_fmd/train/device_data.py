"""``--data-on-device``: the data set decoded once, kept as uint8 on the training device, augmented there.

The loader path (:mod:`.data`) decodes and augments every image on CPU worker processes every epoch. For a
data set that fits in device memory (CIFAR-10 is 150 MiB of pixels) this path instead

* decodes each split once through the deterministic head of the loader's own transforms (``Resize``,
  ``CenterCrop``: the same PIL calls), to uint8 ``(N, C, H, W)``; the result is cached under
  ``$TIMM_FMD_CACHE/device-data`` (keyed by the files' names, sizes and times, the samples and the
  transforms, written atomically, so later and parallel runs share it) and moved to the device once;
* applies the random tail of the same transforms to a whole batch at once on the device: ``RandomCrop``
  with zero padding and the flips as one gather; ``RandomRotation`` (bilinear) as PIL computes it (source
  pixel centres through the inverse rotation, edge pixels clamped, zero outside the image, truncated to
  8 bits; in float64, which makes it equal to PIL bit for bit); then ``ToTensor`` and ``Normalize`` as the
  loader's float ops, so that without augmentation the batches equal the loader's bit for bit;
* draws each sample's augmentation parameters from ``(seed, epoch, sample)`` and takes the sample order
  from the loader path's :class:`~.data.EpochSampler`: exact resume, DDP shards and drop_last behave as there.

The parameters' distributions are the loader's (offsets uniform in ``[0, 2 * padding]``, flips at their
probability, angles uniform in the degree range); the draws themselves differ (numpy here, torch's CPU
generator per sample there). Augmentations without a batched device version (``--aa``, ``--reprob``,
``--color-jitter``, random-resized crops) are refused when the config is validated, and any other transform
is refused here by name.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch.utils.data import DataLoader
from torchvision import transforms as T

from .checkpoint import atomic_path
from .config import TrainConfig
from .data import EpochSampler, Loaders, SampleDataset, Splits, _class_map, build_transforms, cache_root, data_args

__all__ = ['Augment', 'AugmentParams', 'DeviceSplit', 'DeviceLoader', 'plan_transforms', 'load_split',
           'device_loaders', 'normalize']

_CACHE_VERSION = 'device-data-v1'
_DECODE_BATCH = 256
_TO_TENSOR = ('ToTensor', 'MaybeToTensor')


class AugmentParams(NamedTuple):
    """Per-sample augmentation parameters, ``(N,)`` numpy arrays: crop offsets into the padded image (rows,
    columns), flips (bool) and rotation angles (degrees, counter-clockwise as torchvision's)."""

    top: np.ndarray
    left: np.ndarray
    hflip: np.ndarray
    vflip: np.ndarray
    angle: np.ndarray


@dataclass(frozen=True)
class Augment:
    """The random tail of a training transform as batched tensor ops (see the module docstring).

    Attributes:
        padding: zero padding of ``RandomCrop`` in pixels (0: no crop).
        hflip, vflip: flip probabilities.
        degrees: ``(low, high)`` range of ``RandomRotation`` in degrees; ``(0, 0)``: no rotation.
    """

    padding: int = 0
    hflip: float = 0.0
    vflip: float = 0.0
    degrees: Tuple[float, float] = (0.0, 0.0)

    @property
    def rotates(self) -> bool:
        return self.degrees != (0.0, 0.0)

    @property
    def identity(self) -> bool:
        return not (self.padding or self.hflip or self.vflip or self.rotates)

    def draw(self, n: int, seed: int, epoch: int) -> AugmentParams:
        """The parameters of samples ``0..n-1`` in ``epoch``: a function of ``(seed, epoch, sample)`` only."""
        rng = np.random.default_rng([seed, epoch, 2])  # [seed, epoch] and [seed, epoch, 1] are the sampler's
        offsets = rng.integers(0, 2 * self.padding + 1, size=(2, n))
        flips = rng.random((2, n)) < np.array([[self.hflip], [self.vflip]])
        angle = rng.uniform(self.degrees[0], self.degrees[1], size=n)
        return AugmentParams(offsets[0], offsets[1], flips[0], flips[1], angle)

    @staticmethod
    def table(params: AugmentParams, device: torch.device) -> torch.Tensor:
        """``params`` packed as a float64 ``(N, 6)`` device tensor: top, left, hflip, vflip, cos, sin."""
        radians = np.radians(params.angle)
        columns = (params.top, params.left, params.hflip, params.vflip, np.cos(radians), np.sin(radians))
        return torch.from_numpy(np.stack(columns, 1).astype(np.float64)).to(device)

    def __call__(self, images: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Augment uint8 ``(B, C, H, W)`` images with their rows of :meth:`table`; returns uint8 (no rotation)
        or float64 holding whole numbers in [0, 255] (with rotation), shape unchanged."""
        if self.padding or self.hflip or self.vflip:
            images = self._crop_flip(images, table)
        if self.rotates:
            images = _rotate_like_pil(images, table[:, 4], table[:, 5])
        return images

    def _crop_flip(self, images: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        # crop of the zero-padded image, then the flips, as one gather: out[i, j] = padded[top + i', left + j']
        # with i' = H - 1 - i for a vertical flip (j' alike); offsets and flips are whole numbers in float64
        b, c, h, w = images.shape
        p = self.padding
        padded = F.pad(images, (p, p, p, p)) if p else images
        top, left, hflip, vflip = (table[:, k].long()[:, None] for k in range(4))
        rows, cols = torch.arange(h, device=images.device), torch.arange(w, device=images.device)
        rows = top + torch.where(vflip.bool(), h - 1 - rows, rows)  # (B, H)
        cols = left + torch.where(hflip.bool(), w - 1 - cols, cols)  # (B, W)
        index = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        return padded.flatten(2).gather(2, index).view(b, c, h, w)  # 3-4x faster on CPU than 4-d indexing


def _rotate_like_pil(images: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """PIL's ``rotate(angle, BILINEAR, fillcolor=0)`` of each image (torchvision's ``RandomRotation`` on PIL).

    PIL maps each output pixel centre ``(x, y)`` back through the rotation about the image centre,
    ``x_in = cx + cos * dx - sin * dy``, ``y_in = cy + sin * dx + cos * dy``; a source point outside
    ``[0, W) x [0, H)`` gives the fill (0), one inside is interpolated bilinearly from its four neighbours with
    indices clamped to the image, and the result is truncated to 8 bits. ``grid_sample`` with border padding
    is that interpolation; the computation runs in float64 so that it matches PIL's doubles exactly.
    """
    b, c, h, w = images.shape
    zero = torch.zeros_like(cos)
    # affine_grid's [-1, 1] coordinates: the aspect factors keep the rotation rigid in pixels
    theta = torch.stack([torch.stack([cos, -sin * h / w, zero], 1), torch.stack([sin * w / h, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    rotated = F.grid_sample(images.double(), grid, mode='bilinear', padding_mode='border', align_corners=False)
    inside = ((grid >= -1) & (grid < 1)).all(-1)[:, None]
    return torch.where(inside, rotated, 0.0).floor_()


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``Normalize(ToTensor(image))`` of uint8 (or whole-number float) images: the loader's float32 ops."""
    return images.float().div(255).sub(mean).div(std)


# ------------------------------------------------------------------------------------ transform plans
def _is_identity_jitter(op: Any) -> bool:
    return isinstance(op, T.ColorJitter) and all(
        getattr(op, k) is None for k in ('brightness', 'contrast', 'saturation', 'hue'))


def _refuse(op: Any, why: str) -> ValueError:
    return ValueError(f'--data-on-device: the transform {op!r} {why}; train without --data-on-device to use it')


def plan_transforms(transform: T.Compose) -> Tuple[T.Compose, Augment, Tuple[float, ...], Tuple[float, ...]]:
    """Split a loader transform into its deterministic PIL head (applied once, at decoding), the random
    :class:`Augment` tail, and the ``Normalize`` mean and std. Raises ``ValueError`` naming any other op."""
    ops = list(transform.transforms)
    split = next((i for i, op in enumerate(ops) if not isinstance(op, (T.Resize, T.CenterCrop))), len(ops))
    head, tail = ops[:split], ops[split:]
    padding, flips, degrees = 0, {'h': 0.0, 'v': 0.0}, (0.0, 0.0)
    while tail and type(tail[0]).__name__ not in _TO_TENSOR:
        op = tail.pop(0)
        if isinstance(op, T.RandomCrop):
            if op.pad_if_needed or op.padding_mode != 'constant' or op.fill != 0 or not isinstance(op.padding, int):
                raise _refuse(op, 'has no device version (only an int zero padding)')
            padding = op.padding
        elif isinstance(op, (T.RandomHorizontalFlip, T.RandomVerticalFlip)):
            flips['h' if isinstance(op, T.RandomHorizontalFlip) else 'v'] = float(op.p)
        elif isinstance(op, T.RandomRotation):
            fill_zero = op.fill in (0, None) or (isinstance(op.fill, (list, tuple)) and not any(op.fill))
            if op.interpolation != T.InterpolationMode.BILINEAR or op.expand or op.center is not None or not fill_zero:
                raise _refuse(op, 'has no device version (only bilinear, zero fill, no expand, centred)')
            degrees = (float(op.degrees[0]), float(op.degrees[1]))
        elif not _is_identity_jitter(op):  # timm adds ColorJitter(None, ...) for --color-jitter 0: a no-op
            raise _refuse(op, 'has no device version')
    if len(tail) != 2 or not isinstance(tail[1], T.Normalize):
        raise _refuse(T.Compose(tail), 'ends the transform, where ToTensor + Normalize were expected')
    norm = tail[1]
    mean, std = (tuple(float(v) for v in torch.as_tensor(t).flatten()) for t in (norm.mean, norm.std))
    return T.Compose(head), Augment(padding, flips['h'], flips['v'], degrees), mean, std


# --------------------------------------------------------------------------------------- decoding
def _stats(paths: Sequence[str]) -> List[Tuple[str, int, int]]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((p, st.st_size, st.st_mtime_ns))
    return out


def _fingerprint(reader: Any, indices: np.ndarray, head: T.Compose, class_map: Dict[str, int]) -> str:
    """A key that changes when the samples, their files or the decoding transform change."""
    root = Path(reader.root)
    names = [reader.filename(int(i), absolute=True) for i in indices]
    if root.is_file():  # an ImageFolder tar: its members are named, the tar is stat'ed
        files = _stats([str(root)])
    elif all(os.path.isfile(n) for n in names[:1]):
        files = _stats(names)
    else:  # members of tars inside a folder
        files = _stats(sorted(str(p) for p in root.rglob('*.tar')))
    text = json.dumps([_CACHE_VERSION, str(root.resolve()), names, files, sorted(class_map.items()), repr(head)])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _as_arrays(batch: List[Any]) -> List[Any]:
    """Worker side: the images as numpy arrays, which travel to the main process pickled by value. As torch
    tensors each would travel as a shared-memory file descriptor that stays open while the image is kept, and a
    data set larger than the process's file limit (``ulimit -n``) would fail ('received 0 items of ancdata')."""
    return [(None if image is None else image.numpy(), target) for image, target in batch]


def _decode(reader: Any, indices: np.ndarray, head: T.Compose, workers: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every sample through ``head`` (PIL) to uint8 ``(N, C, H, W)``, with ``workers`` loader processes."""
    dataset = SampleDataset(reader, indices, T.Compose(list(head.transforms) + [T.PILToTensor()]), skip_corrupt=True)
    loader = DataLoader(dataset, batch_size=_DECODE_BATCH, sampler=[(i, 0) for i in range(len(indices))],
                        num_workers=workers, collate_fn=_as_arrays)
    images, labels, unreadable = [], [], []
    for batch in loader:
        for image, target in batch:
            if image is None:
                unreadable.append(target)
            else:
                images.append(torch.from_numpy(image))
                labels.append(target)
    if unreadable:
        raise ValueError(f'--data-on-device: unreadable image(s) {unreadable[:5]} ({len(unreadable)} in all): every '
                         f'image is decoded up front, so fix or remove them, or train without --data-on-device '
                         f'(then --skip-corrupt skips them)')
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) != 1:
        raise ValueError(f'--data-on-device: the decoded images have several shapes {sorted(shapes)[:3]}; the '
                         f'transforms {head} must make them all one size')
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def load_split(reader: Any, indices: np.ndarray, head: T.Compose, workers: int = 0,
               class_map: Optional[Dict[str, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The samples ``indices`` of ``reader`` decoded through ``head``: uint8 images ``(N, C, H, W)`` and int64
    labels ``(N,)`` on the CPU, from the cache when an identical decoding was stored, else decoded and stored."""
    key = _fingerprint(reader, indices, head, class_map or {})
    path = cache_root() / 'device-data' / f'{key}.pt'
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        return cached['images'], cached['labels']
    images, labels = _decode(reader, indices, head, workers)
    with atomic_path(path) as tmp:
        torch.save({'images': images, 'labels': labels}, tmp)
    return images, labels


# ---------------------------------------------------------------------------------------- loaders
def _available_memory(device: torch.device) -> Optional[int]:
    """Bytes free on a CUDA device, or the host's MemAvailable for the CPU (``None`` where unknown)."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open('/proc/meminfo') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    except (OSError, StopIteration):
        return None


def _check_fits(nbytes: int, device: torch.device) -> None:
    free = _available_memory(device)
    if free is not None and nbytes > free // 2:  # the model, activations and augmented batches need the rest
        raise ValueError(f'--data-on-device: the data set takes {nbytes / 2 ** 30:.2f} GiB as uint8, more than half '
                         f'of the {free / 2 ** 30:.2f} GiB free on {device}; train without --data-on-device')


class DeviceSplit(NamedTuple):
    """One split on the device: uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor


class DeviceLoader:
    """Batches ``(x, y, [])`` of a :class:`DeviceSplit`, in the loader's format: ``x`` normalised float32 on the
    device, ``y`` int64 labels, no skipped files. Order and shards come from ``sampler``; training batches
    (``augment`` given) are full (drop_last), evaluation batches are not.

    Also the training sampler of :class:`~.data.Loaders`: :meth:`set_epoch` takes ``(epoch, start)``.
    """

    def __init__(self, split: DeviceSplit, batch_size: int, sampler: EpochSampler, mean: Sequence[float],
                 std: Sequence[float], augment: Optional[Augment] = None):
        self.split, self.batch_size, self.sampler, self.augment = split, batch_size, sampler, augment
        device = split.images.device
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)
                               for v in (mean, std))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.augment is not None else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, List[str]]]:
        device = self.split.images.device
        order = torch.from_numpy(self.sampler.positions()).to(device)  # one copy an epoch
        table = None
        if self.augment is not None and not self.augment.identity:
            params = self.augment.draw(len(self.split.images), self.sampler.seed, self.sampler.epoch)
            table = Augment.table(params, device)
        for b in range(len(self)):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            images = self.split.images[index]
            if table is not None:
                images = self.augment(images, table[index])
            yield normalize(images, self.mean, self.std), self.split.labels[index], []


def device_loaders(cfg: TrainConfig, splits: Splits, model: torch.nn.Module, device: torch.device, rank: int = 0,
                   world_size: int = 1) -> Loaders:
    """:func:`~.data.loaders_for_model`'s :class:`~.data.Loaders`, with both splits decoded once (cached) and
    kept on ``device``, batches gathered, augmented and normalised there."""
    data_config = resolve_data_config(data_args(cfg), model=model)
    train_tf, eval_tf = build_transforms(cfg, data_config)
    train_head, augment, mean, std = plan_transforms(train_tf)
    eval_head, eval_augment, eval_mean, eval_std = plan_transforms(eval_tf)
    if not eval_augment.identity:
        raise _refuse(eval_tf, 'is random, where an evaluation transform must be deterministic')
    decoded = []
    for reader, indices, head in ((splits.train_reader, splits.train_indices, train_head),
                                  (splits.val_reader, splits.val_indices, eval_head)):
        decoded.append(load_split(reader, indices, head, cfg.workers, _class_map(reader)))
    _check_fits(sum(images.numel() for images, _ in decoded), device)
    train, val = (DeviceSplit(images.to(device), labels.to(device)) for images, labels in decoded)
    train_sampler = EpochSampler(len(train.images), True, cfg.seed, world_size, rank, pad=True)
    val_sampler = EpochSampler(len(val.images), False, cfg.seed, world_size, rank, pad=False)
    train_loader = DeviceLoader(train, cfg.batch_size, train_sampler, mean, std, augment)
    val_loader = DeviceLoader(val, cfg.validation_batch_size or cfg.batch_size, val_sampler, eval_mean, eval_std)
    return Loaders(train_loader, val_loader, train_loader, data_config)
