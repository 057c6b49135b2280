"""pyproject.toml's dependency floors: plain floors (benchmarks/check_floors.py installs and tests them), met by
this environment, and accepting the users' H200 image (which has no package index to upgrade from)."""
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('check_floors', ROOT / 'benchmarks' / 'check_floors.py')
check_floors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_floors)

# the GPU image of ../shared/gpu (00-env.txt) as its `pip list` showed it (Python 3.12)
USERS_IMAGE = {'torch': '2.11.0', 'torchvision': '0.26.0', 'timm': '1.0.31', 'huggingface-hub': '1.33.0',
               'safetensors': '0.8.0', 'numpy': '2.5.2'}


def _requirements():
    floors = check_floors.floors(ROOT / 'pyproject.toml')
    return [Requirement(f'{name}>={version}') for name, version in floors.items()]


def test_every_requirement_is_a_floor_without_a_cap(tmp_path):
    floors = check_floors.floors(ROOT / 'pyproject.toml')
    assert {'torch', 'torchvision', 'timm', 'huggingface-hub', 'numpy', 'pytest'} <= set(floors)
    bad = tmp_path / 'pyproject.toml'
    bad.write_text('[project]\ndependencies = ["torch>=2.11,<2.15"]\n')
    with pytest.raises(ValueError, match=r"requirement 'torch>=2.11,<2.15' is not of the form name>=version"):
        check_floors.floors(bad)


def test_this_environment_meets_the_floors():
    """The development environment (torch 2.14.1, torchvision 0.29.1 here) stays installable."""
    for req in _requirements():
        installed = importlib.metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), f'{req} rejects the installed {installed}'


def test_the_users_gpu_image_meets_the_floors():
    for req in _requirements():
        if req.name in USERS_IMAGE:
            assert req.specifier.contains(USERS_IMAGE[req.name]), f'{req} rejects the GPU image\'s ' \
                                                                  f'{USERS_IMAGE[req.name]}'
