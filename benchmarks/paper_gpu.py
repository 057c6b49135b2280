"""FMD's CIFAR-10 Table 1 and Table 2 settings on one GPU, with the data and augmentation on the device.

    python benchmarks/paper_gpu.py --table both --epochs 30 --seeds 0 --out paper_gpu.json   # a short pass
    python benchmarks/paper_gpu.py --table 2 --methods none fmd --compile       # the paper's 200 epochs
    python benchmarks/paper_gpu.py --table both --subset 256 --epochs 1 --device cpu   # a quick check
    python benchmarks/paper_gpu.py --pack output/cifar10   # 53 MiB of JPEGs for a lent GPU machine

Tang et al. (AAAI 2020), "Beyond Dropout: Feature Map Distortion to Regularize Deep Neural Networks":

* Table 1, the conventional CNN (``paper_cnn``) without augmentation: no regulariser, dropout 0.5 on
  the two FC layers, element-wise FMD on the same layers (p 0.5, gamma 5). 500 epochs, batch 128,
  SGD lr 0.01, momentum 0.9, decayed x0.1 at epochs 200/300/400. The paper states no weight decay;
  none here (as ``configs/cifar10_paper_cnn_fmd.yaml``), so the regulariser is the only one.
* Table 2, the pre-activation ResNet-56 of the authors' release (``cifar_preresnet56``) with random
  crop (4 px zero padding), horizontal flip and rotation within 15 degrees: no regulariser, DropBlock
  0.05 (block 6) in the last stage, block FMD after the convs of the last stage (block 6, p 0.05,
  gamma 30). 200 epochs, batch 128, SGD lr 0.1, momentum 0.9, weight decay 5e-4 on every parameter,
  decayed x0.2 at epochs 60/120/160, after a 1-epoch linear warm-up per step (the release's train.py).

CIFAR-10 is decoded once (PIL) from the ImageFolder tars into uint8 tensors, cached as a ``.pt`` file under
``$TIMM_FMD_CACHE`` (default ``~/.cache/timm_fmd``) and moved to the device once; each batch is then
gathered, augmented and normalised there, batched, from a device ``torch.Generator`` (the seed also
sets the initialisation and the FMD/dropout masks). A shorter ``--epochs`` scales the decay
milestones proportionally; the FMD probability ramps from 0 over the whole run, as in the release.
Test top-1 is measured on the test split after every epoch; "s/epoch" is the median over epochs of
the training plus evaluation time (so compilation in the first epoch does not count), "min" the
run's whole wall time. Nothing is downloaded: the tars must exist. A lent GPU machine gets only the
repository (64 MiB at most), not the 92 MB of tars beside it: ``--pack DIR`` writes the undecoded JPEGs
(53 MiB) to ``DIR/{train,test}.jpeg.pt``, which a git-ignored ``DIR`` can carry there for ``--data-dir DIR``.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import create_dataset
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torchvision.transforms.functional import pil_to_tensor

import timm_fmd
from timm_fmd.models import CIFAR10_MEAN, CIFAR10_STD
from timm_fmd.train.images import load_rgb

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'cifar10-jpg'
EVAL_BATCH = 1000


@dataclass(frozen=True)
class Recipe:
    """One table's training recipe, as the paper (and for Table 2 the authors' release) states it."""

    epochs: int
    lr: float
    weight_decay: float
    milestones: Tuple[int, ...]
    decay_rate: float
    augment: bool
    warmup_epochs: int = 0
    batch_size: int = 128
    momentum: float = 0.9


@dataclass(frozen=True)
class Method:
    model: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    paper_top1: Optional[float] = None


RECIPES = {
    1: Recipe(epochs=500, lr=0.01, weight_decay=0.0, milestones=(200, 300, 400), decay_rate=0.1, augment=False),
    2: Recipe(epochs=200, lr=0.1, weight_decay=5e-4, milestones=(60, 120, 160), decay_rate=0.2, augment=True,
              warmup_epochs=1),
}
METHODS: Dict[int, Dict[str, Method]] = {
    1: {
        'none': Method('paper_cnn', {}, 81.99),
        'dropout': Method('paper_cnn', dict(drop_rate=0.5), 82.95),
        'fmd': Method('fmd_paper_cnn', dict(fmd_stages=(-2, -1), fmd_sites=('conv',), fmd_block_size=0,
                                            fmd_prob=0.5, fmd_gamma=5.0), 85.24),
    },
    2: {
        'none': Method('cifar_preresnet56', {}, 93.95),
        'dropblock': Method('cifar_preresnet56', dict(drop_block_rate=0.05), 94.18),
        'fmd': Method('fmd_cifar_preresnet56', dict(fmd_stages=(-1,), fmd_sites=('conv',), fmd_block_size=6,
                                                    fmd_prob=0.05, fmd_gamma=30.0), 94.50),
    },
}


# ------------------------------------------------------------------------------------------------ data
class Data(NamedTuple):
    """CIFAR-10 on one device: uint8 images (N, 3, 32, 32) and int64 labels (N,) of each split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


