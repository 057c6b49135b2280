"""Session-wide test settings.

* ``@pytest.mark.cuda`` marks a test that needs a real CUDA device; it is skipped where
  ``torch.cuda.is_available()`` is False, so the suite passes on CPU-only machines and
  ``python -m pytest -m cuda`` runs exactly the GPU checks on a GPU machine.
"""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)
