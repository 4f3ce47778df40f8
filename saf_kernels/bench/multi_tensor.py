"""SAM's optimizer work (first_step + second_step: everything but the forward and backward
passes) on parameter lists shaped like ResNet-18, ResNet-50 and ViT-B/16, in one run:

- ``per-tensor loop``: the widely used port (davda54/sam): per-tensor norms stacked, a clone of
  every weight, ``e = g * scale`` then ``p.add_(e)``, restore by rebinding ``p.data``, then the
  base SGD with torch's default implementation.
- ``foreach``: the best plain-PyTorch version (clip_grad style): ``_foreach_norm``, stash with
  ``_foreach_copy_``, ``_foreach_mul`` + ``_foreach_add_``, copy back, SGD ``foreach=True``.
- ``saf_kernels[<backend>]``: ``saf_kernels.optim.SAM`` as it comes (fused norm + perturb, the
  restore fused into the SGD update: ``fused_step`` defaults to the fused path), and ``+exact``
  (``fused_step=False``: fused restore, then the base SGD in torch's default implementation, as
  the loop's; bit exact).

The base optimizer is SGD with momentum 0.9 and weight decay 5e-4. Bytes are counted as the
passes over the parameters each provider makes (a pass = P elements read or written):

=====================  =====  ======  ======  =======  =====
provider               norm   perturb restore SGD      total
=====================  =====  ======  ======  =======  =====
per-tensor loop        1      2+2+3   0 (*)   11       19
foreach                1      2+2+3   2       11       21
saf_kernels+exact      1      4       2       11       18
saf_kernels (default)  1      4       5 (restore+SGD)  10
=====================  =====  ======  ======  =======  =====

(*) rebinding ``p.data`` to the clone costs no traffic but allocates a fresh copy every step
(page faults on a CPU) and breaks aliasing with flat parameter buffers. SGD's 11 passes:
``d = g + wd * w`` (3), ``buf *= m`` (2), ``buf += d`` (3), ``w -= lr * buf`` (3). The floor of
SAM + SGD with momentum is 10 passes (performance.md 4.3: perturb 5, restore fused into SGD 5).
Per-tensor code keeps a tensor's temporaries in the CPU caches, so on a CPU the loop's (and
torch's for-loop SGD's) counted passes overstate its DRAM traffic; on a GPU the loop is
launch-bound instead (about 4 launches per tensor).
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

from ..optim import SAM
from .param_shapes import MODELS
from .timing import Timing, kernel_backends, peak_bandwidth, synchronize

SGD_KW = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
RHO = 0.05
PASSES = {"per-tensor loop": 19, "foreach": 21, "saf_kernels": 10, "saf_kernels+exact": 18}
FLOOR_PASSES = 10


class LoopSAM:
    """davda54/sam's first_step / second_step, as published (per-tensor loop, clone, rebind)."""

    def __init__(self, params, rho):
        self.params, self.rho = params, rho
        self.base = torch.optim.SGD(params, **SGD_KW)
        self.old: dict = {}

    @torch.no_grad()
    def step(self):
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params]), p=2)
        scale = self.rho / (norm + 1e-12)
        for p in self.params:
            self.old[p] = p.data.clone()
            e_w = p.grad * scale.to(p)
            p.add_(e_w)
        for p in self.params:
            p.data = self.old[p]
        self.base.step()


class ForeachSAM:
    """The same step with torch._foreach_* ops and no host synchronisation."""

    def __init__(self, params, rho):
        self.params, self.rho = params, rho
        self.grads = [p.grad for p in params]
        self.stash = [torch.empty_like(p) for p in params]
        self.base = torch.optim.SGD(params, foreach=True, **SGD_KW)

    @torch.no_grad()
    def step(self):
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.grads)))
        scale = self.rho / (norm + 1e-12)
        torch._foreach_copy_(self.stash, self.params)
        torch._foreach_add_(self.params, torch._foreach_mul(self.grads, scale))
        torch._foreach_copy_(self.params, self.stash)
        self.base.step()


class OursSAM:
    def __init__(self, params, rho, backend, fused: bool | None):
        # The base SGD in torch's default implementation, as the per-tensor loop's (for-loop on
        # CPU, where it beats foreach; foreach on CUDA).
        self.opt = SAM(params, torch.optim.SGD, rho=rho, backend=backend, fused_step=fused, **SGD_KW)

    def step(self):
        self.opt.first_step()
        self.opt.second_step()


def cases(device: torch.device, quick: bool) -> list[tuple[str, torch.dtype]]:
    # --quick keeps the report under a minute on a 2-core CPU: ViT-B (350 MB per copy) only in
    # full runs there.
    models = ["resnet18", "resnet50", "vit_b_16"]
    if quick and device.type == "cpu":
        models = models[:2]
    out = [(m, torch.float32) for m in models]
    if device.type == "cuda" and not quick:
        out.append(("vit_b_16", torch.bfloat16))
    return out


def providers(device: torch.device) -> dict[str, Callable | str]:
    """Provider name -> ``make(params) -> step()``, or why it is unavailable."""
    out: dict[str, Callable | str] = {
        "per-tensor loop": lambda ps: LoopSAM(ps, RHO).step,
        "foreach": lambda ps: ForeachSAM(ps, RHO).step,
    }
    for b, why in kernel_backends(device, "sam_perturb_"):
        for fused in (None, False):  # the default (fused where supported: here), the exact opt-in
            name = f"saf_kernels[{b}]" + ("+exact" if fused is False else "")
            out[name] = why if why else (lambda ps, b=b, fused=fused: OursSAM(ps, RHO, b, fused).step)
    return out


