"""benchmarks/bench_host.py: the host-time table (Triton's binder run for an sm_90 target, nothing launched)."""
import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip('triton')
ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('bench_host', ROOT / 'benchmarks' / 'bench_host.py')
bench = importlib.util.module_from_spec(_spec)
sys.modules['bench_host'] = bench
_spec.loader.exec_module(bench)


def test_table_rows_and_binder_counts(capsys, monkeypatch):
    binds = {mode: 0 for mode in bench.MODES}
    bind = bench.StandIn.bind

    def counting(self, *args, **kwargs):
        binds[self.mode] += 1
        return bind(self, *args, **kwargs)

    monkeypatch.setattr(bench.StandIn, 'bind', counting)
    bench.main(['--shape', '2x8x6x6', '--repeats', '1', '--calls', '3'])
    lines = capsys.readouterr().out.splitlines()
    rows = [[c.strip() for c in line.split('|')] for line in lines[2:]]
    assert [r[0] for r in rows[:3]] == list(bench.variants((2, 8, 6, 6)))
    for row in rows[:3]:
        no_launch, every, shipped = (float(v) for v in row[1:4])
        assert min(no_launch, every, shipped) > 0 and row[4].endswith('%)')
    assert [r[0].split(' (')[0] for r in rows[3:]] == [f'Triton binder alone: {k}' for k in bench.KERNELS]
    assert all(float(r[2]) > 0 for r in rows[3:])
    # each variant makes 8 forward+backward calls of 3 launches: as shipped, Triton binds each variant's 3 launches
    # once and the compiled kernels are called after; the binder-alone rows bind on the every-launch stand-ins
    assert binds['no launches'] == 0
    assert binds['as shipped'] == 3 * 3
    assert binds['Triton binds every launch'] > 3 * 8 * 3


@pytest.mark.parametrize('argv,message', [(['--shape', '2x8x6'], 'BxCxHxW'), (['--calls', '0'], '--calls')])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err