class Jpegs(NamedTuple):
    """The JPEG files of one split, undecoded: their bytes back to back, N + 1 offsets, N labels."""

    data: torch.Tensor
    offsets: torch.Tensor
    labels: torch.Tensor


def cache_dir() -> Path:
    return Path(os.environ.get('TIMM_FMD_CACHE', '~/.cache/timm_fmd')).expanduser()


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = 'wb') -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix='.tmp')
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would have made
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_tar(tar: Path) -> Jpegs:
    """The files of an ImageFolder tar, labelled in class-name order (timm's ``create_dataset``)."""
    reader = create_dataset('', root=str(tar)).reader
    files, labels = [], []
    for index in range(len(reader)):
        file, label = reader[index]
        files.append(file.read())
        labels.append(label)
    if not files:
        raise ValueError(f'--data-dir: {tar} holds no images')
    offsets = torch.tensor([0] + [len(f) for f in files]).cumsum(0)
    return Jpegs(torch.frombuffer(bytearray(b''.join(files)), dtype=torch.uint8), offsets, torch.tensor(labels))


def read_split(path: Path) -> Jpegs:
    """A split from an ImageFolder ``.tar`` or from a ``.jpeg.pt`` file written by ``--pack``."""
    if path.suffix == '.tar':
        return read_tar(path)
    return Jpegs(**torch.load(path, weights_only=True))


def subset_indices(total: int, subset: Optional[int]) -> List[int]:
    """All indices, or ``subset`` of them drawn with a fixed seed (every class present), in file order."""
    if subset is None or subset >= total:
        return list(range(total))
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:subset].sort().values.tolist()


