"""benchmarks/gpu_check.py on a machine without a GPU: parsing, targets, the table, the part runner, the CLI."""
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('gpu_check', ROOT / 'benchmarks' / 'gpu_check.py')
gc = importlib.util.module_from_spec(_spec)
sys.modules['gpu_check'] = gc  # dataclasses resolve their annotations through sys.modules
_spec.loader.exec_module(gc)

# bench_op.py's table as printed on the H200 (../shared/gpu/02-bench-op.txt), with fused rows of the kind the
# fused path adds (and a comparison at other launch settings), the GPU ms column of graph replays ("-": not
# captured), and its second table (another first header) after a blank line
BENCH_OP = """device=cuda torch=2.11.0+cu130 threads=16 prob=0.1 block=7 repeats=20 (median fwd+bwd)
             shape | method                           |       ms |  x timm | saved MB |  peak MB |   GPU ms
(32, 1024, 14, 14) | shared  timm DropBlock2d         |     0.55 |   1.00x |      0.0 |     49.0 |    0.120
(32, 1024, 14, 14) | shared  block FMD approx fused   |     0.21 |   0.38x |      0.0 |     12.0 |    0.050
(32, 1024, 14, 14) | per-channel  timm DropBlock2d    |     0.55 |   1.00x |     24.5 |     99.0 |    0.130
(32, 1024, 14, 14) | per-channel  block FMD approx reference |     1.44 |   2.60x |     24.5 |    178.6 |        -
(32, 1024, 14, 14) | per-channel  block FMD approx fused, 16 a thread |     0.25 |   0.45x |      0.0 |     12.3 |    0.055
(32, 1024, 14, 14) | per-channel  block FMD approx fused |     0.28 |   0.51x |      0.0 |     12.3 |    0.061
(32, 1024, 14, 14) | per-channel  block FMD exact fused |     0.71 |   1.29x |      0.0 |     13.0 |    0.210
(32, 1024, 14, 14) | per-channel  authors' formula    |     1.40 |   2.52x |     82.6 |    171.6 |    0.400
  (32, 2048, 7, 7) | per-channel  block FMD approx fused |     0.90 |   1.55x |      0.0 |     88.8 |    0.030

Kernels of one per-channel block FMD approx forward+backward (32, 1024, 14, 14) (fused, torch.profiler):
kernel                                                       | launches |   GPU us
fmd_apply_kernel                                             |      1.0 |     60.5
fmd_grad_kernel                                              |      1.0 |     30.1
total                                                        |      2.0 |     90.6

Realised distorted fraction at nominal prob 0.1, block 7 (64x256 maps, one draw):
   map | timm DropBlock2d | authors (valid centres) | timm-fmd | timm-fmd expected
  7x7  |            0.930 |                   0.096 |    0.101 |            0.1000
"""
# bench_resnet50.py on the H200 (../shared/gpu/17-bench-r50.txt)
R50_EAGER = """device=cuda torch=2.11.0+cu130 threads=16 batch=64 img=224 amp=True channels_last=True repeats=10
variant                        |   ms/step | x plain
plain                          |      23.3 |   1.00x
timm DropBlock                 |      23.7 |   1.02x
FMD shared approx              |      66.8 |   2.87x
FMD per-channel approx         |      64.9 |   2.79x
FMD shared exact               |      89.8 |   3.86x
FMD per-channel exact          |      87.2 |   3.74x
authors' formula per-channel   |      52.1 |   2.24x
plain (CUDA graph)             |      17.0 |   1.00x
FMD per-channel approx (CUDA graph) |      18.7 |   1.10x
"""
R50_COMPILED = """variant                        |   ms/step | x plain
plain                          |      20.0 |   1.00x
FMD per-channel approx         |      20.6 |   1.03x
"""
PYTEST = """tests/ops/test_fused.py::test_fused_matches_reference_on_cuda PASSED                      [ 20%]
tests/ops/test_fused.py::test_inductor FAILED                                            [ 40%]
tests/train/test_cuda.py::test_trainer_on_cuda_bf16_channels_last_then_resume PASSED     [ 60%]
tests/train/test_cuda.py::test_torchrun_two_processes_on_two_gpus SKIPPED (needs 2 CUDA) [ 80%]
tests/train/test_cuda.py::test_fp16_with_the_grad_scaler_on_cuda ERROR                   [100%]
ERROR tests/graph/test_capture.py - ImportError: cannot import name 'capture'
=========== 1 failed, 2 passed, 1 skipped, 2 errors in 41.20s ===========
"""


