"""Shared test set-up: which (backend, device) pairs run here, seeds, markers.

Without a CUDA device the Triton kernels run on CPU tensors through the interpreter, which must
be switched on before the first Triton kernel is defined: set it here, before any test imports
a Triton module. Every interpreted launch then goes through tests/triton_aot.py's hook: its
scalar arguments are typed as a GPU launch types them (a plain Python float is fp32), and its
specialisation is recorded for the ahead-of-time compile of tests/test_triton_aot.py, which runs
last (``--triton-record PATH`` also writes the recorded launches to a file).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import triton_aot  # noqa: E402
from .helpers import FULL  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    triton_aot.install()


def pytest_addoption(parser):
    parser.addoption("--triton-record", default=os.environ.get("SAF_TRITON_RECORD"),
                     help="write the distinct Triton launches of this run (interpreter) to this JSON file")


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh inputs per test, reproducible per test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    triton_aot.RECORDER.current_test = request.node.nodeid
    yield


def pytest_collection_modifyitems(config, items):
    # The AOT compile of the recorded launches runs after every test that launches a kernel.
    items.sort(key=lambda item: "triton_aot" in item.keywords)
    if FULL or config.getoption("-m"):
        return
    skip_slow = pytest.mark.skip(reason="fuller grid: run with SAF_FULL=1 or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--triton-record")
    if path and triton_aot.RECORDER.launches:
        triton_aot.RECORDER.dump(path)


def pytest_terminal_summary(terminalreporter):
    # tests/test_fuzz.py: how many hypothesis examples each op ran, per backend.
    mod = next((m for n, m in list(sys.modules.items()) if n.endswith("tests.test_fuzz") or n == "test_fuzz"), None)
    counts = getattr(mod, "COUNTS", None)
    if not counts:
        return
    terminalreporter.write_sep("-", "hypothesis examples per op (fuzzing)")
    for op, by_backend in sorted(counts.items()):
        per = ", ".join(f"{b} {n}" for b, n in sorted(by_backend.items()))
        terminalreporter.write_line(f"{op}: {sum(by_backend.values())} ({per})")
