"""Session-wide test settings.

* ``@pytest.mark.cuda`` marks a test that needs a real CUDA device; it is skipped where
  ``torch.cuda.is_available()`` is False, so the suite passes on CPU-only machines and
  ``python -m pytest -m cuda`` runs exactly the GPU checks on a GPU machine.
* Without CUDA, Triton runs in its interpreter (``TRITON_INTERPRET=1``) so that ``tests/ops/fused`` can run
  the fused path's kernels on CPU tensors. It must be set before triton is first imported -- ``import timm``
  imports it, ``import torch`` does not -- because ``triton.jit`` picks interpreter or compiler when it
  decorates (triton's own ``tl.rand`` included).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ['TRITON_INTERPRET'] = '1'


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)