def ok(text: str) -> 'gc.Outcome':
    return gc.Outcome('ok', 10.0, text, 0)


def test_parse_table_reads_the_benchmark_tables():
    rows = gc.parse_table(BENCH_OP, 'shape')
    assert len(rows) == 9 and rows[0] == {'shape': '(32, 1024, 14, 14)', 'method': 'shared  timm DropBlock2d',
                                          'ms': '0.55', 'x timm': '1.00x', 'saved MB': '0.0', 'peak MB': '49.0',
                                          'GPU ms': '0.120'}
    assert [r['variant'] for r in gc.parse_table(R50_EAGER, 'variant')][:2] == ['plain', 'timm DropBlock']
    assert gc.parse_table('no table here', 'variant') == []
    assert (gc.number('2.79x'), gc.number(' 0.28 '), gc.number('-'), gc.number('1e-3 ms')) == (2.79, 0.28, None, 1e-3)


def test_parse_pytest_counts_and_names_failures():
    counts = gc.parse_pytest(PYTEST)
    assert (counts.passed, counts.failed, counts.skipped) == (2, 3, 1)
    assert counts.failures == ['tests/ops/test_fused.py::test_inductor',
                               'tests/train/test_cuda.py::test_fp16_with_the_grad_scaler_on_cuda',
                               'tests/graph/test_capture.py']


def test_parse_pytest_reads_xdist_lines():
    text = ('[gw0] [ 25%] PASSED tests/ops/fused/test_cuda.py::test_a[dtype1-True]\n'
            '[gw1] [ 50%] FAILED tests/train/test_cuda.py::test_trainer\n'
            '[gw0] [ 75%] SKIPPED tests/train/test_cuda.py::test_two_gpus\n'
            '[gw2] [100%] PASSED tests/test_ramp.py::test_b\n')
    counts = gc.parse_pytest(text)
    assert (counts.passed, counts.failed, counts.skipped) == (2, 1, 1)
    assert counts.failures == ['tests/train/test_cuda.py::test_trainer']


def test_op_row_for_picks_the_fused_fmd_row_of_the_target():
    rows = gc.parse_table(BENCH_OP, 'shape')
    assert gc.op_row_for(rows, 'per-channel block FMD approx')['method'] == 'per-channel  block FMD approx fused'
    assert any(r['method'].endswith('fused, 16 a thread') for r in rows)  # a comparison row is no candidate
    assert gc.op_row_for(rows, 'per-channel block FMD exact')['ms'] == '0.71'
    plain = [r for r in rows if 'fused' not in r['method']]
    assert gc.op_row_for(plain, 'per-channel block FMD approx') is None  # the reference row is no candidate


def test_rows_put_measured_values_beside_the_targets():
    rows = gc.op_rows(ok(BENCH_OP), 25) + gc.r50_rows(ok(R50_EAGER), 35, compiled=False) + \
        gc.r50_rows(ok(R50_COMPILED), 115, compiled=True)
    verdicts = {(r[0].split(' (')[0].split(',')[-1].strip(), r[1]): (r[2], r[4]) for r in rows if r[4]}
    assert verdicts == {
        ('op fwd+bwd', 'per-channel  block FMD approx fused'): ('0.28 ms (0.51x timm); GPU 0.061 ms', 'met'),
        ('op fwd+bwd', 'per-channel  block FMD exact fused'): ('0.71 ms (1.29x timm); GPU 0.21 ms', 'missed'),
        ('op saved for backward', 'per-channel  block FMD approx fused'): ('0 MB', 'met'),
        ('eager', 'FMD per-channel approx'): ('2.79x (64.9 ms)', 'missed'),
        ('eager', 'FMD shared approx'): ('2.87x (66.8 ms)', 'missed'),
        ('eager', 'FMD per-channel exact'): ('3.74x (87.2 ms)', 'missed'),
        ('torch.compile', 'FMD per-channel approx'): ('1.03x (20.6 ms)', 'met'),  # <= 1.05x
    }
    assert sum(r[0] == 'op fwd+bwd (32, 1024, 14, 14)' for r in rows) == 8  # every row at that shape, no other
    kernels = [r[1:3] for r in rows if r[0].startswith('op kernels')]
    assert kernels == [['fmd_apply_kernel', '60.5 us GPU per call (1.0 launches)'],
                       ['fmd_grad_kernel', '30.1 us GPU per call (1.0 launches)'],
                       ['total', '90.6 us GPU per call (2.0 launches)']]
    reference = next(r for r in rows if r[1] == 'per-channel  block FMD approx reference')
    assert reference[2] == '1.44 ms (2.60x timm)'  # not captured: no GPU time
    graphed = [r[1:] for r in rows if r[0] == 'ResNet-50 step b64 bf16 CL, CUDA graph']
    assert graphed == [['plain', '1.00x (17.0 ms)', '', ''], ['FMD per-channel approx', '1.10x (18.7 ms)', '', '']]
    assert gc.exit_status(rows, cuda=True) == gc.EXIT_MISSED


