"""Every kernel of the fused path compiles for the H100/H200 (sm_90) without spilling registers.

Compiled by Triton's real code generator in a fresh process (the interpreter, on for the other tests here,
replaces the kernels by Python functions): a kernel that only the interpreter accepts fails here.
"""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = '''
import json
from timm_fmd.ops.kernel_resources import kernel_resources
rows = kernel_resources(90, shapes=[(32, 1024, 14, 14), (64, 768, 1, 197)])
print(json.dumps([dict(r, shape=list(r['shape']), tile=list(r['tile'])) for r in rows]))
'''


@pytest.mark.skipif(sys.platform != 'linux', reason="Triton's ptxas ships for Linux")
def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    done = subprocess.run([sys.executable, '-c', SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    kernels = {r['kernel'] for r in rows}
    assert kernels == {'stats approx', 'stats exact', 'finalize', 'apply approx', 'apply exact', 'grad'}
    for r in rows:
        assert r['spill_stores'] == 0 and r['spill_loads'] == 0, r
        assert 0 < r['registers'] <= 255, r
