"""One GPU check: the CUDA tests and the GPU benchmarks in at most 3 minutes, as ONE table with the targets.

    python benchmarks/gpu_check.py                 # prints the table
    python benchmarks/gpu_check.py --out DIR       # also DIR/gpu_check.md (the table) and DIR/gpu_check.log

It runs, from the repository root, each part in its own process with its own deadline (a part past it is
killed with its whole process group and reported as a timeout, so one hanging part cannot eat the window):

1. probe (at most 30 s, usually a few: importing torch): ``python -c ...`` reads the GPU name and memory,
   torch / CUDA / triton / timm versions.
2. ResNet-50 compiled (``--compile-timeout``, default 110 s, started at once in the background: it compiles
   while the tests run, then waits and is timed alone)::

       python benchmarks/bench_resnet50.py --device cuda --batch-size 64 --amp --channels-last --compile \\
           --variants "FMD per-channel approx" --repeats 10 --wait-for <go file>

3. CUDA tests (``--tests-timeout``, default 85 s): ``python -m pytest -m cuda -v -p no:cacheprovider --tb=short``
   (with ``-n 4`` where pytest-xdist is installed, as on the H200 image)
   (every ``@pytest.mark.cuda`` test of the suite: the trainer on CUDA and torchrun with NCCL in
   tests/train/test_cuda.py, and those of the op and the CUDA-graph step where they exist).
   It runs within step 2's deadline, so steps 2-4 take at most ``--compile-timeout`` together.
4. The compiled ResNet-50 is told to go (its timed rounds run with the GPU otherwise idle).
5. Op benchmark (``--op-timeout``, default 25 s):
   ``python benchmarks/bench_op.py --device cuda --shapes 32x1024x14x14 --profile``.
6. ResNet-50 eager, and captured in CUDA graphs (``--eager-timeout``, default 45 s)::

       python benchmarks/bench_resnet50.py --device cuda --batch-size 64 --amp --channels-last --repeats 10 \\
           --variants "timm DropBlock,FMD shared approx,FMD per-channel approx,FMD per-channel exact" \\
           --cuda-graph "FMD per-channel approx,FMD shared approx,FMD per-channel exact"

After the probe, at most 110 + 25 + 45 = 180 s of deadlines (plus up to 5 s to end each part that overran). The
table has one row per measured item: the CUDA test counts (and every failed test by name), every op row at
(32, 1024, 14, 14) with its wall time and its GPU time (the call replayed from a CUDA graph, no host launches),
each GPU kernel of the fused per-channel approx call (launches and microseconds per call, torch.profiler), every
ResNet-50 variant with a target (and timm's DropBlock) eager, compiled and captured (GPU time of the whole step),
and the issue's targets beside the measured values (``met`` / ``missed``). The wall and GPU times side by side say whether a row is bound by the
host's launches or by the GPU. Op rows are matched by name: a target's row is the FMD row of its mode and mask
kind that is not the reference, the authors' formula or timm's (``fused`` preferred when several match).

Without a CUDA device every part but the probe is skipped and the table says so on each row
(``no CUDA device: ... not measured``). Exit status: 0 everything ran, every CUDA test passed, every target
met; 1 a part failed or timed out, or a CUDA test failed; 2 bad arguments; 3 no CUDA device (nothing
measured); 4 everything ran and passed but a target was missed.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
OP_SHAPE = '(32, 1024, 14, 14)'
OP_SHAPE_ARG = '32x1024x14x14'
R50_ARGS = ['--device', 'cuda', '--batch-size', '64', '--amp', '--channels-last', '--repeats', '10']
COMPILED_VARIANTS = 'FMD per-channel approx'
EAGER_VARIANTS = 'timm DropBlock,FMD shared approx,FMD per-channel approx,FMD per-channel exact'
GRAPH_VARIANTS = 'FMD per-channel approx,FMD shared approx,FMD per-channel exact'
GRAPH_SUFFIX = ' (CUDA graph)'  # bench_resnet50's rows of captured steps
PROBE_TIMEOUT = 30.0  # a cold first import of torch on a fresh machine
# the CUDA tests in 4 processes where pytest-xdist is installed: most of their time is Triton compiling the kernel
# variants on a fresh machine, one CPU core each
XDIST = ['-n', '4'] if importlib.util.find_spec('xdist') is not None else []

EXIT_OK, EXIT_FAILED, EXIT_NO_CUDA, EXIT_MISSED = 0, 1, 3, 4

_PROBE = '''
import importlib.metadata as md, json, torch
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
info = dict(torch=torch.__version__, cuda=torch.version.cuda, triton=version('triton'), timm=version('timm'),
            cuda_available=torch.cuda.is_available())
if info['cuda_available']:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, memory_gib=round(p.total_memory / 2 ** 30, 1), capability=f'{p.major}.{p.minor}',
                devices=torch.cuda.device_count())
print(json.dumps(info))
'''


# ------------------------------------------------------------------------------------------- running parts
@dataclass
class Outcome:
    """What one part did: ``ok``, ``failed`` (non-zero exit), ``timeout`` or ``skipped``, and its output."""

    status: str
    seconds: float = 0.0
    output: str = ''
    returncode: Optional[int] = None
    reason: str = ''  # why it was skipped

    def summary(self, budget: Optional[float] = None) -> str:
        """One line for the table when the part gave no numbers."""
        if self.status == 'skipped':
            return self.reason
        if self.status == 'timeout':
            return f'timeout after {self.seconds:.0f} s' + (f' (budget {budget:.0f} s)' if budget else '')
        if self.status == 'failed':
            lines = [line for line in self.output.strip().splitlines() if line.strip()]
            return f'failed (exit {self.returncode}): {lines[-1][:160] if lines else "no output"}'
        return f'ok ({self.seconds:.0f} s)'


class Process:
    """A part running in its own session (so a timeout kills its children too), output to a log file."""

    def __init__(self, command: Sequence[str], log: Path, env: Dict[str, str]):
        self.command, self.log, self.started = list(command), log, time.monotonic()
        with open(log, 'w') as f:
            self.proc = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors='replace')

    def wait(self, deadline: float) -> Outcome:
        """Wait until the process exits or the monotonic ``deadline`` passes (then end it); either way nothing
        of its process group outlives the part (a leftover worker would load the GPU during the next part)."""
        try:
            rc = self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            return Outcome('timeout', time.monotonic() - self.started, self.output())
        self._signal(signal.SIGKILL)
        return Outcome('ok' if rc == 0 else 'failed', time.monotonic() - self.started, self.output(), rc)

    def kill(self) -> None:
        """SIGTERM to the part's process group, SIGKILL to whatever is left 5 s later."""
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGKILL)
        self.proc.wait()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:  # the group is gone already
            pass