def test_a_step_that_could_not_be_captured_fails_the_check():
    text = R50_EAGER + 'FMD per-channel exact (CUDA graph): not captured (operation not permitted when stream is ' \
                       'capturing)\n'
    rows = gc.r50_rows(ok(text), 45, compiled=False)
    assert rows[-1] == ['ResNet-50 step b64 bf16 CL, CUDA graph', 'FMD per-channel exact',
                        'not captured: operation not permitted when stream is capturing', '', 'FAIL']
    assert gc.exit_status(rows, cuda=True) == gc.EXIT_FAILED


def test_gpu_commands_time_one_op_shape_its_kernels_and_the_captured_steps(tmp_path):
    commands = gc.gpu_commands('python', tmp_path / 'go')
    assert commands['op'][-3:] == ['--shapes', '32x1024x14x14', '--profile']
    assert commands['eager'][-4:] == ['--variants', gc.EAGER_VARIANTS, '--cuda-graph', gc.GRAPH_VARIANTS]
    eager_targets = {t.item for t in gc.TARGETS if t.part == 'eager'}
    assert eager_targets <= set(gc.EAGER_VARIANTS.split(','))  # every eager target is timed
    assert str(tuple(int(n) for n in gc.OP_SHAPE_ARG.split('x'))) == gc.OP_SHAPE  # the rows read are the rows timed


def test_failures_timeouts_and_missing_rows():
    tests = gc.tests_rows(gc.Outcome('failed', 41.0, PYTEST, 1), 85)
    assert tests[0][2:] == ['2 passed, 3 failed, 1 skipped (41 s)', 'all pass', 'FAIL']
    assert [r[1] for r in tests[1:]] == ['failed: tests/ops/test_fused.py::test_inductor',
                                         'failed: tests/train/test_cuda.py::test_fp16_with_the_grad_scaler_on_cuda',
                                         'failed: tests/graph/test_capture.py']
    cut = gc.tests_rows(gc.Outcome('timeout', 85.2, PYTEST.splitlines()[0]), 85)
    assert cut[0][2] == 'timeout after 85 s (budget 85 s); so far 1 passed, 0 failed, 0 skipped'
    crashed = gc.r50_rows(gc.Outcome('failed', 3.0, 'Traceback ...\nRuntimeError: CUDA error', 1), 35, compiled=True)
    assert crashed[0][2:] == ['failed (exit 1): RuntimeError: CUDA error', '', 'FAIL']
    assert crashed[1] == ['ResNet-50 step b64 bf16 CL, torch.compile', 'FMD per-channel approx', '-', '<= 1.05x',
                          'not measured']
    renamed = gc.op_rows(ok(BENCH_OP.replace('exact fused', 'exakt')), 25)
    assert ['op fwd+bwd (32, 1024, 14, 14)', 'per-channel block FMD exact', 'no such row', '<= 0.6 ms',
            'not measured'] in renamed
    all_met = gc.r50_rows(ok(R50_COMPILED), 115, compiled=True)
    assert gc.exit_status(all_met, cuda=True) == gc.EXIT_OK
    assert gc.exit_status(all_met + tests, cuda=True) == gc.EXIT_FAILED
    assert gc.exit_status(renamed, cuda=True) == gc.EXIT_FAILED  # a target not measured on a GPU is a failure
    assert gc.exit_status(all_met, cuda=False) == gc.EXIT_NO_CUDA


