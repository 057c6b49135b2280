"""benchmarks/ab_previous.py: an earlier commit's package imported beside this checkout's, in one process."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import timm_fmd

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('ab_previous', ROOT / 'benchmarks' / 'ab_previous.py')
ab = importlib.util.module_from_spec(_spec)
sys.modules['ab_previous'] = ab
_spec.loader.exec_module(ab)


def test_a_commit_imports_beside_this_checkout_with_its_own_ops(tmp_path):
    """Both packages define torch.library ops (custom_op and Library); the base's go to a namespace of its own,
    or importing it fails on their duplicate registration. The base computes what this checkout does."""
    if subprocess.run(['git', '-C', str(ROOT), 'rev-parse', 'HEAD'], capture_output=True).returncode != 0:
        pytest.skip('not a git checkout')
    distortion, inject = ab.import_base('HEAD', tmp_path)
    assert distortion.__name__ == 'timm_fmd_base.ops.distortion' and inject.__name__ == 'timm_fmd_base.inject'
    for op in ('fmd_stats', 'fmd_apply', 'fmd_grad', 'block_seed_rate'):
        assert getattr(torch.ops.timm_fmd_base, op) is not getattr(torch.ops.timm_fmd, op)
    x = torch.randn(2, 4, 9, 9)
    outputs = []
    for fmd in (distortion.feature_map_distortion, timm_fmd.feature_map_distortion):
        torch.manual_seed(0)
        outputs.append(fmd(x, 0.2, block_size=3))
    assert not torch.equal(outputs[0], x) and torch.equal(*outputs)