def run_part(command: Sequence[str], log: Path, env: Dict[str, str], budget: float) -> Outcome:
    return Process(command, log, env).wait(time.monotonic() + budget)


# ------------------------------------------------------------------------------------------- parsing output
def parse_table(text: str, first_header: str) -> List[Dict[str, str]]:
    """Rows of the ``|``-separated table in ``text`` whose header's first cell is ``first_header`` (the
    benchmarks' plain tables and markdown ones alike)."""
    rows: List[Dict[str, str]] = []
    header: Optional[List[str]] = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().removeprefix('|').removesuffix('|').split('|')]
        if len(cells) < 2:  # the table ended (or has not begun)
            header = None if rows else header
            continue
        if all(re.fullmatch(r':?-*:?', c) for c in cells):  # a markdown rule line
            continue
        if cells[0] == first_header:
            header = cells
        elif header is not None and len(cells) == len(header):
            rows.append(dict(zip(header, cells)))
    return rows


def number(cell: str) -> Optional[float]:
    """The number in a table cell such as ``1.43``, ``2.79x`` or ``24.5``; ``None`` if there is none."""
    match = re.search(r'-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?', cell or '')
    return float(match.group()) if match else None


@dataclass
class TestCounts:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: List[str] = field(default_factory=list)  # node ids of failed and errored tests