def test_render_is_a_markdown_table_that_reads_back():
    rows = gc.r50_rows(ok(R50_COMPILED), 115, compiled=True)
    text = gc.render('GPU check: fake', rows)
    lines = text.splitlines()
    assert lines[0] == 'GPU check: fake' and lines[1] == ''
    assert lines[3].startswith('|---') and len({len(line) for line in lines[2:]}) == 1  # aligned columns
    back = gc.parse_table(text, 'part')
    assert [[r[h] for h in gc.HEADER] for r in back] == rows


def _script(body: str) -> list:
    return [sys.executable, '-c', body]


def test_parts_run_in_order_with_deadlines(tmp_path):
    """The compiled benchmark compiles during the tests and is timed after them; a hanging part is killed
    with its children at its deadline; each part's output is kept."""
    marks = tmp_path / 'marks'
    marks.mkdir()
    child = tmp_path / 'child.pid'
    commands = {
        'compiled': _script(f"import pathlib, time, sys\nprint('warm', flush=True)\n"
                            f"while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.02)\n"
                            f"pathlib.Path(r'{marks}', 'timed').write_text(str(time.time()))\n"
                            f"print({R50_COMPILED!r})") + [str(tmp_path / 'go')],
        'tests': _script(f"import pathlib, time\ntime.sleep(0.5)\nprint({PYTEST.splitlines()[0]!r})\n"
                         f"pathlib.Path(r'{marks}', 'tests').write_text(str(time.time()))"),
        'op': _script(f"import pathlib, subprocess, time\np = subprocess.Popen(['sleep', '60'])\n"
                      f"pathlib.Path(r'{child}').write_text(str(p.pid))\ntime.sleep(60)"),
        'eager': _script(f'print({R50_EAGER!r})'),
    }
    budgets = dict(compiled=20.0, tests=10.0, op=1.5, eager=10.0)
    start = time.monotonic()
    outcomes = gc.run_gpu_parts(commands, tmp_path / 'go', dict(os.environ), tmp_path, budgets)
    assert time.monotonic() - start < 15
    assert {k: o.status for k, o in outcomes.items()} == dict(tests='ok', compiled='ok', op='timeout', eager='ok')
    assert float((marks / 'timed').read_text()) >= float((marks / 'tests').read_text())  # timed after the tests
    assert gc.parse_table(outcomes['compiled'].output, 'variant')[1]['x plain'] == '1.03x'
    pid = int(child.read_text())
    with pytest.raises(ProcessLookupError):  # the hanging part's child went with it
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)


def test_cli_without_cuda_skips_cleanly_and_writes_the_table(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu_check.py'), '--out', str(tmp_path)],
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=''), capture_output=True, text=True, timeout=120)
    assert done.returncode == gc.EXIT_NO_CUDA, done.stderr
    assert done.stdout.startswith('GPU check: no CUDA device; torch ')
    for line in ('no CUDA device: CUDA tests not measured', 'no CUDA device: bench_op.py --device cuda not measured',
                 'no CUDA device: bench_resnet50.py eager not measured',
                 'no CUDA device: bench_resnet50.py --compile not measured'):
        assert line in done.stdout
    table = (tmp_path / 'gpu_check.md').read_text()
    assert table.strip() == done.stdout.strip() and sorted(os.listdir(tmp_path)) == ['gpu_check.log', 'gpu_check.md']
    rows = gc.parse_table(table, 'part')
    assert len(rows) == 4 + len(gc.TARGETS) and all(r['verdict'] == 'not measured' for r in rows)


def test_bad_budgets_are_refused(capsys):
    for argv, message in ((['--op-timeout', '0'], 'the op timeout must be > 0 seconds, got 0.0'),
                          (['--tests-timeout', '120'], '--tests-timeout (120 s) must be below --compile-timeout (110 s)')):
        with pytest.raises(SystemExit) as exit_info:
            gc.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
