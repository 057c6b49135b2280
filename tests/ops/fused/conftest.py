"""The fused path's tests run its Triton kernels on CPU tensors through Triton's interpreter.

``TRITON_INTERPRET`` must be set before ``triton.jit`` decorates the kernels, i.e. before
``timm_fmd.ops.kernels`` is first imported (the op imports it lazily, at the first fused call). On a machine
with CUDA the interpreter is left off: there the ``cuda``-marked tests run the compiled kernels instead.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ['TRITON_INTERPRET'] = '1'

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