def parse_pytest(text: str) -> TestCounts:
    """Counts and failed test ids from ``pytest -v`` output (also a run cut short: the lines printed so far)."""
    counts = TestCounts()
    plain = ((m.group(1), m.group(2)) for m in re.finditer(r'^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b',
                                                           text, re.M))
    # pytest-xdist's -v lines: "[gw1] [ 12%] PASSED tests/...::test"
    xdist = ((m.group(2), m.group(1)) for m in re.finditer(
        r'^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+::\S+)', text, re.M))
    for node, result in itertools.chain(plain, xdist):
        if result in ('PASSED', 'XPASS', 'XFAIL'):
            counts.passed += 1
        elif result == 'SKIPPED':
            counts.skipped += 1
        elif node not in counts.failures:  # a test failing in call and in teardown is one failure
            counts.failed += 1
            counts.failures.append(node)
    for match in re.finditer(r'^ERROR (\S+)', text, re.M):  # collection errors: no per-test line
        if match.group(1) not in counts.failures:
            counts.failed += 1
            counts.failures.append(match.group(1))
    return counts


# ------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """A goal of issue 10 for one measured item: ``value <= limit``."""

    part: str  # 'op', 'op memory', 'eager', 'compiled'
    item: str
    limit: float
    unit: str

    def text(self) -> str:
        return f'<= {self.limit:g}{self.unit}'

    def verdict(self, value: Optional[float]) -> str:
        if value is None:
            return 'not measured'
        return 'met' if value <= self.limit else 'missed'


TARGETS = [
    Target('op', 'per-channel block FMD approx', 0.30, ' ms'),
    Target('op', 'per-channel block FMD exact', 0.60, ' ms'),
    Target('op memory', 'per-channel block FMD approx', 0.1, ' MB (no mask: a seed and a few scalars)'),
    Target('eager', 'FMD per-channel approx', 1.15, 'x'),
    Target('eager', 'FMD shared approx', 1.10, 'x'),
    Target('eager', 'FMD per-channel exact', 1.30, 'x'),
    Target('compiled', 'FMD per-channel approx', 1.05, 'x'),
]


def op_row_for(rows: List[Dict[str, str]], item: str) -> Optional[Dict[str, str]]:
    """The bench_op row a target names (e.g. 'per-channel block FMD approx'): an FMD row of that mask kind and
    mode, not the reference, authors', timm's or a comparison at other launch settings ('..., 16 a thread');
    among several, the fused one."""
    kind, mode = item.split()[0], item.split()[-1]
    found = [r for r in rows if r['method'].split()[0] == kind and 'FMD' in r['method'] and mode in r['method']
             and not any(w in r['method'].lower() for w in ('reference', 'authors', 'timm', 'a thread'))]
    fused = [r for r in found if 'fused' in r['method'].lower()]
    return (fused or found or [None])[0]


# ------------------------------------------------------------------------------------------- the table
Row = List[str]  # part, item, measured, target, verdict
HEADER = ['part', 'item', 'measured', 'target', 'verdict']


def tests_rows(outcome: Outcome, budget: float) -> List[Row]:
    if outcome.status == 'skipped':
        return [['CUDA tests', 'pytest -m cuda', outcome.reason, 'all pass', 'not measured']]
    counts = parse_pytest(outcome.output)
    ran = counts.passed + counts.failed + counts.skipped
    if outcome.status == 'timeout':
        measured = f'{outcome.summary(budget)}; so far {counts.passed} passed, {counts.failed} failed, ' \
                   f'{counts.skipped} skipped'
        verdict = 'FAIL'
    elif ran == 0:
        measured, verdict = (outcome.summary() if outcome.status == 'failed' else 'no test ran'), 'FAIL'
    else:
        measured = f'{counts.passed} passed, {counts.failed} failed, {counts.skipped} skipped ({outcome.seconds:.0f} s)'
        verdict = 'pass' if outcome.status == 'ok' and counts.failed == 0 else 'FAIL'
    return [['CUDA tests', 'pytest -m cuda', measured, 'all pass', verdict]] + \
        [['CUDA tests', f'failed: {node}', '', '', 'FAIL'] for node in counts.failures]


