"""Session-wide test settings.

* ``@pytest.mark.cuda`` marks a test that needs a real CUDA device; it is skipped where
  ``torch.cuda.is_available()`` is False, so the suite passes on CPU-only machines and
  ``python -m pytest -m cuda`` runs exactly the GPU checks on a GPU machine.
* Every test compiles from scratch (``torch._dynamo.reset()`` first): dynamo's caches would otherwise carry
  from one test to the next, and a compile of code that an earlier test compiled at another input size is made
  symbolic in its shapes (automatic dynamic), several times slower and a different graph -- the tests' outcome and
  time would depend on their order.
* Without CUDA, Triton runs in its interpreter (``TRITON_INTERPRET=1``) so that ``tests/ops/fused`` can run
  the fused path's kernels on CPU tensors. It must be set before triton is first imported -- ``import timm``
  imports it, ``import torch`` does not -- because ``triton.jit`` picks interpreter or compiler when it
  decorates (triton's own ``tl.rand`` included).
"""
import os
import sys

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


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo = sys.modules.get('torch._dynamo')  # not imported yet: nothing compiled, nothing to reset
    if dynamo is not None:
        dynamo.reset()
