"""What ``import timm_fmd`` adds: the import itself and registering the fmd_<arch> twins.

    python benchmarks/bench_registry.py

Each figure is the median of 5 fresh interpreters (imports are cached within one process), and the
registration alone is timed by removing the twins from timm's registry and registering them again.
"""
from __future__ import annotations

import statistics
import subprocess
import sys

PROBE = r'''
import time
t0 = time.perf_counter()
import timm
t1 = time.perf_counter()
import timm_fmd
t2 = time.perf_counter()
from timm.models import _registry
from timm_fmd.registry import PREFIX, register_fmd_models
twins = [n for n in list(_registry._model_entrypoints) if n.startswith(PREFIX)]
for name in twins:
    _registry._clear_model_entries(name)
    del _registry._model_entrypoints[name]
t3 = time.perf_counter()
count = register_fmd_models()
t4 = time.perf_counter()
print(t1 - t0, t2 - t1, t4 - t3, count)
'''


def main() -> None:
    runs = []
    for _ in range(5):
        out = subprocess.run([sys.executable, '-c', PROBE], check=True, capture_output=True, text=True).stdout
        runs.append([float(v) for v in out.split()])
    med = [statistics.median(r[i] for r in runs) for i in range(4)]
    print(f'{"import timm":<44} {med[0]:7.3f} s')
    print(f'{"import timm_fmd (after timm), incl. twins":<44} {med[1]:7.3f} s')
    print(f'{"register_fmd_models() alone":<44} {med[2]:7.3f} s  ({int(med[3])} twins)')


if __name__ == '__main__':
    main()