def _missing(part: str, outcome: Outcome, budget: float, what: str, targets: List[Target]) -> List[Row]:
    """A part that gave no table: its status, then each of its targets as not measured."""
    measured = outcome.summary(budget) if outcome.status != 'ok' else f'no table in the {what} output'
    verdict = 'not measured' if outcome.status == 'skipped' else 'FAIL'
    return [[part, what, measured, '', verdict]] + [[part, t.item, '-', t.text(), 'not measured'] for t in targets]


def _unmatched(part: str, targets: List[Target], matched: List[Target]) -> List[Row]:
    return [[part, t.item, 'no such row', t.text(), 'not measured'] for t in targets if t not in matched]


def op_rows(outcome: Outcome, budget: float) -> List[Row]:
    """Every bench_op row at :data:`OP_SHAPE` (ms and ratio to timm's DropBlock2d), its time targets, and
    the memory autograd keeps for backward of the row of the memory target."""
    part, memory_part = f'op fwd+bwd {OP_SHAPE}', f'op saved for backward {OP_SHAPE}'
    time_targets = [t for t in TARGETS if t.part == 'op']
    memory_targets = [t for t in TARGETS if t.part == 'op memory']
    rows = [r for r in parse_table(outcome.output, 'shape') if r['shape'] == OP_SHAPE] if outcome.status == 'ok' else []
    if not rows:
        return _missing(part, outcome, budget, 'bench_op.py', time_targets) + \
            [[memory_part, t.item, '-', t.text(), 'not measured'] for t in memory_targets]
    matched = {id(op_row_for(rows, t.item)): t for t in time_targets if op_row_for(rows, t.item) is not None}
    out: List[Row] = []
    for r in rows:
        t = matched.get(id(r))
        gpu = number(r.get('GPU ms', ''))
        measured = f"{r['ms']} ms ({r.get('x timm', '-')} timm)" + (f'; GPU {gpu:g} ms' if gpu is not None else '')
        out.append([part, r['method'], measured, t.text() if t else '', t.verdict(number(r['ms'])) if t else ''])
    out += _unmatched(part, time_targets, list(matched.values()))
    for t in memory_targets:
        r = op_row_for(rows, t.item)
        value = number(r.get('saved MB', '')) if r is not None else None
        out.append([memory_part, r['method'] if r is not None else t.item,
                    f'{value:g} MB' if value is not None else 'no such row', t.text(), t.verdict(value)])
    kernels = f'op kernels {OP_SHAPE}, per-channel approx fused fwd+bwd'
    for r in parse_table(outcome.output, 'kernel'):  # bench_op --profile: where the GPU time of one call goes
        out.append([kernels, r['kernel'], f"{r['GPU us']} us GPU per call ({r['launches']} launches)", '', ''])
    return out