def decode(jpegs: Jpegs, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode the chosen files as the trainer does (``load_rgb``: faithful 8-bit RGB) to uint8 (N, 3, 32, 32)."""
    data, bounds = jpegs.data.numpy().tobytes(), jpegs.offsets.tolist()
    images = torch.empty((len(indices), 3, 32, 32), dtype=torch.uint8)
    for row, index in enumerate(indices):
        image = load_rgb(io.BytesIO(data[bounds[index]:bounds[index + 1]]), name=f'image {index}')
        if image.size != (32, 32):
            raise ValueError(f'image {index} is {image.size[0]}x{image.size[1]}, expected 32x32 (CIFAR-10)')
        images[row] = pil_to_tensor(image)
    return images, jpegs.labels[indices]


def load_split(path: Path, subset: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``decode(read_split(path))``, cached: the key holds the file's path, size and mtime, and the subset."""
    stat = path.stat()
    digest = hashlib.sha1(f'{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}'.encode()).hexdigest()[:12]
    cache = cache_dir() / f'cifar10-{path.name.split(".")[0]}-{subset or "all"}-{digest}.pt'
    if cache.is_file():
        cached = torch.load(cache, weights_only=True)
        return cached['images'], cached['labels']
    jpegs = read_split(path)
    images, labels = decode(jpegs, subset_indices(len(jpegs.labels), subset))
    atomic_write(cache, lambda f: torch.save({'images': images, 'labels': labels}, f))
    return images, labels


def split_path(data_dir: Path, split: str) -> Path:
    """``split.tar`` in ``data_dir``, else the ``split.jpeg.pt`` that ``--pack`` writes."""
    for path in (data_dir / f'{split}.tar', data_dir / f'{split}.jpeg.pt'):
        if path.is_file():
            return path
    raise FileNotFoundError(f'--data-dir: neither {split}.tar nor {split}.jpeg.pt in {data_dir}; the CIFAR-10 '
                            f'ImageFolder tars (or their --pack) are needed, nothing is downloaded')


def load_cifar10(data_dir: Path, subset: Optional[int], device: torch.device) -> Data:
    """Both splits of ``data_dir`` on ``device`` (``subset`` images of each at most)."""
    (train_x, train_y), (test_x, test_y) = (load_split(split_path(data_dir, s), subset) for s in ('train', 'test'))
    return Data(*(t.to(device) for t in (train_x, train_y, test_x, test_y)))


def pack_cifar10(data_dir: Path, out_dir: Path) -> List[Path]:
    """Write each split's JPEG files, undecoded, to ``out_dir/{split}.jpeg.pt`` (53 MiB for all of CIFAR-10).

    The tars are 92 MB, mostly headers; the packed files fit the 64 MiB working tree that reaches a lent
    GPU machine, which then reads them with ``--data-dir out_dir``.
    """
    paths = []
    for split in ('train', 'test'):
        jpegs = read_split(split_path(data_dir, split))
        paths.append(out_dir / f'{split}.jpeg.pt')
        atomic_write(paths[-1], lambda f: torch.save(jpegs._asdict(), f))
    return paths


# ----------------------------------------------------------------------------------------- augmentation
def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of the zero-padded batch back to its size (torchvision's RandomCrop(padding))."""
    b, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (2, b, 1), device=images.device, generator=generator)
    rows = offsets[0] + torch.arange(h, device=images.device)  # (B, H) source rows of each sample
    cols = offsets[1] + torch.arange(w, device=images.device)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def random_hflip(images: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Mirror each sample left-right with probability ``prob``."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < prob
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_rotate(images: torch.Tensor, degrees: float, generator: torch.Generator,
                  mode: str = 'nearest') -> torch.Tensor:
    """Rotate each float sample about its centre by an angle uniform in [-degrees, degrees], zero fill.

    ``nearest`` is torchvision's ``RandomRotation`` default, which the authors' release uses.
    """
    b, _, h, w = images.shape
    angle = (torch.rand(b, device=images.device, generator=generator) * 2 - 1) * math.radians(degrees)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    # affine_grid works in [-1, 1] coordinates; the aspect factors keep the rotation rigid in pixels
    theta = torch.stack([torch.stack([cos, -sin * h / w, zero], 1), torch.stack([sin * w / h, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode='zeros', align_corners=False)


@functools.lru_cache(maxsize=None)
def _channel_stats(mean: Tuple[float, ...], std: Tuple[float, ...], device: torch.device) -> Tuple[torch.Tensor, ...]:
    # made once per device: a host-to-device copy at every step would stall the GPU stream
    return tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (mean, std))


def normalize(images: torch.Tensor, mean: Tuple[float, ...] = CIFAR10_MEAN,
              std: Tuple[float, ...] = CIFAR10_STD) -> torch.Tensor:
    """uint8 or [0, 1] float images to ``(x - mean) / std`` float32."""
    x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
    mean_t, std_t = _channel_stats(tuple(mean), tuple(std), x.device)
    return (x - mean_t) / std_t


def train_batch(images: torch.Tensor, augment: bool, generator: torch.Generator) -> torch.Tensor:
    """The training transform of a uint8 batch: crop 4 + flip 0.5 + rotate 15 when ``augment``, then normalise."""
    if augment:
        images = random_rotate(random_hflip(random_crop(images, 4, generator), 0.5, generator).float() / 255,
                               15.0, generator)
    return normalize(images)


# -------------------------------------------------------------------------------------------- training
def scale_milestones(milestones: Sequence[int], epochs: int, paper_epochs: int) -> List[float]:
    """The paper's decay epochs stretched to a run of ``epochs`` (unchanged at the paper's length)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f'epochs must be an int >= 1, got {epochs!r}')
    return [m * epochs / paper_epochs for m in milestones]


@dataclass
class RunSettings:
    epochs: Optional[int] = None  # None: the paper's
    batch_size: Optional[int] = None
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    fmd_prob: Optional[float] = None  # None: the table's


def _mean_top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: RunSettings,
               amp: Callable[[], Any]) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    with torch.no_grad(), amp():
        for start in range(0, len(images), EVAL_BATCH):
            x = normalize(images[start:start + EVAL_BATCH])
            if settings.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            correct += (model(x).argmax(1) == labels[start:start + EVAL_BATCH]).sum()
    return 100.0 * correct.item() / len(images)


def train_run(table: int, method: str, seed: int, data: Data, settings: RunSettings,
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train one method of one table with one seed; the per-epoch history and the final numbers."""
    recipe, spec = RECIPES[table], METHODS[table][method]
    epochs = settings.epochs or recipe.epochs
    batch_size = settings.batch_size or recipe.batch_size
    device = data.train_images.device
    n_train = len(data.train_images)
    steps = math.ceil(n_train / batch_size)
    kwargs = dict(spec.kwargs)
    if spec.model.startswith('fmd_'):
        kwargs['fmd_ramp_steps'] = epochs * steps  # 0 -> target over the whole run, as the release
        if settings.fmd_prob is not None:
            kwargs['fmd_prob'] = settings.fmd_prob
    torch.manual_seed(seed)
    model = timm.create_model(spec.model, num_classes=10, **kwargs).to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    # The release's plain torch SGD decays every parameter, norms and biases included.
    optimizer = create_optimizer_v2(model, opt='momentum', lr=recipe.lr, momentum=recipe.momentum,
                                    weight_decay=recipe.weight_decay, filter_bias_and_bn=False)
    milestones = scale_milestones(recipe.milestones, epochs, recipe.epochs)
    scheduler, _ = create_scheduler_v2(optimizer, sched='multistep', num_epochs=epochs, decay_milestones=milestones,
                                       decay_rate=recipe.decay_rate, warmup_epochs=recipe.warmup_epochs,
                                       warmup_lr=0.0, step_on_epochs=False, updates_per_epoch=steps)
    forward = torch.compile(model, dynamic=False) if settings.compile else model
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.amp)  # noqa: E731
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator(device=device).manual_seed(seed)

    history, update, run_start = [], 0, time.perf_counter()
    for epoch in range(epochs):
        start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        lr = optimizer.param_groups[0]['lr']
        order = torch.randperm(n_train, device=device, generator=generator)
        for first in range(0, n_train, batch_size):
            idx = order[first:first + batch_size]
            x, y = train_batch(data.train_images[idx], recipe.augment, generator), data.train_labels[idx]
            if settings.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp():
                output = forward(x)
                loss = loss_fn(output, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            update += 1
            scheduler.step_update(num_updates=update)
            loss_sum += loss.detach() * len(idx)  # device-side sums: no sync inside the epoch
            correct += (output.detach().argmax(1) == y).sum()
        train_loss, train_top1 = loss_sum.item() / n_train, 100.0 * correct.item() / n_train
        test_top1 = _mean_top1(forward, data.test_images, data.test_labels, settings, amp)
        seconds = time.perf_counter() - start
        history.append(dict(epoch=epoch + 1, lr=lr, train_loss=train_loss, train_top1=train_top1,
                            test_top1=test_top1, seconds=seconds))
        log(f'table {table} {method} seed {seed} epoch {epoch + 1}/{epochs}  lr {lr:.4g}  loss {train_loss:.4f}  '
            f'train {train_top1:.2f}%  test {test_top1:.2f}%  {seconds:.1f} s')
    best = max(history, key=lambda h: h['test_top1'])
    return dict(
        table=table, method=method, seed=seed, model=spec.model, model_kwargs=kwargs, epochs=epochs,
        paper_epochs=recipe.epochs, batch_size=batch_size, recipe=asdict(recipe), milestones=milestones,
        train_images=n_train, test_images=len(data.test_images), device=str(device), amp=settings.amp,
        channels_last=settings.channels_last, compile=settings.compile, fmd_prob_final=timm_fmd.current_prob(model),
        history=history, final_test_top1=history[-1]['test_top1'], best_test_top1=best['test_top1'],
        best_epoch=best['epoch'], final_train_top1=history[-1]['train_top1'],
        seconds_per_epoch=statistics.median(h['seconds'] for h in history),
        total_minutes=(time.perf_counter() - run_start) / 60, paper_top1=spec.paper_top1)


# --------------------------------------------------------------------------------------------- report
def _mean_std(values: List[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f'{values[0]:.{digits}f}'
    return f'{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}'


def results_table(runs: List[Dict[str, Any]]) -> str:
    """One row per table and method: mean ± std over its seeds."""
    lines = ['| table | method | seeds | epochs | test top-1 final | test top-1 best | train top-1 | s/epoch | '
             'min/run | paper |', '|---|---|---|---|---|---|---|---|---|---|']
    groups: Dict[Tuple[int, str], List[Dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run['table'], run['method']), []).append(run)
    for (table, method), group in groups.items():
        col = lambda key, digits=2: _mean_std([r[key] for r in group], digits)  # noqa: E731
        paper = group[0]['paper_top1']
        lines.append(f'| {table} | {method} | {len(group)} | {group[0]["epochs"]} | {col("final_test_top1")} | '
                     f'{col("best_test_top1")} | {col("final_train_top1")} | {col("seconds_per_epoch", 1)} | '
                     f'{col("total_minutes", 1)} | {"-" if paper is None else f"{paper:.2f}"} |')
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------ CLI
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected an integer >= 1, got {text}')
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    methods = sorted({m for table in METHODS.values() for m in table})
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--table', default='both', choices=['1', '2', 'both'])
    parser.add_argument('--methods', nargs='+', default=methods, choices=methods,
                        help='methods to run; each table runs those it has (Table 1: none dropout fmd, '
                             'Table 2: none dropblock fmd)')
    parser.add_argument('--epochs', type=_positive_int, help='default: the paper\'s (500 / 200)')
    parser.add_argument('--batch-size', type=_positive_int, help='default: the paper\'s 128')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0])
    parser.add_argument('--fmd-prob', type=float, help='override the fmd method\'s p (Table 1: 0.5, Table 2: 0.05)')
    parser.add_argument('--data-dir', type=Path, default=DEFAULT_DATA_DIR,
                        help='folder with train.tar and test.tar, or with the train/test.jpeg.pt of --pack')
    parser.add_argument('--pack', type=Path, metavar='DIR',
                        help='only write the undecoded JPEGs of --data-dir to DIR/{train,test}.jpeg.pt')
    parser.add_argument('--subset', type=_positive_int, help='use this many images of each split (a quick check)')
    parser.add_argument('--out', type=Path, default=Path('paper_gpu_results.json'))
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action=argparse.BooleanOptionalAction, help='bf16 autocast (default: on CUDA)')
    parser.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    args = parser.parse_args(argv)
    if any(s < 0 for s in args.seeds):
        parser.error(f'--seeds must be integers >= 0, got {args.seeds}')
    if args.fmd_prob is not None and not 0.0 <= args.fmd_prob <= 1.0:
        parser.error(f'--fmd-prob must be in [0, 1], got {args.fmd_prob}')
    args.tables = [1, 2] if args.table == 'both' else [int(args.table)]
    if not any(m in METHODS[t] for t in args.tables for m in args.methods):
        parser.error(f'--methods {args.methods}: none is a method of table(s) {args.tables}')
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error(f'--device {args.device}: no CUDA device is available here')
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())  # generator and tensors must agree
    args.device = device
    if args.amp is None:
        args.amp = device.type == 'cuda'
    return args


def main(argv: Optional[Sequence[str]] = None,
         load_data: Callable[[Path, Optional[int], torch.device], Data] = load_cifar10) -> Dict[str, Any]:
    """Run the chosen tables, methods and seeds; print a table and write every result to ``--out``."""
    args = parse_args(argv)
    if args.pack:
        paths = pack_cifar10(args.data_dir, args.pack)
        print('\n'.join(f'{p}: {p.stat().st_size / 2 ** 20:.1f} MiB' for p in paths))
        return dict(packed=[str(p) for p in paths])
    if args.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    data = load_data(args.data_dir, args.subset, args.device)
    print(f'data: {len(data.train_images)} train / {len(data.test_images)} test images on {args.device} '
          f'in {time.perf_counter() - start:.1f} s', flush=True)
    settings = RunSettings(epochs=args.epochs, batch_size=args.batch_size, amp=args.amp,
                           channels_last=args.channels_last, compile=args.compile, fmd_prob=args.fmd_prob)
    payload = dict(settings=asdict(settings), device=str(args.device), data_dir=str(args.data_dir),
                   subset=args.subset,
                   torch=torch.__version__, timm=timm.__version__, timm_fmd=timm_fmd.__version__,
                   gpu=torch.cuda.get_device_name(args.device) if args.device.type == 'cuda' else None, runs=[])
    for table in args.tables:
        for method in (m for m in METHODS[table] if m in args.methods):
            for seed in args.seeds:
                payload['runs'].append(train_run(table, method, seed, data, settings,
                                                 log=lambda line: print(line, flush=True)))
                # after every run: a crash keeps the finished ones
                atomic_write(args.out, lambda f: json.dump(payload, f, indent=1), mode='w')
    print(results_table(payload['runs']))
    print(f'results: {args.out}')
    return payload


if __name__ == '__main__':
    main()
