"""Shared test set-up: which (backend, device) pairs run here, seeds, markers.

Without a CUDA device the Triton kernels run on CPU tensors through the interpreter, which must
be switched on before the first Triton kernel is defined: set it here, before any test imports
a Triton module.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .helpers import FULL  # noqa: E402


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh inputs per test, reproducible per test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def pytest_collection_modifyitems(config, items):
    if FULL or config.getoption("-m"):
        return
    skip_slow = pytest.mark.skip(reason="fuller grid: run with SAF_FULL=1 or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