def r50_rows(outcome: Outcome, budget: float, compiled: bool) -> List[Row]:
    """Every ResNet-50 variant (step time as a multiple of plain's, and ms) with its target."""
    kind = 'compiled' if compiled else 'eager'
    part = f'ResNet-50 step b64 bf16 CL, {"torch.compile" if compiled else "eager"}'
    targets = [t for t in TARGETS if t.part == kind]
    rows = parse_table(outcome.output, 'variant') if outcome.status == 'ok' else []
    if not rows:
        return _missing(part, outcome, budget, 'bench_resnet50.py', targets)
    out, matched, graphed = [], [], []
    for r in rows:
        if r['variant'].endswith(GRAPH_SUFFIX):  # captured steps: the GPU's time, no target of their own
            graphed.append(['ResNet-50 step b64 bf16 CL, CUDA graph', r['variant'].removesuffix(GRAPH_SUFFIX),
                            f"{r['x plain']} ({r['ms/step']} ms)", '', ''])
            continue
        t = next((t for t in targets if t.item == r['variant']), None)
        matched += [t] if t else []
        out.append([part, r['variant'], f"{r['x plain']} ({r['ms/step']} ms)", t.text() if t else '',
                    t.verdict(number(r['x plain'])) if t else ''])
    # a step that could not be captured (bench_resnet50 says so and times the others): a bug of a capture-safe op
    for m in re.finditer(r'^(.+)' + re.escape(GRAPH_SUFFIX) + r': not captured \((.*)\)$', outcome.output, re.M):
        graphed.append(['ResNet-50 step b64 bf16 CL, CUDA graph', m.group(1), f'not captured: {m.group(2)}', '',
                        'FAIL'])
    return out + _unmatched(part, targets, matched) + graphed


def render(title: str, rows: List[Row]) -> str:
    """A markdown table (readable as plain text too) under a title line."""
    widths = [max(len(str(r[i])) for r in [HEADER] + rows) for i in range(len(HEADER))]
    line = lambda cells: '| ' + ' | '.join(str(c).ljust(w) for c, w in zip(cells, widths)) + ' |'  # noqa: E731
    return '\n'.join([title, '', line(HEADER), '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
                     + [line(r) for r in rows]) + '\n'


def exit_status(rows: List[Row], cuda: bool) -> int:
    if not cuda:
        return EXIT_NO_CUDA
    verdicts = [r[4] for r in rows]
    if 'FAIL' in verdicts or 'not measured' in verdicts:
        return EXIT_FAILED
    return EXIT_MISSED if 'missed' in verdicts else EXIT_OK


def title(probe: Dict[str, object], total_s: float) -> str:
    if probe.get('cuda_available'):
        gpu = f"{probe['gpu']} ({probe['memory_gib']} GiB, sm {probe['capability']}, {probe['devices']} device(s))"
    else:
        gpu = 'no CUDA device'
    return (f"GPU check: {gpu}; torch {probe.get('torch')} (CUDA {probe.get('cuda')}), triton {probe.get('triton')}, "
            f"timm {probe.get('timm')}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {total_s:.0f} s")


# ------------------------------------------------------------------------------------------- main
def gpu_commands(py: str, go: Path) -> Dict[str, List[str]]:
    """The commands of steps 2, 3, 5 and 6 of the module docstring (run from the repository root)."""
    r50 = [py, 'benchmarks/bench_resnet50.py', *R50_ARGS]
    return {'compiled': r50 + ['--compile', '--variants', COMPILED_VARIANTS, '--wait-for', str(go)],
            'tests': [py, '-m', 'pytest', '-m', 'cuda', '-v', '-p', 'no:cacheprovider', '--tb=short', *XDIST],
            'op': [py, 'benchmarks/bench_op.py', '--device', 'cuda', '--shapes', OP_SHAPE_ARG, '--profile'],
            'eager': r50 + ['--variants', EAGER_VARIANTS, '--cuda-graph', GRAPH_VARIANTS]}


def run_gpu_parts(commands: Dict[str, List[str]], go: Path, env: Dict[str, str], logs: Path,
                  budgets: Dict[str, float]) -> Dict[str, Outcome]:
    """Steps 2-6: the compiled benchmark starts first and compiles during the tests; once the tests are done
    and it printed ``warm``, ``go`` is created and it is timed alone; then the op and eager benchmarks.
    ``budgets`` holds seconds per part (``compiled``: from its start, compilation included)."""
    compile_deadline = time.monotonic() + budgets['compiled']
    compiled = Process(commands['compiled'], logs / 'compiled.log', env)
    outcomes = {'tests': run_part(commands['tests'], logs / 'tests.log', env, budgets['tests'])}
    _wait_until(lambda: 'warm' in compiled.output().split() or compiled.proc.poll() is not None, compile_deadline)
    go.touch()
    outcomes['compiled'] = compiled.wait(compile_deadline)
    for key in ('op', 'eager'):
        outcomes[key] = run_part(commands[key], logs / f'{key}.log', env, budgets[key])
    return outcomes


def _wait_until(ready: Callable[[], bool], deadline: float) -> None:
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.2)


