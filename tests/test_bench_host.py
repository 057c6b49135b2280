"""benchmarks/bench_host.py: the host-time table (Triton's binder run for an sm_90 target, nothing launched)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip('triton')
ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('bench_host', ROOT / 'benchmarks' / 'bench_host.py')
bench = importlib.util.module_from_spec(_spec)
sys.modules['bench_host'] = bench
_spec.loader.exec_module(bench)


@pytest.fixture
def binds(monkeypatch):
    """Triton binder calls per stand-in mode."""
    counts = {mode: 0 for mode in bench.MODES}
    bind = bench.StandIn.bind

    def counting(self, *args, **kwargs):
        counts[self.mode] += 1
        return bind(self, *args, **kwargs)

    monkeypatch.setattr(bench.StandIn, 'bind', counting)
    return counts


def test_table_rows_and_binder_counts(capsys, binds):
    bench.main(['--shape', '2x8x6x6', '--repeats', '1', '--calls', '3'])
    lines = capsys.readouterr().out.splitlines()
    rows = [[c.strip() for c in line.split('|')] for line in lines[2:]]
    assert [r[0] for r in rows[:3]] == list(bench.variants((2, 8, 6, 6)))
    for row in rows[:3]:
        no_launch, every, shipped = (float(v) for v in row[1:4])
        assert min(no_launch, every, shipped) > 0 and row[4].endswith('%)')
    assert [r[0].split(' (')[0] for r in rows[3:]] == [f'Triton binder alone: {k}' for k in bench.KERNELS]
    assert all(float(r[2]) > 0 for r in rows[3:])
    # each variant makes 5 warm-up and 3 timed forward+backward calls through a chain of 8 sites (the default), 3
    # launches per site: as shipped, Triton binds each variant's 3 launches once and the compiled kernels are called
    # after; every launch of the other stand-ins is bound, and so is each of the binder-alone rows' 5 + 3 x 8 calls
    assert binds['no launches'] == 0
    assert binds['as shipped'] == 3 * 3
    assert binds['Triton binds every launch'] == 3 * (5 + 3) * 8 * 3 + 3 * (5 + 3 * 8)


@pytest.mark.parametrize('argv,message', [(['--shape', '2x8x6'], 'BxCxHxW'), (['--calls', '0'], '--calls')])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_compiled_chain_launches_through_the_ops(capsys, monkeypatch, binds):
    """--compiled: each variant's chain is compiled once (aot_eager here, for time: inductor's Python wrapper calls
    the ops the same way) and its launches reach the stand-ins through the torch.library ops."""
    compiles, compile_ = [], torch.compile

    def aot_eager(fn, **kwargs):
        compiles.append(kwargs)
        return compile_(fn, backend='aot_eager', **kwargs)

    monkeypatch.setattr(bench.torch, 'compile', aot_eager)
    bench.main(['--compiled', '--shape', '2x8x6x6', '--repeats', '1', '--calls', '2', '--sites', '2'])
    lines = capsys.readouterr().out.splitlines()
    assert 'under torch.compile' in lines[0]
    assert compiles == [dict(fullgraph=True)] * 3
    assert binds['as shipped'] == 3 * 3  # each variant's 3 launches bound once, then called directly
    assert binds['Triton binds every launch'] == 3 * (5 + 2) * 2 * 3 + 3 * (5 + 2 * 2)
