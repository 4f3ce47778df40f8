"""The CUDA plan cache (csrc/mt_plan_cache.h, csrc/cuda/mt_plan_cuda.{h,cpp}): the device copies
of the multi-tensor plans, shared by every op (element and row plans alike).

On any machine: the cache's rules, compiled with a fake device (tests/cpp/plan_cache_rules.cpp).
On a GPU (``cuda`` marker, skipped elsewhere): a graph captured after an eager warm-up (a cache
hit during capture) or on a plan never seen (a miss during capture), then more distinct plans
than the cache holds, then replays that must still compute the captured step; and a plan
uploaded on one stream behind a long kernel, found at once by another stream, which must wait
for the upload.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from saf_kernels import ops as O

from .helpers import skip_unless_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_SIZE = 32  # PlanCacheCore::kMaxEvictable
STATS = ("hits", "misses", "evictions", "stream_waits", "capture_hits", "capture_uploads", "entries", "permanent")


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")
def test_cache_rules_on_a_fake_device(tmp_path):
    exe = tmp_path / "plan_cache_rules"
    cxx = os.environ.get("CXX", "g++")
    build = subprocess.run(
        [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{os.path.join(ROOT, 'csrc')}",
         os.path.join(ROOT, "tests", "cpp", "plan_cache_rules.cpp"), "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "ok" in run.stdout


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


def _stats() -> dict:
    return dict(zip(STATS, torch.ops.saf_kernels._plan_cache_stats()))


def _lists(n, shapes=((300, 257), (1000,), (3, 5)), scale=1.0):
    return [[torch.randn(s, device="cuda") * scale for s in shapes] for _ in range(n)]


def _force_misses(count=CACHE_SIZE + 8):
    """`count` distinct plans of the same size as the tests' (rho differs): each one a miss that
    evicts the least recently used entry, and whose allocation may reuse freed plan memory."""
    p, g = _lists(2)
    s = [torch.empty_like(t) for t in p]
    for i in range(count):
        O.sam_perturb_(p, g, s, rho=1e-3 * (i + 1), backend="cuda")


def _expected_perturb(p, g, rho):
    """sam_perturb_ by the reference, in float64 on the CPU: (weights, norm)."""
    p64 = [t.double().cpu() for t in p]
    norm = O.sam_perturb_(p64, [t.double().cpu() for t in g], [torch.empty_like(t) for t in p64], rho=rho,
                          backend="torch")
    return p64, norm


@pytest.mark.cuda
@pytest.mark.parametrize("warm", [True, False], ids=["hit-in-capture", "miss-in-capture"])
def test_graph_survives_forced_misses(warm):
    skip_unless_available("cuda", "cuda", "sam_perturb_")
    p, g = _lists(2)
    stash = [torch.empty_like(t) for t in p]
    p0 = [t.clone() for t in p]
    rho = 0.05 if warm else 0.0625  # not the other case's plan, should the tensors reuse its addresses
    before = _stats()
    if warm:  # the usual pattern: eager warm-up on a side stream, then capture (a cache hit)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            O.sam_perturb_(p, g, stash, rho=rho, backend="cuda")
        torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        O.sam_perturb_(p, g, stash, rho=rho, backend="cuda")
        O.sam_restore_(p, stash, backend="cuda")
        norm = O.sam_perturb_(p, g, stash, rho=rho, backend="cuda")  # a hit within the capture
    after_capture = _stats()
    # Every plan the graph reads is permanent: the perturbation's and the restore's.
    assert after_capture["permanent"] >= before["permanent"] + 2
    assert after_capture["capture_hits"] >= before["capture_hits"] + (2 if warm else 1)
    assert after_capture["capture_uploads"] >= before["capture_uploads"] + (1 if warm else 2)
    _force_misses()
    assert _stats()["evictions"] > after_capture["evictions"]
    want, want_norm = _expected_perturb(p0, g, rho)
    for _ in range(2):
        for t, t0 in zip(p, p0):
            t.copy_(t0)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(norm.double().cpu(), want_norm, rtol=1e-5, atol=0)
        for a, b in zip(p, want):
            torch.testing.assert_close(a.double().cpu(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_row_plan_graph_survives_forced_misses():
    """R-SAM's row plans share the cache: a captured rsam_noise_ keeps its plan too."""
    skip_unless_available("cuda", "cuda", "rsam_noise_")
    (p,) = _lists(1, shapes=((4, 2100), (9, 7)))
    stash = [torch.empty_like(t) for t in p]
    p0 = [t.clone() for t in p]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        O.rsam_noise_(p, stash, std=1e-2, seed=3, offset=0, backend="cuda")
    _force_misses()
    for t, t0 in zip(p, p0):
        t.copy_(t0)
    graph.replay()
    torch.cuda.synchronize()
    ref_p = [t.double().cpu() for t in p0]
    O.rsam_noise_(ref_p, [torch.empty_like(t) for t in ref_p], std=1e-2, seed=3, offset=0, backend="torch")
    for a, b, a0 in zip(p, ref_p, p0):
        torch.testing.assert_close((a - a0).double().cpu(), b - a0.double().cpu(), rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
def test_other_stream_waits_for_the_upload():
    """Stream A: a long kernel, then a new plan's upload (a miss) and its kernels. Stream B, at
    once: the same plan (a hit). B's norm pass must read the plan after A's copy has landed."""
    skip_unless_available("cuda", "cuda", "sam_perturb_")
    p, g = _lists(2)
    stash = [torch.empty_like(t) for t in p]
    want = torch.sqrt(sum((t.double() ** 2).sum() for t in g))
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    a.wait_stream(torch.cuda.current_stream())
    b.wait_stream(torch.cuda.current_stream())
    before = _stats()
    with torch.cuda.stream(a):
        # Freed zeros where the plan's memory may come from: a plan read too early reads zeros
        # (no tensors), and the norm comes out 0.
        for n in (512, 1024, 2048, 4096, 8192, 16384):
            torch.zeros(n, dtype=torch.uint8, device="cuda")
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the upload
        O.sam_perturb_(p, g, stash, rho=0.0, backend="cuda")
    with torch.cuda.stream(b):
        norm_b = O.sam_perturb_(p, g, stash, rho=0.0, backend="cuda")
    torch.cuda.synchronize()
    after = _stats()
    assert after["misses"] == before["misses"] + 1 and after["hits"] == before["hits"] + 1
    assert after["stream_waits"] == before["stream_waits"] + 1
    torch.testing.assert_close(norm_b.double().cpu(), want.cpu(), rtol=1e-5, atol=0)


@pytest.mark.cuda
def test_same_stream_hits_do_not_wait():
    skip_unless_available("cuda", "cuda", "ema_update_")
    e, m = _lists(2)
    before = _stats()
    for _ in range(3):
        O.ema_update_(e, m, 0.9, backend="cuda")
    after = _stats()
    assert after["misses"] - before["misses"] <= 1 and after["hits"] - before["hits"] >= 2
    assert after["stream_waits"] == before["stream_waits"]