def _probe(py: str, env: Dict[str, str], logs: Path) -> tuple:
    """``(info, outcome)`` of step 1; ``info`` is empty when the probe failed."""
    outcome = run_part([py, '-c', _PROBE], logs / 'probe.log', env, PROBE_TIMEOUT)
    try:
        return (json.loads(outcome.output.strip().splitlines()[-1]) if outcome.status == 'ok' else {}), outcome
    except (IndexError, json.JSONDecodeError):
        return {}, outcome


def _skipped(reason: str) -> Dict[str, Outcome]:
    parts = dict(tests='CUDA tests', op='bench_op.py --device cuda', eager='bench_resnet50.py eager',
                 compiled='bench_resnet50.py --compile')
    return {key: Outcome('skipped', reason=f'{reason}: {what} not measured') for key, what in parts.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', type=Path, default=None, help='also write DIR/gpu_check.md and DIR/gpu_check.log')
    parser.add_argument('--tests-timeout', type=float, default=85.0, metavar='S')
    parser.add_argument('--compile-timeout', type=float, default=110.0, metavar='S',
                        help='seconds from the start for the compiled ResNet-50 (it compiles during the tests)')
    parser.add_argument('--op-timeout', type=float, default=25.0, metavar='S')
    parser.add_argument('--eager-timeout', type=float, default=45.0, metavar='S')
    args = parser.parse_args(argv)
    budgets = dict(tests=args.tests_timeout, compiled=args.compile_timeout, op=args.op_timeout,
                   eager=args.eager_timeout)
    for key, value in budgets.items():
        if value <= 0:
            parser.error(f'the {key} timeout must be > 0 seconds, got {value}')
    if args.tests_timeout >= args.compile_timeout:
        parser.error(f'--tests-timeout ({args.tests_timeout:g} s) must be below --compile-timeout '
                     f'({args.compile_timeout:g} s): the compiled benchmark is timed after the tests, within its deadline')
    start = time.monotonic()
    path = [str(ROOT / 'src')] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED='1')
    with tempfile.TemporaryDirectory(prefix='gpu_check.') as tmp:
        logs = Path(tmp)
        probe, probe_outcome = _probe(sys.executable, env, logs)
        cuda = bool(probe.get('cuda_available'))
        if cuda:
            outcomes = run_gpu_parts(gpu_commands(sys.executable, logs / 'go'), logs / 'go', env, logs, budgets)
        else:
            outcomes = _skipped('no CUDA device' if probe else f'probe failed ({probe_outcome.summary()})')
    rows = (tests_rows(outcomes['tests'], budgets['tests']) + op_rows(outcomes['op'], budgets['op'])
            + r50_rows(outcomes['eager'], budgets['eager'], compiled=False)
            + r50_rows(outcomes['compiled'], budgets['compiled'], compiled=True))
    table = render(title(probe, time.monotonic() - start), rows)
    print(table, flush=True)
    if args.out is not None:
        sys.path.insert(0, str(ROOT / 'src'))
        from timm_fmd.train.checkpoint import atomic_write  # only here: the table never waits on this import
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / 'gpu_check.md', table)
        atomic_write(args.out / 'gpu_check.log', '\n'.join(
            f'===== {name}: {o.status} ({o.seconds:.1f} s)\n{o.output}'
            for name, o in [('probe', probe_outcome)] + list(outcomes.items())))
    return exit_status(rows, cuda)


if __name__ == '__main__':
    sys.exit(main())
