"""Helpers shared by the tests: which (backend, device) pairs run here."""

from __future__ import annotations

import os

import pytest
import torch

from saf_kernels import _backend

FULL = os.environ.get("SAF_FULL") == "1"
HAS_CUDA = torch.cuda.is_available()


def _pair(backend: str, device: str):
    marks = []
    if device == "cuda":
        marks.append(pytest.mark.cuda)
    if backend == "triton":
        marks.append(pytest.mark.triton)
    return pytest.param(backend, device, marks=marks, id=f"{backend}-{device}")


# Every kernel backend, on every device it can run on. Unavailable ones skip with the reason.
KERNEL_PAIRS = [_pair("cpu", "cpu"), _pair("triton", "cpu"), _pair("cuda", "cuda"), _pair("triton", "cuda")]


def skip_unless_available(backend: str, device: str, op: str = "trajectory_loss") -> None:
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device")
    why = _backend.missing(backend, torch.device(device), op)
    if why is not None:
        pytest.skip(why)
