"""Helpers shared by the tests: which (backend, device) pairs run here, a free port for the
process-group tests, a cross-entropy closure for the optimizer tests."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

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


def free_port() -> int:
    """A free TCP port on localhost, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ce_closure(opt, model, x, y):
    """The closure of a two-pass optimizer: zero the gradients, cross-entropy, backward."""
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
           torch.float16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bits of a floating tensor, as integers on the CPU (for bit-exact comparisons)."""
    return t.detach().cpu().view(_INT_OF[t.dtype])

