"""Helpers shared by the tests: which (backend, device) pairs run here, the multi-process runner of
the process-group tests, a cross-entropy closure for the optimizer tests."""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sys
import time
from datetime import timedelta

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


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int, timeout_s: float = 120.0):
    """A gloo process group for one spawned rank; a stuck collective fails after ``timeout_s``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        torch.set_num_threads(1)
        yield
        # DDP reducers must be gone while the group is still registered (see spawn_ranks).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def save_rank(out_dir: str, rank: int, obj) -> None:
    """Save one rank's result where :func:`spawn_ranks` reads it (written whole, then renamed)."""
    path = os.path.join(out_dir, f"rank{rank}.pt")
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def spawn_ranks(worker, world: int, out_dir, *args, timeout_s: float = 240.0) -> list:
    """Run ``worker(rank, port, out_dir, *args)`` in ``world`` spawned processes and return what
    each saved with :func:`save_rank`, in rank order.

    A worker that raises fails the test with its traceback. torch 2.13 can deadlock a process at
    exit, after its work is done: every backward stashes a Python object in the thread-local state
    that gloo's queued work captures, and a ProcessGroupGloo destroyed while the GIL is held joins a
    worker thread that waits for the GIL to free that object. A rank stuck there after saving its
    result is terminated and its result used; one that saved nothing fails the test.
    """
    import torch.multiprocessing as mp

    ctx = mp.spawn(worker, args=(free_port(), str(out_dir), *args), nprocs=world, join=False)
    paths = [os.path.join(out_dir, f"rank{r}.pt") for r in range(world)]
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):  # raises if a worker failed
        now = time.monotonic()
        if all(os.path.exists(p) for p in paths):
            deadline = min(deadline, now + 30)  # the work is done: a short grace for the teardown
        if now > deadline:
            for p in ctx.processes:
                p.terminate()
            missing = [r for r, p in enumerate(paths) if not os.path.exists(p)]
            if missing:
                pytest.fail(f"ranks {missing} did not finish within {timeout_s:.0f} s")
            print("spawn_ranks: a rank hung in torch.distributed's teardown after saving its result; "
                  "terminated", file=sys.stderr)
            break
    return [torch.load(p, weights_only=False) for p in paths]


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

