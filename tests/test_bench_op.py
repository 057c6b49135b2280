"""benchmarks/bench_op.py: the --shapes option and the CUDA-graph timing of a call (with a stand-in backend)."""
import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('bench_op', ROOT / 'benchmarks' / 'bench_op.py')
bench = importlib.util.module_from_spec(_spec)
sys.modules['bench_op'] = bench
_spec.loader.exec_module(bench)


def test_shapes_option():
    assert bench.parse_shapes('32x1024x14x14') == [(32, 1024, 14, 14)]
    assert bench.parse_shapes(' 2x3x4x5, 6X7x8x9 ') == [(2, 3, 4, 5), (6, 7, 8, 9)]
    for text, message in (('32x1024x14', r"'32x1024x14' is not BxCxHxW"), ('0x1x2x3', r"'0x1x2x3' is not BxCxHxW"),
                          (' , ', 'give at least one BxCxHxW map')):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            bench.parse_shapes(text)


class Recorder:
    """A stand-in for the trainer's CudaGraph: ``capture`` records the call (without running it, as a CUDA
    capture runs no kernel), ``replay`` runs what was recorded."""

    def __init__(self):
        self.log, self.captured = [], None

    def eager(self, fn):
        self.log.append('eager')
        fn()

    def capture(self, fn):
        self.log.append('capture')
        self.captured = fn

    def replay(self):
        self.log.append('replay')
        self.captured()


def test_graph_seconds_warms_up_captures_once_and_times_the_replays():
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    calls = []

    def fn():
        calls.append(1)
        return x * 2

    backend = Recorder()
    seconds = bench.graph_seconds(fn, torch.ones_like(x), x, replays=5, backend=backend)
    assert backend.log == ['eager', 'eager', 'capture'] + ['replay'] * 5
    assert len(calls) == 2 + 5 and seconds > 0


def test_kernel_profile_counts_each_kernel_per_call():
    """On CPU the 'kernels' are aten ops: a multiply and its backward, per call."""
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    rows = bench.kernel_profile(lambda: x * 3.0, torch.ones_like(x), x, calls=4)
    launches = {name: n for name, n, _ in rows}
    assert launches['aten::mul'] == 2.0  # forward, and the backward's grad * 3
    assert all(name.startswith('aten::') and us > 0 for name, _, us in rows)
    assert [us for _, _, us in rows] == sorted((us for _, _, us in rows), reverse=True)
    assert x.grad is None


def test_thread_elements_sets_the_fused_launches_for_the_call_only():
    from timm_fmd.ops import fused
    before = fused.THREAD_ELEMENTS
    tiles = fused.plan((32, 1024, 14, 14), 196, 7, 7, gpu=True, programs=528)
    seen = bench._with_thread_elements(16, lambda: (fused.THREAD_ELEMENTS, fused.num_warps(tiles)))
    assert seen == (16, 8) and fused.num_warps(tiles) == 16  # the first design's 8 warps, the shipped 16
    assert fused._budget(torch.device('cpu'))[1] == before == 8  # read at each call: part of the launches' key
    with pytest.raises(RuntimeError, match='boom'):
        with bench.thread_elements(4):
            raise RuntimeError('boom')
    assert fused.THREAD_ELEMENTS == before
