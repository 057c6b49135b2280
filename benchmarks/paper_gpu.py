"""The CIFAR-10 columns of FMD's Tables 1 and 2, trained by ``timm-fmd train`` (``timm_fmd.train.fit``).

    python benchmarks/paper_gpu.py --table 2 --out runs/paper                   # Table 2 in full, one seed
    python benchmarks/paper_gpu.py --table both --seeds 0 1 2 --out runs/paper  # both tables, three seeds
    python benchmarks/paper_gpu.py --table both --subset 64 --batch-size 32 --epochs 1 --device cpu --out /tmp/quick
    python benchmarks/paper_gpu.py --pack output/cifar10     # 53 MiB of JPEGs for a lent GPU machine

Tang et al. (AAAI 2020), "Beyond Dropout: Feature Map Distortion to Regularize Deep Neural Networks". Each
row is a recipe in ``configs/`` (the paper's epochs, batch, optimiser and schedule are written there, with the
text they come from), plus the row's regulariser:

* Table 1, the conventional CNN without augmentation, 500 epochs, batch 128, SGD lr 0.01 decayed x0.1 at
  200/300/400, no weight decay: ``none``, ``dropout`` (0.5 on both FC layers), ``fmd`` (element-wise, both FC
  layers, p 0.5, gamma 5).
* Table 2, the pre-activation ResNet-56 of the authors' release with crop (pad 4), flip and rotation (15),
  200 epochs, batch 128, SGD lr 0.1 decayed x0.2 at 60/120/160 after a 1-epoch warm-up, weight decay 5e-4 on
  every parameter: ``none``, ``dropblock`` (0.05, block 6, after each conv of the last stage), and block FMD
  in the same places in two settings: ``fmd-release`` (the authors' release: gamma 5, block 6, the realised
  fraction 0.076 that its ``dist_prob=0.09`` gives, see ../shared/gpu/DESIGN.md) and ``fmd-text`` (the paper's
  text: gamma 30, block 6, p 0.05). FMD's probability ramps from 0 over the whole run, as in the release.

Every run is its own ``timm-fmd train`` process with its own run directory under ``OUT/runs``, pinned to its
own CPU cores (Linux's sched_setaffinity; ``--parallel`` runs at once on the one device; on CUDA under NVIDIA's
Multi-Process Service where ``nvidia-cuda-mps-control`` is, ``--mps``, so that their kernels run side by side
instead of taking turns); the data set is
decoded once up front into the trainer's ``--data-on-device`` cache, and on CUDA each run uses
``--cuda-graph`` (FMD rows only where the op is capture-safe), bf16 autocast and channels_last. A run that
crashes or is killed is resumed from its last checkpoint (``--resume``), by this command's retries or by
running the same command again; finished runs are kept. ``OUT/results.json`` merges the runs'
``results.json`` (written after each run) and ``OUT/table.md`` holds the table: final-epoch test top-1 (the
number to compare; no epoch is chosen on the test set) and, beside it, the best epoch's; s/epoch is the median
epoch time including evaluation; min/run is the trainer's wall time of the run (compilation and evaluation
included, summed over resumed sessions; process start and data loading not), and the last line the command's
wall time.

``--subset N`` trains and tests on N images of each split (seeded), for quick checks. Nothing is downloaded:
``--data-dir`` holds ``train.tar`` and ``test.tar`` (ImageFolder tars), the folders, or the ``.jpeg.pt`` files
of ``--pack``; a lent GPU machine gets only the repository (64 MiB), so ``--pack DIR`` writes the JPEG files
undecoded (53 MiB for CIFAR-10) into a git-ignored ``DIR`` that the machine's run carries.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import timm
import torch
from timm.data import create_dataset

import timm_fmd
from timm_fmd.ops.capture import capture_safe
from timm_fmd.train.checkpoint import atomic_path, atomic_write
from timm_fmd.train.config import TrainConfig, config_from_dict, load_yaml, merge, save_config
from timm_fmd.train.data import build_splits
from timm_fmd.train.device_data import device_loaders
from timm_fmd.train.model import is_fmd
from timm_fmd.train.report import MetricsLog

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'configs'
DEFAULT_DATA_DIR = ROOT.parent / 'shared' / 'data' / 'cifar10-jpg'
SPLITS = ('train', 'test')
USAGE_ERROR = 2  # timm-fmd's exit status for a bad option: a retry would fail the same way
MPS_CONTROL = 'nvidia-cuda-mps-control'


@dataclass(frozen=True)
class Method:
    """A row of a table: a recipe of ``configs/`` with the row's overrides, and the paper's CIFAR-10 top-1."""

    config: str
    overrides: Dict[str, Any]
    paper_top1: float
    description: str


TABLES: Dict[int, Dict[str, Method]] = {
    1: {
        'none': Method('cifar10_paper_cnn_baseline.yaml', {'model_kwargs': {'drop_rate': 0.0}}, 81.99,
                       'the CNN, no regulariser'),
        'dropout': Method('cifar10_paper_cnn_baseline.yaml', {}, 82.95, 'dropout 0.5 after both FC layers'),
        'fmd': Method('cifar10_paper_cnn_fmd.yaml', {}, 85.24, 'element FMD on both FC layers, p 0.5, gamma 5'),
    },
    2: {
        'none': Method('cifar10_resnet56_baseline.yaml', {'model_kwargs': {'drop_block_rate': 0.0}}, 93.95,
                       'pre-activation ResNet-56, no regulariser'),
        'dropblock': Method('cifar10_resnet56_baseline.yaml', {}, 94.18, 'DropBlock 0.05, block 6, last stage'),
        'fmd-release': Method('cifar10_resnet56_bfmd.yaml', {'fmd_gamma': 5.0, 'fmd_prob': 0.076}, 94.50,
                              "block FMD as the authors' release: gamma 5, block 6, p 0.076 (realised)"),
        'fmd-text': Method('cifar10_resnet56_bfmd.yaml', {}, 94.50,
                           "block FMD as the paper's text: gamma 30, block 6, p 0.05"),
    },
}


@dataclass(frozen=True)
class RunSpec:
    table: int
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f't{self.table}-{self.method}-s{self.seed}'


# ------------------------------------------------------------------------------------------------ configs
def scaled_schedule(cfg: TrainConfig, epochs: Optional[int]) -> Dict[str, Any]:
    """Overrides that stretch the recipe's decay epochs and FMD ramp to ``epochs`` (none at the recipe's length)."""
    if epochs is None or epochs == cfg.epochs:
        return {}
    factor = epochs / cfg.epochs
    milestones = sorted({max(1, round(m * factor)) for m in cfg.decay_milestones})
    return dict(epochs=epochs, decay_milestones=milestones, fmd_ramp_epochs=cfg.fmd_ramp_epochs * factor)


def train_config(spec: RunSpec, args: argparse.Namespace, data_dir: Path) -> TrainConfig:
    """The trainer's config of one run: the row's recipe, this command's device settings, the run's name."""
    method = TABLES[spec.table][spec.method]
    cfg = config_from_dict(dict(load_yaml(CONFIGS / method.config), **method.overrides))
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    graph = cuda if args.cuda_graph is None else args.cuda_graph
    if graph and is_fmd(cfg.model) and not capture_safe(device):
        graph = False  # the op's ramp would freeze under replay (timm_fmd.ops.capture): eager for this row
    overrides = dict(scaled_schedule(cfg, args.epochs), data_dir=str(data_dir), output=str(args.out / 'runs'),
                     batch_size=args.batch_size or cfg.batch_size,
                     experiment=spec.name, seed=spec.seed, device=args.device, data_on_device=args.data_on_device,
                     cuda_graph=graph, amp=cuda, amp_dtype='bfloat16', channels_last=cuda,
                     torchcompile='inductor' if args.compile else None, validation_batch_size=1000,
                     workers=0 if args.data_on_device else args.workers,  # on the device: decoded here, once
                     log_interval=10 ** 9, checkpoint_interval=0)
    return merge(cfg, overrides)


# --------------------------------------------------------------------------------------------------- data
def _split_source(data_dir: Path, split: str) -> Path:
    for path in (data_dir / f'{split}.tar', data_dir / split, data_dir / f'{split}.jpeg.pt'):
        if path.exists():
            return path
    raise FileNotFoundError(f'--data-dir: no {split}.tar, {split}/ or {split}.jpeg.pt in {data_dir}; the CIFAR-10 '
                            f'ImageFolder tars (or their --pack) are needed, nothing is downloaded')


def read_files(path: Path) -> List[tuple]:
    """``(name, bytes)`` of every image of an ImageFolder tar or folder (timm's reader, class-name order) or
    of a ``.jpeg.pt`` pack."""
    if path.name.endswith('.jpeg.pt'):
        pack = torch.load(path, weights_only=True)
        data, bounds = pack['data'].numpy().tobytes(), pack['offsets'].tolist()
        return [(name, data[bounds[i]:bounds[i + 1]]) for i, name in enumerate(pack['names'])]
    reader = create_dataset('', root=str(path)).reader
    files = []
    for index in range(len(reader)):
        fobj, _ = reader[index]
        with fobj:
            files.append((reader.filename(index), fobj.read()))
    if not files:
        raise ValueError(f'--data-dir: {path} holds no images')
    return files


def subset_indices(total: int, subset: Optional[int]) -> List[int]:
    """All indices, or ``subset`` of them drawn with a fixed seed, in file order."""
    if subset is None or subset >= total:
        return list(range(total))
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:subset].sort().values.tolist()


def write_tar(path: Path, files: Sequence[tuple]) -> None:
    """An ImageFolder tar of ``(name, bytes)`` files, written atomically."""
    with atomic_path(path) as tmp, tarfile.open(tmp, 'w') as tf:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def pack(data_dir: Path, out_dir: Path) -> List[Path]:
    """Each split's JPEG files, undecoded, in ``out_dir/{split}.jpeg.pt`` (53 MiB for CIFAR-10)."""
    paths = []
    for split in SPLITS:
        files = read_files(_split_source(data_dir, split))
        sizes = torch.tensor([0] + [len(b) for _, b in files])
        data = torch.frombuffer(bytearray(b''.join(b for _, b in files)), dtype=torch.uint8)
        paths.append(out_dir / f'{split}.jpeg.pt')
        with atomic_path(paths[-1]) as tmp:
            torch.save(dict(names=[n for n, _ in files], data=data, offsets=sizes.cumsum(0)), tmp)
    return paths


def training_data(data_dir: Path, out: Path, subset: Optional[int]) -> Path:
    """A folder with ``train.tar`` and ``test.tar`` for the trainer: ``data_dir`` itself when it holds them and
    no subset is asked for, else tars written once under ``out`` from the packs, folders or tars."""
    sources = {split: _split_source(data_dir, split) for split in SPLITS}
    if subset is None and all(p.suffix == '.tar' for p in sources.values()):
        return data_dir
    target = out / ('data' if subset is None else f'data-subset-{subset}')
    for split, source in sources.items():
        if not (target / f'{split}.tar').is_file():
            files = read_files(source)
            write_tar(target / f'{split}.tar', [files[i] for i in subset_indices(len(files), subset)])
    return target


def decode_once(cfg: TrainConfig) -> None:
    """Fill the trainer's --data-on-device cache for ``cfg`` here, once, instead of in every run process."""
    splits = build_splits(cfg)
    model = timm.create_model(timm_fmd.base_architecture(cfg.model), num_classes=len(splits.label_names))
    device_loaders(cfg, splits, model, torch.device('cpu'))


# ------------------------------------------------------------------------------------------------- runs
@dataclass
class Attempt:
    kind: str  # fresh or resume
    cores: List[int]
    start: float
    end: Optional[float] = None
    returncode: Optional[int] = None
    affinity: Optional[List[int]] = None  # as the process reported it to the OS right after its start


@dataclass
class Job:
    spec: RunSpec
    cfg: TrainConfig
    run_dir: Path
    attempts: List[Attempt] = field(default_factory=list)
    process: Any = None

    @property
    def finished(self) -> bool:
        return (self.run_dir / 'results.json').is_file()

    @property
    def resumable(self) -> bool:
        return (self.run_dir / 'checkpoints' / 'last.state.pt').is_file()


def core_sets(parallel: int) -> List[List[int]]:
    """This process's CPU cores split into ``parallel`` disjoint sets (sets repeat when cores are fewer)."""
    cores = sorted(os.sched_getaffinity(0))
    if parallel <= len(cores):
        return [cores[i::parallel] for i in range(parallel)]
    return [[cores[i % len(cores)]] for i in range(parallel)]


def mps_client_check(env: Dict[str, str]) -> Optional[str]:
    """``None`` when a CUDA client runs under the MPS daemon of ``env`` (a tiny kernel in a fresh process), else
    why not: a daemon can start and still refuse clients (permissions, compute mode)."""
    code = 'import torch; torch.ones(1, device="cuda").add_(1); torch.cuda.synchronize()'
    try:
        done = subprocess.run([sys.executable, '-c', code], env=dict(os.environ, **env), capture_output=True,
                              text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return 'a CUDA client did not finish within 180 s'
    lines = done.stderr.strip().splitlines()
    return None if done.returncode == 0 else (lines[-1] if lines else f'a CUDA client exited {done.returncode}')


@contextlib.contextmanager
def mps(mode: str, wanted: bool, client_check=mps_client_check) -> Iterator[Dict[str, str]]:
    """NVIDIA's Multi-Process Service for the runs of one command: processes on one GPU otherwise take turns
    (time slices), so runs too small to fill it would overlap only their host work; under MPS their kernels run
    side by side. ``mode`` ``auto`` starts a private MPS control daemon when ``wanted`` (CUDA, several runs at
    once) and ``nvidia-cuda-mps-control`` is on PATH, else goes on without it (a note says so); ``on`` requires
    it (``SystemExit`` otherwise); ``off`` never. A started daemon must serve a CUDA client (``client_check``)
    before the runs use it. Yields the environment the runs need (empty without MPS); the daemon is told to quit
    at the end."""
    binary = shutil.which(MPS_CONTROL) if mode == 'on' or (mode == 'auto' and wanted) else None
    if binary is None:
        if mode == 'on':
            raise SystemExit(f'--mps on: {MPS_CONTROL} (NVIDIA\'s Multi-Process Service) is not on PATH; install '
                             f'it with the CUDA driver utilities, or pass --mps off')
        if mode == 'auto' and wanted:
            print(f'note: no {MPS_CONTROL} on PATH: the runs take turns on the GPU (time slices); only their host '
                  f'work overlaps', flush=True)
        yield {}
        return
    folder = tempfile.mkdtemp(prefix='mps.')  # a short path: the daemon's pipe is a Unix socket (108 bytes)
    env = dict(CUDA_MPS_PIPE_DIRECTORY=os.path.join(folder, 'pipe'), CUDA_MPS_LOG_DIRECTORY=os.path.join(folder, 'log'))
    for path in env.values():
        os.mkdir(path)
    full = dict(os.environ, **env)
    def stop() -> None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([binary], input='quit\n', env=full, capture_output=True, text=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)

    try:
        started = subprocess.run([binary, '-d'], env=full, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        started = subprocess.CompletedProcess([binary, '-d'], 1, '', str(e))
    why = None
    if started.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        output = (started.stderr or started.stdout).strip()
        why = f'{MPS_CONTROL} -d failed: {output or f"exit {started.returncode}"}'
    else:
        refused = client_check(env)
        if refused is not None:
            stop()
            why = f'the MPS daemon served no CUDA client: {refused}'
    if why is not None:
        if mode == 'on':
            raise SystemExit(f'--mps on: {why}')
        print(f'note: {why}; the runs take turns on the GPU', flush=True)
        yield {}
        return
    print(f'MPS control daemon started (pipe {env["CUDA_MPS_PIPE_DIRECTORY"]})', flush=True)
    try:
        yield env
    finally:
        stop()


def _launch(job: Job, cores: List[int], out: Path, extra_env: Dict[str, str]) -> None:
    if job.resumable:
        kind, command = 'resume', ['--resume', str(job.run_dir)]
    else:
        if job.run_dir.exists():  # started, stopped before its first checkpoint: nothing to keep (the log is)
            shutil.rmtree(job.run_dir)
        config = out / 'configs' / f'{job.spec.name}.yaml'
        atomic_write(config, save_config(job.cfg))
        kind, command = 'fresh', ['-c', str(config)]
    log = open(out / 'logs' / f'{job.spec.name}.log', 'a')
    log.write(f'=== {kind} on cores {cores}\n')
    log.flush()
    env = dict(os.environ, OMP_NUM_THREADS=str(len(cores)), PYTHONUNBUFFERED='1', **extra_env)
    job.process = subprocess.Popen([sys.executable, '-m', 'timm_fmd', 'train', *command], stdout=log,
                                   stderr=subprocess.STDOUT, env=env, preexec_fn=lambda: os.sched_setaffinity(0, cores))
    log.close()
    attempt = Attempt(kind, cores, time.time())
    try:
        attempt.affinity = sorted(os.sched_getaffinity(job.process.pid))
    except OSError:  # already gone
        pass
    job.attempts.append(attempt)
    print(f'{job.spec.name}: {kind} (pid {job.process.pid}, cores {cores})', flush=True)


def run_jobs(jobs: List[Job], parallel: int, retries: int, out: Path,
             on_finish: Any = lambda job: None, env: Optional[Dict[str, str]] = None) -> List[Job]:
    """Run the unfinished jobs, ``parallel`` at a time on disjoint core sets (with ``env`` added to their
    environment); a job that fails is resumed from its checkpoint (or restarted when it has none) up to
    ``retries`` times, unless it exited with a usage error. Returns the failed jobs."""
    (out / 'logs').mkdir(parents=True, exist_ok=True)
    queue = collections.deque(j for j in jobs if not j.finished)
    slots: List[Optional[Job]] = [None] * max(1, min(parallel, len(queue)))
    cores = core_sets(len(slots))
    failed = []
    try:
        while queue or any(slots):
            for i, job in enumerate(slots):
                if job is None and queue:
                    slots[i] = queue.popleft()
                    _launch(slots[i], cores[i], out, env or {})
            time.sleep(0.2)
            for i, job in enumerate(slots):
                if job is None or job.process.poll() is None:
                    continue
                attempt = job.attempts[-1]
                attempt.end, attempt.returncode = time.time(), job.process.returncode
                slots[i] = None
                if job.finished:
                    on_finish(job)
                elif attempt.returncode != USAGE_ERROR and len(job.attempts) <= retries:
                    print(f'{job.spec.name}: exited with {attempt.returncode}, trying again', flush=True)
                    queue.appendleft(job)
                else:
                    print(f'{job.spec.name}: failed (exit {attempt.returncode}), see {out}/logs/{job.spec.name}.log',
                          flush=True)
                    failed.append(job)
    finally:
        for job in slots:
            if job is not None and job.process.poll() is None:
                job.process.kill()
    return failed


# ----------------------------------------------------------------------------------------------- report
def run_summary(job: Job) -> Dict[str, Any]:
    """One run's line of ``OUT/results.json``: its results.json, epoch times and this command's attempts."""
    results = json.loads((job.run_dir / 'results.json').read_text())
    rows = MetricsLog.read(job.run_dir / 'metrics.csv').rows
    method = TABLES[job.spec.table][job.spec.method]
    return dict(table=job.spec.table, method=job.spec.method, seed=job.spec.seed, description=method.description,
                run_dir=str(job.run_dir), config=method.config, overrides=method.overrides,
                paper_top1=method.paper_top1, epochs=results['epochs'],
                final_test_top1=results['final']['val_top1'], best_test_top1=results['best']['val_top1'],
                best_epoch=results['best']['epoch'], final_train_top1=results['final']['train_top1'],
                seconds_per_epoch=statistics.median(r['epoch_time_s'] for r in rows),
                minutes=results['wall_time_s'] / 60, cuda_graph=job.cfg.cuda_graph,
                attempts=[dataclasses.asdict(a) for a in job.attempts], results=results)


def _mean_std(values: List[Optional[float]], digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return '-'
    if len(values) == 1:
        return f'{values[0]:.{digits}f}'
    return f'{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}'


def results_table(runs: List[Dict[str, Any]]) -> str:
    """One row per table and method: mean ± std over its seeds, the paper's number beside."""
    lines = ['| table | method | seeds | epochs | test top-1 final | test top-1 best | train top-1 | s/epoch | '
             'min/run | paper |', '|---|---|---|---|---|---|---|---|---|---|']
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for run in sorted(runs, key=lambda r: (r['table'], list(TABLES[r['table']]).index(r['method']), r['seed'])):
        groups.setdefault((run['table'], run['method']), []).append(run)
    for (table, method), group in groups.items():
        col = lambda key, digits=2: _mean_std([r[key] for r in group], digits)  # noqa: E731
        lines.append(f'| {table} | {method} | {len(group)} | {group[0]["epochs"]} | {col("final_test_top1")} | '
                     f'{col("best_test_top1")} | {col("final_train_top1")} | {col("seconds_per_epoch", 1)} | '
                     f'{col("minutes", 1)} | {group[0]["paper_top1"]:.2f} |')
    return '\n'.join(lines)


# --------------------------------------------------------------------------------------------------- CLI
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected an integer >= 1, got {text}')
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    methods = sorted({m for table in TABLES.values() for m in table})
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--table', default='both', choices=['1', '2', 'both'])
    parser.add_argument('--methods', nargs='+', default=methods, choices=methods,
                        help='rows to run; each table runs those it has (1: none dropout fmd; '
                             '2: none dropblock fmd-release fmd-text)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0])
    parser.add_argument('--epochs', type=_positive_int, help='default: the paper\'s (500 / 200); shorter runs '
                                                              'scale the decay epochs and the FMD ramp')
    parser.add_argument('--batch-size', type=_positive_int, help='default: the paper\'s 128')
    parser.add_argument('--out', type=Path, default=Path('output/paper_gpu'), help='run directories, logs, tables')
    parser.add_argument('--data-dir', type=Path, default=DEFAULT_DATA_DIR,
                        help='train/test as ImageFolder tars or folders, or the .jpeg.pt files of --pack')
    parser.add_argument('--subset', type=_positive_int, help='use this many images of each split (a quick check)')
    parser.add_argument('--pack', type=Path, metavar='DIR',
                        help='only write the undecoded JPEGs of --data-dir to DIR/{train,test}.jpeg.pt')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--parallel', type=_positive_int,
                        help='runs at once on the device, each on its own CPU cores (default: all runs on CUDA, '
                             'one per 4 cores on CPU)')
    parser.add_argument('--retries', type=int, default=2, help='times a failed run is resumed (default 2)')
    parser.add_argument('--data-on-device', action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument('--cuda-graph', action=argparse.BooleanOptionalAction,
                        help='default: on CUDA, for every row whose model can be captured')
    parser.add_argument('--compile', action='store_true', help='torch.compile the models (inductor)')
    parser.add_argument('--mps', default='auto', choices=['auto', 'on', 'off'],
                        help="NVIDIA's Multi-Process Service, so that runs at once on one GPU run their kernels side "
                             "by side (auto: on CUDA with several runs at once, where nvidia-cuda-mps-control is)")
    parser.add_argument('-j', '--workers', type=int, default=min(4, len(os.sched_getaffinity(0))),
                        help='loader processes: decoding the data set once (--data-on-device), else each run\'s')
    args = parser.parse_args(argv)
    if any(s < 0 for s in args.seeds):
        parser.error(f'--seeds must be integers >= 0, got {args.seeds}')
    if args.retries < 0:
        parser.error(f'--retries must be >= 0, got {args.retries}')
    args.tables = [1, 2] if args.table == 'both' else [int(args.table)]
    args.specs = [RunSpec(t, m, s) for t in args.tables for m in TABLES[t] if m in args.methods for s in args.seeds]
    if not args.specs and not args.pack:
        parser.error(f'--methods {args.methods}: none is a row of table(s) {args.tables}')
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error(f'--device {args.device}: no CUDA device is available here')
    if args.cuda_graph and device.type != 'cuda':
        parser.error(f'--cuda-graph: needs a CUDA device, got --device {args.device}')
    if args.mps == 'on' and device.type != 'cuda':
        parser.error(f'--mps on: MPS shares a CUDA device, got --device {args.device}')
    if args.parallel is None:
        args.parallel = len(args.specs) if device.type == 'cuda' else max(1, len(os.sched_getaffinity(0)) // 4)
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run (or resume) the chosen rows and seeds; print the table and write ``OUT/results.json``, ``OUT/table.md``."""
    args = parse_args(argv)
    if args.pack:
        paths = pack(args.data_dir, args.pack)
        print('\n'.join(f'{p}: {p.stat().st_size / 2 ** 20:.1f} MiB' for p in paths))
        return dict(packed=[str(p) for p in paths])
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = training_data(args.data_dir, args.out, args.subset)
    jobs = [Job(spec, cfg, args.out / 'runs' / spec.name)
            for spec, cfg in ((s, train_config(s, args, data_dir)) for s in args.specs)]
    if args.data_on_device:
        for job in jobs:
            if not job.finished:  # the first decodes, the others find the cache
                decode_once(dataclasses.replace(job.cfg, workers=args.workers))
    print(f'data {data_dir} ready in {time.time() - start:.1f} s; {len(jobs)} runs, {args.parallel} at a time on '
          f'{args.device}', flush=True)
    payload = dict(device=args.device, torch=torch.__version__, timm=timm.__version__, timm_fmd=timm_fmd.__version__,
                   gpu=torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else None,
                   data_dir=str(data_dir), subset=args.subset, runs=[])
    summaries: Dict[str, Dict[str, Any]] = {}

    def finished(job: Job) -> None:
        summary = summaries[job.spec.name] = run_summary(job)
        payload['runs'] = [summaries[j.spec.name] for j in jobs if j.spec.name in summaries]
        atomic_write(args.out / 'results.json', json.dumps(payload, indent=1))
        print(f"{job.spec.name}: test top-1 {summary['final_test_top1']:.2f} (best {summary['best_test_top1']:.2f}), "
              f"{summary['seconds_per_epoch']:.2f} s/epoch", flush=True)

    for job in jobs:
        if job.finished:
            finished(job)
    together = min(args.parallel, sum(not j.finished for j in jobs)) > 1
    with mps(args.mps, wanted=torch.device(args.device).type == 'cuda' and together) as mps_env:
        payload['mps'] = bool(mps_env)
        failed = run_jobs(jobs, args.parallel, args.retries, args.out, on_finish=finished, env=mps_env)
    table = results_table(payload['runs'])
    wall = (time.time() - start) / 60
    text = (f'{table}\n\n{len(payload["runs"])} runs on {payload["gpu"] or args.device}'
            f'{" (MPS)" if payload["mps"] else ""}, {wall:.1f} min wall')
    atomic_write(args.out / 'table.md', text + '\n')
    print(text)
    if failed:
        raise SystemExit(f'{len(failed)} run(s) failed: {", ".join(j.spec.name for j in failed)}')
    return dict(payload, wall_minutes=wall, table=table)


if __name__ == '__main__':
    main()
