"""The op and a ResNet-50 step on CPU: this checkout against an earlier commit, side by side in one process.

Separate runs of ``bench_op.py`` / ``bench_resnet50.py`` on a shared 2-core machine swing by 30% between runs,
which hides a 5% regression. Here both versions live in one process (the earlier commit's ``src/timm_fmd`` is
extracted with ``git archive`` and imported as ``timm_fmd_base``) and their calls alternate, so machine noise
hits both alike::

    python benchmarks/ab_previous.py --base 3239ce8 [--part op|resnet50|both] [--repeats 15]

Op: ``feature_map_distortion`` forward+backward, block 7, p 0.1, a 3x3 next conv, one thread, the shapes of
``bench_op.py``. ResNet-50: one SGD step, batch 8, 224x224, FMD at the 38 conv+skip sites of layer3+4 (as
``bench_resnet50.py``), two threads. Prints median times and the ratio this/base per row.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'src'))


def import_base(rev: str, where: Path):
    """The package of commit ``rev`` as ``timm_fmd_base`` (its registry finds this checkout's twins registered)."""
    archive = subprocess.run(['git', '-C', str(ROOT), 'archive', rev, 'src/timm_fmd'], check=True,
                             capture_output=True).stdout
    subprocess.run(['tar', '-x', '-C', str(where)], input=archive, check=True)
    (where / 'src' / 'timm_fmd').rename(where / 'timm_fmd_base')
    for source in (where / 'timm_fmd_base').rglob('*.py'):  # its torch.library ops in a namespace of their own
        text = source.read_text()
        source.write_text(re.sub(r"timm_fmd(?=::)|(?<=torch\.ops\.)timm_fmd\b|(?<=Library\(')timm_fmd(?=')",
                                 'timm_fmd_base', text))
    sys.path.insert(0, str(where))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        importlib.import_module('timm_fmd_base')

    def first(*names):
        for name in names:
            try:
                return importlib.import_module(name)
            except ModuleNotFoundError:
                continue
        raise ModuleNotFoundError(names)
    return first('timm_fmd_base.ops.distortion', 'timm_fmd_base.distortion'), first('timm_fmd_base.inject')


def alternate(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of each callable, calls alternating (order reversed every round)."""
    names, times = list(fns), {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            fns[k]()
            if r >= warmup:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_op(base_op, this_op, repeats: int) -> None:
    torch.set_num_threads(1)
    print('op fwd+bwd, block 7, p 0.1, 3x3 next conv, 1 thread (median ms)')
    for shape in [(32, 1024, 14, 14), (32, 2048, 7, 7), (64, 64, 32, 32)]:
        conv = torch.nn.Conv2d(shape[1], shape[1], 3, padding=1)
        x0 = torch.randn(shape)
        for shared in (True, False):
            for mode in ('approx', 'exact'):
                def call(op, shared=shared, mode=mode, conv=conv, x0=x0):
                    x = x0.clone().requires_grad_()
                    op(x, 0.1, block_size=7, mode=mode, next_layer=conv, shared_mask=shared).sum().backward()
                med = alternate({'base': lambda: call(base_op), 'this': lambda: call(this_op)}, repeats)
                kind = 'shared' if shared else 'per-channel'
                print(f'{str(shape):>18} | {kind:11} | {mode:6} | base {med["base"] * 1e3:8.2f} | this '
                      f'{med["this"] * 1e3:8.2f} | this/base {med["this"] / med["base"]:.3f}', flush=True)


def bench_resnet50(base_inject, repeats: int) -> None:
    import timm
    import timm_fmd
    torch.set_num_threads(2)
    plain = timm.create_model('resnet50')
    kw = dict(prob=0.1, block_size=7, stages=(-2, -1), sites=('conv', 'skip'))
    models = {'plain': plain}
    for shared in (False, True):
        for mode in ('approx', 'exact'):
            tag = f"{'shared' if shared else 'per-channel'} {mode}"
            models[f'base {tag}'] = base_inject.apply_fmd(copy.deepcopy(plain), shared_mask=shared, mode=mode, **kw)
            models[f'this {tag}'] = timm_fmd.apply_fmd(copy.deepcopy(plain), shared_mask=shared, mode=mode, **kw)
    x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))

    def step(model, opt):
        model.train()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    fns = {k: (lambda m=m, o=torch.optim.SGD(m.parameters(), lr=0.01): step(m, o)) for k, m in models.items()}
    med = alternate(fns, repeats, warmup=1)
    print(f'ResNet-50 SGD step, batch 8, 224, 38 FMD sites, 2 threads: plain {med["plain"] * 1e3:.1f} ms')
    for k in list(models)[1:]:
        print(f'{k:26} {med[k] * 1e3:8.1f} ms  {med[k] / med["plain"]:.3f}x plain', flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--base', required=True, help='the earlier commit (any git revision)')
    parser.add_argument('--part', choices=('op', 'resnet50', 'both'), default='both')
    parser.add_argument('--repeats', type=int, default=15)
    args = parser.parse_args()
    import timm_fmd  # noqa: F401  (this checkout first: its registry owns the fmd_ names)
    from timm_fmd.ops.distortion import feature_map_distortion
    with tempfile.TemporaryDirectory() as tmp:
        base_distortion, base_inject = import_base(args.base, Path(tmp))
        torch.manual_seed(0)
        if args.part in ('op', 'both'):
            bench_op(base_distortion.feature_map_distortion, feature_map_distortion, args.repeats)
        if args.part in ('resnet50', 'both'):
            bench_resnet50(base_inject, max(3, args.repeats // 3))


if __name__ == '__main__':
    main()
