"""The fused path's tests: interpreter tests (``@pytest.mark.interpreter``) run its Triton kernels on CPU tensors.

``TRITON_INTERPRET=1`` is set by ``tests/conftest.py`` where there is no CUDA device (it must be set before
triton is imported). Where CUDA is available the interpreter stays off and the ``cuda``-marked tests run the
compiled kernels instead, so the interpreter tests are skipped there.
"""
import os

import pytest
import torch

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if 'tests/ops/fused' not in str(item.fspath).replace(os.sep, '/'):
            continue
        if not HAVE_TRITON:
            item.add_marker(pytest.mark.skip(reason='needs triton'))
        elif 'interpreter' in item.keywords and torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason='interpreter tests run where there is no CUDA device'))
