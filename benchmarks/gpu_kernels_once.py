"""Every CUDA kernel of saf_kernels once, on small inputs: the program that `make gpu-check` runs
under ``compute-sanitizer --tool memcheck`` and ``--tool racecheck``.

Covered launch shapes: the trajectory-loss and bank-step rows of one warp (C <= 1024), 256
threads (C <= 16384) and 512 threads (larger C); a bank step of several blocks, so that its last
block sums the row losses; R-SAM noise over units of 2048+ elements (the whole-block path) and
short ones (a warp per unit); the multi-tensor ops over a list that mixes float32 and bfloat16
tensors (dtype dispatch per block) with one tensor spanning several chunks; GSAM's three dot
products and its coefficient finalize; the plan cache's capture path (a CUDA graph).

``--device cpu`` runs the same calls on the C++ CPU kernels: a check, on machines without a GPU,
that this program's calls still match the API.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import saf_kernels as sk
from saf_kernels import ops as O


def _lists(dev, shapes, dtypes, scale=1.0):
    return [(torch.randn(s, device=dev) * scale).to(d) for s, d in zip(shapes, dtypes)]


def run(dev: torch.device, backend: str) -> list[str]:
    done = []

    def mark(what):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # an error is reported at the kernel that caused it
        done.append(what)

    kw = dict(backend=backend)
    # Trajectory loss: one warp per row, 256 and 512 threads per row; mean over valid labels.
    for C in (100, 2000, 20000):
        z = torch.randn(8, C, device=dev, requires_grad=True)
        t = torch.randn(8, C, device=dev)
        y = torch.randint(C, (8,), device=dev)
        y[1] = -100
        sk.saf_loss(z, y, t, lam=0.3, temperature=2.0, label_smoothing=0.1, **kw).backward()
        sk.trajectory_kl_loss(z.detach(), t.to(torch.bfloat16), reduction="none", **kw)
        mark(f"trajectory_loss C={C}")
    # Bank step over two epochs (the second reads the first's logits), several blocks; record.
    for C, B in ((100, 64), (2000, 8), (20000, 4)):
        bank = sk.TrajectoryBank(128, C, delay=1, dtype=torch.bfloat16, device=dev, **kw)
        ids = torch.randperm(128, device=dev)[:B]
        for epoch in (0, 1):
            z = torch.randn(B, C, device=dev, requires_grad=True)
            bank.step(z, torch.randint(C, (B,), device=dev), ids, epoch, lam=0.3, temperature=2.0).backward()
        bank.record(torch.randn(B, C, device=dev), ids, 2)
        mark(f"bank step + record C={C} B={B}")
    # Multi-tensor ops: float32 and bfloat16 in one list, one tensor over several chunks.
    shapes = [(300, 700), (33,), (5, 7), (1,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
    p, g = _lists(dev, shapes, dtypes), _lists(dev, shapes, dtypes)
    stash = [torch.empty_like(x) for x in p]
    O.sam_perturb_(p, g, stash, rho=0.05, adaptive=[True, False, True, False], eta=0.01, **kw)
    O.sam_restore_(p, stash, **kw)
    O.sam_perturb_(p, g, stash, rho=0.05, stash_mode="delta", **kw)
    O.sam_restore_(p, stash, stash_mode="delta", **kw)
    mark("sam_perturb_ / sam_restore_")
    buf = [torch.zeros_like(x) for x in p]
    O.sam_perturb_(p, g, stash, rho=0.05, **kw)
    O.sam_restore_sgd_(p, g, stash, buf, lr=0.1, momentum=0.9, weight_decay=5e-4, first_run=True, **kw)
    m, v = [torch.zeros_like(x) for x in p], [torch.zeros_like(x) for x in p]
    steps = [torch.ones((), device=dev) for _ in p]  # the count including this step
    O.sam_perturb_(p, g, stash, rho=0.05, **kw)
    O.sam_restore_adamw_(p, g, stash, m, v, steps, lr=1e-3, **kw)
    mark("sam_restore_sgd_ / sam_restore_adamw_")
    O.ema_update_(_lists(dev, shapes, dtypes), p, 0.99, **kw)
    mark("ema_update_")
    for kind, dtype in (("words", torch.int64), ("uniform", torch.float32), ("normal", torch.bfloat16),
                        ("bernoulli", torch.float32)):
        O.philox_(torch.empty(1001, dtype=dtype, device=dev), seed=3, offset=1, kind=kind, **kw)
    mark("philox_")
    O.esam_perturb_(p, g, stash, rho=0.05, beta=0.5, seed=11, offset=2, stash_mode="delta", **kw)
    O.esam_restore_(p, stash, beta=0.5, seed=11, offset=2, stash_mode="delta", **kw)
    mark("esam_perturb_ / esam_restore_")
    rshapes = [(3, 2100), (4, 4096), (50, 9), (7,)]  # units of 2048+ elements: the whole-block path
    rp = _lists(dev, rshapes, [torch.float32, torch.bfloat16, torch.float32, torch.float32])
    rstash = [torch.empty_like(x) for x in rp]
    O.rsam_noise_(rp, rstash, std=[1e-3, 2e-3, 1e-3, 5e-4], seed=5, offset=0, **kw)
    O.rsam_perturb_(rp, _lists(dev, rshapes, [x.dtype for x in rp]), rstash, rho=0.05, **kw)
    mark("rsam_noise_ / rsam_perturb_")
    old = _lists(dev, shapes, dtypes)
    O.sam_perturb_(p, g, stash, rho=0.05, **kw)
    O.gsam_combine_(p, g, old, stash, alpha=0.4, **kw)
    O.sam_perturb_(p, g, stash, rho=0.05, **kw)
    O.gsam_restore_sgd_(p, g, old, stash, buf, lr=0.1, alpha=0.4, momentum=0.9, **kw)
    mark("gsam_combine_ / gsam_restore_sgd_")
    if dev.type == "cuda":
        # The plan cache while a stream is captured: a hit made permanent, a miss uploaded
        # outside the graph.
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            O.sam_perturb_(p, g, stash, rho=0.05, **kw)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            O.sam_perturb_(p, g, stash, rho=0.05, **kw)
            O.sam_restore_(p, stash, **kw)
            O.ema_update_(buf, p, 0.5, **kw)
        graph.replay()
        mark("graph capture + replay")
    bad = [t for t in p + rp if not torch.isfinite(t.float()).all()]
    if bad:
        raise AssertionError(f"{len(bad)} tensors hold non-finite values after the run")
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_kernels_once: no CUDA device", file=sys.stderr)
        return 2
    backend = args.device  # the C++ kernels of that device, nothing else
    why = sk.available(args.device, "sam_perturb_")[backend]
    if why is not None:
        print(f"gpu_kernels_once: backend {backend} unavailable: {why}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    t0 = time.perf_counter()
    done = run(torch.device(args.device), backend)
    print(f"gpu_kernels_once: {len(done)} groups of kernels ran on {args.device} in "
          f"{time.perf_counter() - t0:.1f}s: {'; '.join(done)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
