"""benchmarks/bench_resnet50.py: every tensor on the model's device, and the --variants option."""
import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import timm_fmd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))  # bench_resnet50 imports bench_op beside it
_spec = importlib.util.spec_from_file_location('bench_resnet50', ROOT / 'benchmarks' / 'bench_resnet50.py')
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_authors_variant_builds_nothing_on_the_cpu():
    """The authors' formula at the 38 FMD sites, forward and backward on the 'meta' device (a stand-in for a
    GPU here): a CPU tensor made at forward time (as the fallback weight of the sites feeding the head once
    was, which crashed on CUDA) raises 'not on the expected device'."""
    model = bench.build("authors' formula per-channel", 0.1, 7).to('meta').train()
    assert len(timm_fmd.fmd_ops(model)) == 38
    out = model(torch.empty(2, 3, 64, 64, device='meta'))
    F.cross_entropy(out, torch.zeros(2, dtype=torch.long, device='meta')).backward()
    assert out.shape == (2, 1000) and out.device.type == 'meta'


def test_variants_option():
    assert bench.parse_variants('FMD per-channel approx') == ['plain', 'FMD per-channel approx']
    assert bench.parse_variants("FMD shared exact, plain,timm DropBlock") == ['plain', 'timm DropBlock',
                                                                            'FMD shared exact']
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown variant\(s\) \['FMD fused'\]; choose from"):
        bench.parse_variants('plain,FMD fused')


def test_cuda_graph_option_needs_cuda_and_names_known_variants(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location('gpu_check', ROOT / 'benchmarks' / 'gpu_check.py')
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, 'gpu_check', gpu_check)  # its dataclasses resolve annotations through it
    spec.loader.exec_module(gpu_check)
    assert bench.parse_variants(gpu_check.GRAPH_VARIANTS) == [
        'plain', 'FMD shared approx', 'FMD per-channel approx', 'FMD per-channel exact']  # gpu_check's choices
    assert bench.parse_variants(gpu_check.EAGER_VARIANTS) == [
        'plain', 'timm DropBlock', 'FMD shared approx', 'FMD per-channel approx', 'FMD per-channel exact']
    monkeypatch.setattr(sys, 'argv', ['bench_resnet50.py', '--device', 'cpu', '--cuda-graph', 'FMD shared approx'])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    assert '--cuda-graph: needs --device cuda and no --compile' in capsys.readouterr().err
