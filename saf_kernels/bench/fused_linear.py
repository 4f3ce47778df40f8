"""Fused linear + CE + KL (language-model output layer, MESA form: a teacher's hidden states and
lm_head) against eager PyTorch (materialised logits, ``F.cross_entropy`` + ``F.kl_div``) and
``torch.compile`` of it: forward + backward time and peak memory.

Each variant runs in a fresh subprocess (``python -m saf_kernels.bench.fused_linear``), so its
memory is measured alone, in the steady state: after one warm-up step (which also holds
torch.compile's build and the libraries' lazy set-up) the peak is reset, and the timed steps' peak
is taken over the memory held at that point. On CPU that is the peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs``) over the RSS, with glibc told to map every allocation of 64 KiB or more
(:func:`map_large_allocations`) so that freed tensors leave the RSS; on CUDA
``torch.cuda.max_memory_allocated`` over ``memory_allocated``. Time: median of the timed steps.

Shapes (N x H x V): quick 1024 x 128 x 8000; default 4096 x 256 x 32000 on CPU; ``big`` adds
8192 x 512 x 50257 on CPU (minutes) and, on CUDA, 8192 x 4096 x 128256 in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

TITLE = ("Fused linear + CE + KL (MESA form: teacher hidden + lm_head), forward + backward; each variant in its "
         "own process (memory: peak RSS growth on CPU, max_memory_allocated on CUDA)")
VARIANTS = ("eager", "compile", "fused")
LAM, T = 0.8, 5.0


def shapes(device: torch.device, quick: bool, big: bool) -> list[tuple[int, int, int, str]]:
    if quick:
        return [(1024, 128, 8000, "float32")]
    out = [(4096, 256, 32000, "float32")]
    if big:
        out.append((8192, 512, 50257, "float32"))
        if device.type == "cuda":
            out.append((8192, 4096, 128256, "bfloat16"))
    return out


def eager_loss(h, w, th, tw, y):
    """The baseline: full logits, then F.cross_entropy + lam T^2 F.kl_div."""
    z = h @ w.t()
    with torch.no_grad():
        t = th @ tw.t()
    kl = F.kl_div(F.log_softmax(z.float() / T, -1), F.log_softmax(t.float() / T, -1), log_target=True,
                  reduction="batchmean")
    return F.cross_entropy(z.float(), y) + LAM * T * T * kl


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(variant: str, n: int, h_dim: int, v: int, dtype: str, device: str, steps: int) -> dict:
    """One variant in this process: ``{"time_s", "peak_bytes", "loss"}``."""
    import saf_kernels as sk

    dev, dt = torch.device(device), getattr(torch, dtype)
    if dev.type == "cpu":
        map_large_allocations()
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=dev, dtype=dt)

    h = rnd(n, h_dim).requires_grad_()
    w = rnd(v, h_dim, scale=h_dim ** -0.5).requires_grad_()
    th, tw = rnd(n, h_dim), rnd(v, h_dim, scale=h_dim ** -0.5)
    y = torch.randint(0, v, (n,), generator=g).to(dev)
    if variant == "fused":
        def fn(h, w, th, tw, y):
            return sk.fused_linear_trajectory_loss(h, w, y, th, tw, lam=LAM, temperature=T)
    else:
        fn = torch.compile(eager_loss) if variant == "compile" else eager_loss
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times, loss, base = [], None, 0
    for i in range(steps + 1):
        h.grad = w.grad = None
        if i == 1:  # the first step warmed up (and built the compiled graph): reset the peak
            base = reset_peak(dev)
        sync()
        t0 = time.perf_counter()
        loss = fn(h, w, th, tw, y)
        loss.backward()
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    peak = max(peak_bytes(dev) - base, 0)
    return {"time_s": statistics.median(times), "peak_bytes": peak, "loss": float(loss.detach())}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def map_large_allocations() -> None:
    """glibc: serve every allocation of 64 KiB or more by mmap (``M_MMAP_THRESHOLD``), so that a
    freed tensor leaves the RSS and a peak RSS counts the tensors alive at the peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)
    except (OSError, AttributeError):
        pass


def reset_peak(dev: torch.device) -> int:
    """Reset the peak memory counter of ``dev`` and return the memory held now (bytes): CUDA's
    allocated bytes, or on CPU the RSS (``VmHWM`` reset through ``/proc/self/clear_refs``)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return torch.cuda.memory_allocated(dev)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    return _rss_bytes()


def peak_bytes(dev: torch.device) -> int:
    """The peak since :func:`reset_peak` (bytes)."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev)
    return _status_kib("VmHWM") * 1024


def run(device: torch.device, quick: bool, big: bool = False, progress=None, steps: int | None = None,
        compile_baseline: bool = True) -> list[dict]:
    rows = []
    steps = steps or (2 if quick else 3)
    variants = [v for v in VARIANTS if compile_baseline or v != "compile"]
    if progress is not None:
        progress.add(len(variants) * len(shapes(device, quick, big)))
    for n, h_dim, v, dtype in shapes(device, quick, big):
        for variant in variants:
            case = f"{n}x{h_dim}x{v} {dtype}"
            if progress is not None:
                progress(f"fused_linear {case} {variant}")
            cmd = [sys.executable, "-m", "saf_kernels.bench.fused_linear", "--variant", variant, "--shape",
                   f"{n},{h_dim},{v}", "--dtype", dtype, "--device", device.type, "--steps", str(steps)]
            row = {"kind": "fused_linear", "case": case, "provider": variant}
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                row["unavailable"] = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
            else:
                row.update(json.loads(p.stdout.strip().splitlines()[-1]))
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    from .report import _fmt_time, _table

    out = []
    cases = dict.fromkeys(r["case"] for r in rows if r.get("kind") == "fused_linear")
    for case in cases:
        by = {r["provider"]: r for r in rows if r.get("kind") == "fused_linear" and r["case"] == case}
        for variant in VARIANTS:
            r = by.get(variant)
            if r is None:
                continue
            if "unavailable" in r:
                out.append([case, variant, "-", "-", "-", "-", r.get("unavailable", "not run")])
                continue
            e = by.get("eager", {})
            speed = f"{e['time_s'] / r['time_s']:.2f}x" if "time_s" in e else "-"
            mem = f"{r['peak_bytes'] / e['peak_bytes']:.3f}" if e.get("peak_bytes") else "-"
            out.append([case, variant, _fmt_time(r["time_s"]), f"{r['peak_bytes'] / 2**20:.0f} MiB", speed, mem, ""])
    return _table(["N x H x V", "variant", "fwd+bwd", "peak memory", "speed-up vs eager", "memory / eager", "note"],
                  out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="one variant of the fused-linear benchmark, in this process")
    ap.add_argument("--variant", choices=VARIANTS, required=True)
    ap.add_argument("--shape", required=True, help="N,H,V")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args(argv)
    n, h_dim, v = (int(x) for x in a.shape.split(","))
    print(json.dumps(measure(a.variant, n, h_dim, v, a.dtype, a.device, a.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