def _passes(provider: str) -> int:
    if provider.startswith("saf_kernels"):
        return PASSES["saf_kernels+exact" if provider.endswith("+exact") else "saf_kernels"]
    return PASSES[provider]


def _interleaved(
    steps: dict[str, Callable[[], None]], device: torch.device, rounds: int, warmup: int
) -> dict[str, Timing]:
    """Median time per call of each step, the providers timed in rotating order round after
    round, so that load from other processes (the machines are shared) drifts over all of them
    alike rather than over whichever ran last."""
    import time

    for f in steps.values():
        for _ in range(warmup):
            f()
    synchronize(device)
    names = list(steps)
    inner = {}
    for n in names:  # on a GPU, enough calls per sample that the sample lasts ~2 ms
        t0 = time.perf_counter()
        steps[n]()
        synchronize(device)
        one = time.perf_counter() - t0
        inner[n] = 1 if device.type == "cpu" else max(1, min(200, int(2e-3 / max(one, 1e-6))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(inner[n]):
                    steps[n]()
                b.record()
                b.synchronize()
                samples[n].append(a.elapsed_time(b) / 1e3 / inner[n])
            else:
                t0 = time.perf_counter()
                steps[n]()
                samples[n].append(time.perf_counter() - t0)
    out = {}
    for n, xs in samples.items():
        xs = sorted(xs)
        out[n] = Timing(
            statistics.median(xs),
            xs[int(0.2 * (len(xs) - 1))],
            xs[int(0.8 * (len(xs) - 1) + 0.5)],
            len(xs),
            inner[n],
        )
    return out


def run(device: torch.device, quick: bool, progress) -> list[dict]:
    """One row per (parameter list, provider): median time of first_step + second_step."""
    rows = []
    plan = [(m, dt, providers(device)) for m, dt in cases(device, quick)]
    progress.add(sum(len(p) for _, _, p in plan))
    peak = peak_bandwidth(device)
    for model, dtype, provs in plan:
        shapes = MODELS[model]()
        gen = torch.Generator(device="cpu").manual_seed(0)
        params = [
            torch.randn(s, generator=gen).mul_(0.05).to(device=device, dtype=dtype).requires_grad_()
            for s in shapes
        ]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
        n = sum(p.numel() for p in params)
        esize = torch.finfo(dtype).bits // 8
        label = (
            f"{model} ({len(shapes)} tensors, {n / 1e6:.1f}M, {'fp32' if dtype == torch.float32 else 'bf16'})"
        )
        base = {
            "kind": "multi_tensor",
            "op": "sam_step",
            "case": label,
            "model": model,
            "tensors": len(shapes),
            "numel": n,
            "dtype": str(dtype).replace("torch.", ""),
        }
        steps, out_rows = {}, {}
        for name, make in provs.items():
            progress(f"sam_step {model} {name}")
            row = dict(base, provider=name)
            out_rows[name] = row
            if isinstance(make, str):
                row["unavailable"] = make
                continue
            try:
                steps[name] = make(params)
            except Exception as e:  # noqa: BLE001  (a provider failing is a result, not a crash)
                row["error"] = f"{type(e).__name__}: {e}"
        if device.type == "cpu":
            rounds = 5 if quick else (7 if n < 50e6 else 5)
        else:
            rounds = 10 if quick else 25
        try:
            timings = _interleaved(steps, device, rounds, warmup=2)
        except Exception as e:  # noqa: BLE001
            timings = {}
            for name in steps:
                out_rows[name]["error"] = f"{type(e).__name__}: {e}"
        for name, t in timings.items():
            row = out_rows[name]
            row.update(t.as_dict())
            passes = _passes(name)
            row["passes"] = passes
            row["bytes"] = passes * n * esize
            row["gbps"] = row["bytes"] / t.median_s / 1e9
            if peak:
                row["floor_share"] = FLOOR_PASSES * n * esize / peak / t.median_s
        rows += list(out_rows.values())
        del steps, params
    return rows


def _fmt(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def table(rows: list[dict]) -> str:
    """Time, passes, GB/s and speed-ups over the per-tensor loop and foreach, per parameter list."""
    from .report import _table

    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r.get("kind") == "multi_tensor":
            by_case.setdefault(r["case"], {})[r["provider"]] = r
    lines, notes = [], []
    for case, provs in by_case.items():
        loop = provs.get("per-tensor loop", {}).get("median_s")
        fe = provs.get("foreach", {}).get("median_s")
        for name, r in provs.items():
            if "median_s" not in r:
                notes.append(f"  - {case} {name}: {r.get('unavailable') or r.get('error')}")
                continue
            t = r["median_s"]
            lines.append(
                [
                    case,
                    name,
                    _fmt(t),
                    str(r["passes"]),
                    f"{r['gbps']:.1f}",
                    f"{loop / t:.2f}x" if loop else "-",
                    f"{fe / t:.2f}x" if fe else "-",
                    f"{100 * r['floor_share']:.0f}%" if "floor_share" in r else "-",
                ]
            )
    text = _table(
        ["parameters", "provider", "step", "passes", "GB/s", "vs loop", "vs foreach", "of floor"], lines
    )
    text += (
        f"\n(passes: reads + writes over all parameters, as counted in saf_kernels/bench/multi_tensor.py; "
        f"'of floor' = {FLOOR_PASSES} passes at the GPU's datasheet bandwidth / time)"
    )
    if notes:
        text += "\n\nNot measured:\n" + "\n".join(notes)
    return text
