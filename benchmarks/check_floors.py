"""Test the dependency floors that pyproject.toml states: build a virtual environment with every declared
dependency at exactly its lower bound, install this checkout into it, and run the test suite there.

    python benchmarks/check_floors.py                     # venv in a temporary folder, removed afterwards
    python benchmarks/check_floors.py --venv /work/floors/venv -- tests/train -x   # kept and reused

Every requirement of ``[project] dependencies`` and of the ``dev`` extra must have the form ``name>=X``
(a floor and no cap): each becomes ``name==X`` in a constraints file, ``pip install -c constraints.txt
-e .[dev]`` resolves the rest (transitive dependencies such as triton, which torch pins, at whatever
pip picks). The floors are read from pyproject.toml itself, so what this runs is what the package claims.
Needs the package index (the floors are older releases: torch's CUDA wheels are a few GB with their
``nvidia-*`` and ``cuda-*`` dependencies). Arguments after ``--`` go to pytest (default: the whole suite,
``-q``). Exit status: pytest's, or 2 when pyproject.toml states a requirement without a floor, or 3 when
the installation fails.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
REPORTED = ('torch', 'torchvision', 'triton', 'timm', 'huggingface-hub', 'safetensors', 'numpy', 'pillow', 'pyyaml',
            'matplotlib', 'pytest')


def floors(pyproject: Path) -> Dict[str, str]:
    """``{name: version}`` of every ``name>=version`` requirement (dependencies and the dev extra; names
    normalised as pip does, e.g. ``huggingface-hub``).

    Raises ``ValueError`` naming a requirement that is not a plain floor (no ``>=``, a cap, markers)."""
    project = tomllib.loads(pyproject.read_text())['project']
    requirements = project['dependencies'] + project.get('optional-dependencies', {}).get('dev', [])
    out = {}
    for req in requirements:
        match = re.fullmatch(r'\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([0-9][0-9A-Za-z.+!-]*)\s*', req)
        if match is None:
            raise ValueError(f'{pyproject}: requirement {req!r} is not of the form name>=version (a tested floor, '
                             f'no cap)')
        out[re.sub(r'[-_.]+', '-', match.group(1)).lower()] = match.group(2)  # the PEP 503 name
    return out


def _run(cmd: List[str], **kwargs) -> subprocess.CompletedProcess:
    print('+', ' '.join(cmd), flush=True)
    return subprocess.run(cmd, **kwargs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--venv', type=Path, default=None,
                        help='build the venv here and keep it (reused when it exists); default: a temporary one')
    parser.add_argument('pytest_args', nargs='*', help='arguments for pytest, after -- (default: -q)')
    args = parser.parse_args(argv)
    try:
        pins = floors(ROOT / 'pyproject.toml')
    except ValueError as e:
        print(f'check_floors: {e}', file=sys.stderr)
        return 2
    temp = None if args.venv is not None else tempfile.mkdtemp(prefix='timm-fmd-floors.')
    venv = args.venv or Path(temp) / 'venv'
    try:
        python = venv / 'bin' / 'python'
        if not python.exists():
            _run([sys.executable, '-m', 'venv', str(venv)], check=True)
        constraints = venv / 'floors.txt'
        constraints.write_text(''.join(f'{name}=={version}\n' for name, version in pins.items()))
        print(f'floors: {", ".join(f"{n}=={v}" for n, v in pins.items())}', flush=True)
        install = _run([str(python), '-m', 'pip', 'install', '-q', '-c', str(constraints), '-e', f'{ROOT}[dev]'])
        if install.returncode != 0:
            print('check_floors: installing the floors failed (see pip above)', file=sys.stderr)
            return 3
        freeze = _run([str(python), '-m', 'pip', 'list', '--format=freeze'], capture_output=True, text=True).stdout
        versions = dict(line.lower().split('==', 1) for line in freeze.splitlines() if '==' in line)
        print('installed: ' + ', '.join(f'{n} {versions.get(n, "-")}' for n in REPORTED), flush=True)
        env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}  # the venv's code only
        return _run([str(python), '-m', 'pytest', '-p', 'no:cacheprovider', *(args.pytest_args or ['-q'])],
                    cwd=ROOT, env=env).returncode
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
