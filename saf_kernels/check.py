"""``python -m saf_kernels.check``: is this installation sound on this machine and device?

Run it after installing. It prints

1. what was built and what runs it: saf_kernels, torch, Triton, Python and CUDA versions, the
   CPU instruction sets the kernels were compiled for and the one chosen here, the CUDA
   architectures compiled and the kernel image the GPU loaded;
2. which backend can run each op on each checked device, and why not where one cannot;
3. one row per (op, backend): the op on small random inputs against the plain-PyTorch reference
   evaluated in float64 on the CPU, with the largest error relative to the reference's largest
   value and the tolerance; on CUDA also a SAM training step captured in a CUDA graph and
   replayed (with more plans made between capture and replay than the plan cache holds),
   against the same steps run eagerly.

A row is ``pass``, ``FAIL`` or ``skip`` (with the reason); the exit status is 1 if any row
failed (or a backend named by ``--require`` is missing), else 0. ``--json PATH`` writes every
row and the build facts. On a CPU-only machine it checks the C++ CPU kernels and the reference;
``--triton`` adds the Triton kernels under the interpreter (``TRITON_INTERPRET=1``, slow: about a
minute). On a GPU the whole check takes seconds once Triton's cache is warm (its first run
compiles the Triton kernels).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import sys
import time
import traceback
import zlib
from dataclasses import asdict, dataclass, field

# Triton decides at definition whether a function is interpreted, and its own library functions
# (reductions' combine functions, ...) are defined when torch first imports triton, before this
# module runs: --triton without TRITON_INTERPRET=1 in the environment restarts the process with it.
if __name__ == "__main__" and "--triton" in sys.argv and os.environ.get("TRITON_INTERPRET") != "1":
    os.execve(sys.executable, [sys.executable, "-m", "saf_kernels.check", *sys.argv[1:]],
              {**os.environ, "TRITON_INTERPRET": "1"})

import torch  # noqa: E402

from . import _backend  # noqa: E402
from . import ops as O  # noqa: E402

KERNEL_BACKENDS = ("cuda", "triton", "cpu", "torch")
# Tolerance of float32 results against the float64 reference: this times the reference's largest
# value (see compare()).
RTOL_F32 = 2e-5


@dataclass
class Row:
    section: str
    name: str
    backend: str
    device: str
    status: str  # pass | FAIL | skip
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    build: dict = field(default_factory=dict)
    availability: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(r.status == "FAIL" for r in self.rows)


# ---------------------------------------------------------------------------------------------
# Build facts
# ---------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _key_values(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def build_facts() -> dict:
    """What was built and what runs it (versions, instruction sets, CUDA architectures)."""
    from . import __version__

    facts = {
        "saf_kernels": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "triton_interpreter": _backend.triton_interpreted(),
        "extension": _backend.HAS_EXT,
    }
    if not _backend.HAS_EXT:
        facts["extension_error"] = str(_backend.EXT_ERROR)
    ns = torch.ops.saf_kernels
    if _backend.HAS_EXT and hasattr(ns, "_build_info"):
        facts.update(_key_values(ns._build_info()))
    if _backend.HAS_EXT and hasattr(ns, "_cuda_build_info"):
        facts.update(_key_values(ns._cuda_build_info()))
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(i)
        facts["gpu"] = torch.cuda.get_device_name(i)
        facts["gpu_capability"] = f"{cap[0]}.{cap[1]}"
        if hasattr(ns, "_cuda_kernel_versions"):
            try:
                binary, ptx = ns._cuda_kernel_versions(i)
                facts["cuda_kernel_image"] = f"sm_{binary} (PTX {ptx})"
            except RuntimeError as e:  # no kernel image for this GPU: the op rows will fail too
                facts["cuda_kernel_image"] = f"none loaded: {str(e).splitlines()[0]}"
    return facts


def plan_cache_stats() -> dict | None:
    """The CUDA plan cache's counters (csrc/mt_plan_cache.h), or None without CUDA kernels."""
    ns = torch.ops.saf_kernels
    if not (_backend.HAS_EXT and hasattr(ns, "_plan_cache_stats")):
        return None
    names = ("hits", "misses", "evictions", "stream_waits", "capture_hits", "capture_uploads", "entries", "permanent")
    return dict(zip(names, ns._plan_cache_stats()))


# ---------------------------------------------------------------------------------------------
# The op checks: each builds small random inputs from its Ctx, runs the public op with the
# Ctx's backend and returns its results by name. It runs twice: on the checked device and
# backend in float32, and as the oracle (backend "torch", float64, CPU) on the same values.
# ---------------------------------------------------------------------------------------------

# Tensor lists with a 0-dim-like single element, odd sizes and a 3-D tensor.
SHAPES = [(7, 5), (13,), (3, 4, 5), (1,)]


class Ctx:
    """One side of a comparison: device, dtype, backend and the random inputs, which are the
    same values on both sides (drawn in float32 from a generator seeded by the check's name)."""

    def __init__(self, name: str, device: str, dtype: torch.dtype, backend: str):
        self.device, self.dtype, self.backend = torch.device(device), dtype, backend
        self.g = torch.Generator().manual_seed(zlib.crc32(name.encode()))

    def randn(self, shape, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=self.g) * scale).to(self.device, self.dtype)

    def list(self, shapes=SHAPES, scale: float = 1.0) -> list[torch.Tensor]:
        return [self.randn(s, scale) for s in shapes]

    def randint(self, high: int, shape) -> torch.Tensor:
        return torch.randint(high, shape, generator=self.g).to(self.device)

    def perm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.g).to(self.device)


def _clone(ts):
    return [t.clone() for t in ts]


@dataclass
class Step:
    """What an in-place op changed (``after - before`` per tensor). It is compared as a change
    (a wrong small step must not hide under the weights' magnitude), within the tolerance of the
    change plus the rounding of ``after`` (float32: two units in the last place)."""

    after: list
    before: list


def _step(after, before) -> Step:
    return Step(_clone(after), _clone(before))


def _loss_and_grad(loss, z, prefix: str = "") -> dict:
    (loss * 1.7).backward()  # grad_output != 1
    return {prefix + "loss": loss.detach(), prefix + "grad": z.grad}


def _trajectory_kl_loss(c: Ctx) -> dict:
    z = c.randn((6, 37), 3.0).requires_grad_()
    loss = O.trajectory_kl_loss(z, c.randn((6, 37), 3.0), temperature=2.0, backend=c.backend)
    return _loss_and_grad(loss, z)


def _saf_loss(c: Ctx) -> dict:
    z = c.randn((6, 37), 3.0).requires_grad_()
    t = c.randn((6, 37), 3.0)
    y = c.randint(37, (6,))
    y[2] = -100
    loss = O.saf_loss(z, y, t, lam=0.3, temperature=2.0, label_smoothing=0.1, backend=c.backend)
    return _loss_and_grad(loss, z)


def _fused_linear(c: Ctx) -> dict:
    # Chunks of 8 rows over 37 (a short last chunk), V = 101, the MESA form (teacher hidden + head).
    h, w = c.randn((37, 16), 1.0).requires_grad_(), c.randn((101, 16), 0.5).requires_grad_()
    y = c.randint(101, (37,))
    loss = O.fused_linear_trajectory_loss(h, w, y, c.randn((37, 12), 1.0), c.randn((101, 12), 0.5), lam=0.8,
                                          temperature=2.0, label_smoothing=0.1, chunk_size=8, backend=c.backend)
    g_h, g_w = torch.autograd.grad(loss, (h, w))
    return {"loss": loss, "grad_hidden": g_h, "grad_weight": g_w}


def _bank_step(c: Ctx) -> dict:
    from .saf import TrajectoryBank

    N, C, B = 16, 37, 6
    bank = TrajectoryBank(N, C, delay=1, dtype=torch.float32, device=c.device, backend=c.backend)
    ids = c.perm(N)[:B]
    out = {}
    for epoch in (0, 1):  # the second epoch finds the first one's logits
        z = c.randn((B, C), 3.0).requires_grad_()
        loss = bank.step(z, c.randint(C, (B,)), ids, epoch, lam=0.3, temperature=2.0)
        out.update(_loss_and_grad(loss, z, f"epoch{epoch}."))
    out.update(values=bank.values, epochs=bank.epochs)
    return out


def _bank_record(c: Ctx) -> dict:
    from .saf import TrajectoryBank

    bank = TrajectoryBank(16, 37, delay=2, dtype=torch.float32, device=c.device, backend=c.backend)
    bank.record(c.randn((6, 37), 3.0).float(), c.perm(16)[:6], 3)
    return {"values": bank.values, "epochs": bank.epochs}


def _sam_perturb(c: Ctx) -> dict:
    p, g = c.list(), c.list()
    before, stash = _clone(p), [torch.empty_like(x) for x in p]
    norm = O.sam_perturb_(p, g, stash, rho=0.05, adaptive=[False, True, False, True], eta=0.01, backend=c.backend)
    return {"norm": norm, "step": _step(p, before), "stash": stash}


def _partial_sums(c: Ctx) -> dict:
    # The partial-sum stages that sharded training all-reduces before each op's finalize.
    p, g, old, stash = c.list(), c.list(), c.list(), c.list()
    ad = dict(adaptive=[True, False, True, False], eta=0.01)
    return {"sam_sumsq": O.sam_sumsq(p, g, **ad, backend=c.backend),
            "esam_sumsq": O.esam_sumsq(p, g, 0.5, 1234, 8, **ad, backend=c.backend),
            "rsam_sumsq": O.rsam_sumsq(p, g, stash, 2.0, backend=c.backend),
            "gsam_sums": O.gsam_sums(g, old, backend=c.backend)}


def _sam_restore(c: Ctx) -> dict:
    p, delta = c.list(), c.list(scale=0.01)
    O.sam_restore_(p, delta, stash_mode="delta", backend=c.backend)
    return {"params": p}


def _sam_restore_sgd(c: Ctx) -> dict:
    p, g, s, buf = c.list(), c.list(), c.list(), c.list(scale=0.1)
    O.sam_restore_sgd_(p, g, s, buf, lr=0.1, weight_decay=5e-4, momentum=0.9, nesterov=True, backend=c.backend)
    return {"step": _step(p, s), "momentum_buffers": buf}


def _sam_restore_adamw(c: Ctx) -> dict:
    p, g, s, m = c.list(), c.list(), c.list(), c.list(scale=0.1)
    v = [x.abs() for x in c.list(scale=0.01)]
    steps = [torch.tensor(3.0, device=c.device) for _ in p]  # float32 whatever the params
    O.sam_restore_adamw_(p, g, s, m, v, steps, lr=1e-3, weight_decay=0.01, backend=c.backend)
    return {"step": _step(p, s), "exp_avg": m, "exp_avg_sq": v, "steps": steps}


def _ema(c: Ctx) -> dict:
    e, m = c.list(), c.list()
    before = _clone(e)
    O.ema_update_(e, m, 0.9, backend=c.backend)
    return {"step": _step(e, before)}


def _philox(c: Ctx) -> dict:
    out = {}
    for kind, dtype in (("words", torch.int64), ("uniform", c.dtype), ("normal", c.dtype)):
        t = torch.empty(1031, dtype=dtype, device=c.device)
        O.philox_(t, seed=2**40 + 7, offset=5, kind=kind, backend=c.backend)
        out[kind] = t
    return out


def _esam(c: Ctx) -> dict:
    p, g = c.list(), c.list()
    before, stash = _clone(p), [torch.empty_like(x) for x in p]
    kw = dict(beta=0.5, seed=1234, offset=8, stash_mode="delta", backend=c.backend)
    norm = O.esam_perturb_(p, g, stash, rho=0.05, **kw)
    step = _step(p, before)
    O.esam_restore_(p, stash, **kw)  # regenerates the mask
    return {"norm": norm, "step": step, "restored": _step(p, before)}


def _rsam(c: Ctx) -> dict:
    shapes = [(3, 2100), (5, 7), (13,)]  # units of 2100 elements take the CUDA kernel's whole-block path
    p = c.list(shapes)
    stash = [torch.empty_like(x) for x in p]
    O.rsam_noise_(p, stash, std=[1e-3, 2e-3, 5e-4], seed=99, offset=4, backend=c.backend)
    noise = _step(p, stash)
    norm = O.rsam_perturb_(p, c.list(shapes), stash, rho=0.05, lam=2.0, backend=c.backend)
    return {"noise": noise, "norm": norm, "step": _step(p, stash)}


def _gsam_combine(c: Ctx) -> dict:
    p, g, old, s = c.list(), c.list(), c.list(), c.list()
    stats = O.gsam_combine_(p, g, old, s, alpha=0.4, backend=c.backend)
    return {"stats": stats, "grads": g, "params": p}


def _gsam_restore_sgd(c: Ctx) -> dict:
    p, g, old, s, buf = c.list(), c.list(), c.list(), c.list(), c.list(scale=0.1)
    stats = O.gsam_restore_sgd_(p, g, old, s, buf, lr=0.1, alpha=0.4, momentum=0.9, weight_decay=5e-4,
                                backend=c.backend)
    return {"stats": stats, "step": _step(p, s), "momentum_buffers": buf}


def _looksam(c: Ctx) -> dict:
    gs, g, gv = c.list(), c.list(), c.list()
    gv_norm = torch.zeros((), device=c.device, dtype=torch.float64 if c.dtype == torch.float64 else torch.float32)
    stats = O.looksam_gv_(gv, gv_norm, gs, g, backend=c.backend)
    new = c.list()
    before = _clone(new)
    norm = O.looksam_combine_(new, gv, gv_norm, alpha=0.7, backend=c.backend)
    return {"stats": stats, "gv": gv, "gv_norm": gv_norm, "norm": norm, "step": _step(new, before)}


def _msam_sgd(c: Ctx) -> dict:
    p, g, buf = c.list(), c.list(), c.list(scale=0.1)
    before, inv = _clone(p), torch.full((), 2.0, device=c.device)
    norm = O.msam_sgd_(p, g, buf, inv, lr=0.1, weight_decay=5e-4, momentum=0.9, rho_prev=0.05, rho=0.05,
                       backend=c.backend)
    return {"norm": norm, "step": _step(p, before), "momentum_buffers": buf, "inv_norm": inv}


def _msam_adamw(c: Ctx) -> dict:
    p, g, m = c.list(), c.list(), c.list(scale=0.1)
    v = [x.abs() for x in c.list(scale=0.01)]
    before, inv = _clone(p), torch.full((), 2.0, device=c.device)
    steps = [torch.tensor(3.0, device=c.device) for _ in p]  # float32 whatever the params
    norm = O.msam_adamw_(p, g, m, v, steps, inv, lr=1e-3, weight_decay=0.01, rho_prev=0.05, rho=0.05,
                         backend=c.backend)
    return {"norm": norm, "step": _step(p, before), "exp_avg": m, "exp_avg_sq": v, "inv_norm": inv}


# name -> (the dispatcher ops it runs, the check)
CHECKS = {
    "trajectory_kl_loss": (("trajectory_loss",), _trajectory_kl_loss),
    "saf_loss": (("trajectory_loss",), _saf_loss),
    "fused_linear": (("trajectory_loss",), _fused_linear),
    "trajectory_bank_step": (("saf_bank_step",), _bank_step),
    "trajectory_bank_record": (("saf_bank_record",), _bank_record),
    "sam_perturb_": (("sam_perturb_",), _sam_perturb),
    "partial_sums": (("sam_sumsq", "esam_sumsq", "rsam_sumsq", "gsam_sums"), _partial_sums),
    "sam_restore_": (("sam_restore_",), _sam_restore),
    "sam_restore_sgd_": (("sam_restore_sgd_",), _sam_restore_sgd),
    "sam_restore_adamw_": (("sam_restore_adamw_",), _sam_restore_adamw),
    "ema_update_": (("ema_update_",), _ema),
    "philox_": (("philox_",), _philox),
    "esam_perturb_+restore_": (("esam_perturb_", "esam_restore_"), _esam),
    "rsam_noise_+perturb_": (("rsam_noise_", "rsam_perturb_"), _rsam),
    "gsam_combine_": (("gsam_combine_",), _gsam_combine),
    "gsam_restore_sgd_": (("gsam_restore_sgd_",), _gsam_restore_sgd),
    "looksam_gv_+combine_": (("looksam_gv_", "looksam_combine_"), _looksam),
    "msam_sgd_": (("msam_sgd_",), _msam_sgd),
    "msam_adamw_": (("msam_adamw_",), _msam_adamw),
}


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


ULP_F32 = 2.0**-23


def _pairs(key, got, want):
    """(name, got, want, rounding scale or None) for each tensor of an output."""
    if isinstance(want, Step):
        if not isinstance(got, Step) or len(got.after) != len(want.after):
            raise ValueError(f"{key}: not the same list of tensors")
        for i, (ga, gb, wa, wb) in enumerate(zip(got.after, got.before, want.after, want.before)):
            ga, gb, wa, wb = (t.detach().cpu().double() for t in (ga, gb, wa, wb))
            yield f"{key}[{i}]", ga - gb, wa - wb, torch.maximum(wa.abs(), wb.abs())
        return
    gl, wl = _as_list(got), _as_list(want)
    if len(gl) != len(wl):
        raise ValueError(f"{key}: {len(gl)} tensors, expected {len(wl)}")
    for i, (a, b) in enumerate(zip(gl, wl)):
        yield (key if len(wl) == 1 else f"{key}[{i}]"), a.detach().cpu(), b.detach().cpu(), None


def compare(got: dict, want: dict, rtol: float = RTOL_F32) -> tuple[float, str]:
    """Largest error of ``got`` against ``want`` as a multiple of the tolerance (<= 1 passes), and
    where. Floating tensors: ``rtol`` times the reference's largest finite value (for a
    :class:`Step`, of the change, plus two float32 ulps of the result); NaN and inf must sit at
    the same places. Integer tensors must be equal."""
    worst, where = 0.0, ""
    for key, w_val in want.items():
        try:
            pairs = list(_pairs(key, got[key], w_val))
        except ValueError as e:
            return float("inf"), str(e)
        for name, a, b, rounding in pairs:
            if a.shape != b.shape:
                return float("inf"), f"{name}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
            if not b.is_floating_point():
                ratio = 0.0 if torch.equal(a.to(b.dtype), b) else float("inf")
            else:
                a64, b64 = a.double(), b.double()
                fin = torch.isfinite(b64)
                special = ~fin & ~b64.isnan()
                if not torch.equal(a64.isnan(), b64.isnan()) or not torch.equal(a64[special], b64[special]):
                    ratio = float("inf")
                elif not fin.any():
                    ratio = 0.0
                else:
                    tol = rtol * b64[fin].abs().max()
                    if rounding is not None:
                        tol = tol + 2 * ULP_F32 * rounding[fin]
                    tol = torch.clamp(tol, min=torch.finfo(torch.float32).tiny)
                    ratio = float(((a64 - b64)[fin].abs() / tol).max())
            if ratio > worst or not where:
                worst, where = ratio, name
    return worst, where


def check_op(name: str, device: str, backend: str) -> Row:
    """One row: op `name` with `backend` on `device` against the float64 reference."""
    cpp_ops, fn = CHECKS[name]
    dev = torch.device(device)
    for op in cpp_ops:
        why = _backend.missing(backend, dev, op)
        if why is not None:
            return Row("op", name, backend, device, "skip", why)
    t0 = time.perf_counter()
    try:
        want = fn(Ctx(name, "cpu", torch.float64, "torch"))
        got = fn(Ctx(name, device, torch.float32, backend))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        err, where = compare(got, want)
    except Exception as e:  # noqa: BLE001  (a row reports its failure; the others still run)
        return Row("op", name, backend, device, "FAIL", _error(e), time.perf_counter() - t0)
    ok = err <= 1.0
    detail = f"max error {err:.2g} x tolerance" + ("" if ok else f" at {where}")
    return Row("op", name, backend, device, "pass" if ok else "FAIL", detail, time.perf_counter() - t0)


def _error(e: BaseException) -> str:
    last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" ({os.path.basename(last.filename)}:{last.lineno})" if last else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{at}"


# ---------------------------------------------------------------------------------------------
# CUDA graphs: a SAM training step captured and replayed
# ---------------------------------------------------------------------------------------------

GRAPH_REPLAYS = 3
# More distinct plans between capture and replay than the CUDA plan cache keeps (32): a graph
# must not depend on an entry that can be evicted.
FORCED_MISSES = 40


def check_sam_graph(device: str, backend: str) -> Row:
    """SAM (SGD base, fused restore + step) captured in a CUDA graph, replayed after forced plan
    cache misses, against the same steps run eagerly on a copy."""
    name = "SAM step in a CUDA graph"
    dev = torch.device(device)
    if dev.type != "cuda":
        return Row("graph", name, backend, device, "skip", "CUDA graphs need a CUDA device")
    for op in ("sam_perturb_", "sam_restore_sgd_"):
        why = _backend.missing(backend, dev, op)
        if why is not None:
            return Row("graph", name, backend, device, "skip", why)
    t0 = time.perf_counter()
    try:
        detail = _sam_graph(dev, backend)
    except Exception as e:  # noqa: BLE001
        return Row("graph", name, backend, device, "FAIL", _error(e), time.perf_counter() - t0)
    status = "pass" if detail.startswith("replays match") else "FAIL"
    return Row("graph", name, backend, device, status, detail, time.perf_counter() - t0)


def _sam_graph(dev: torch.device, backend: str) -> str:
    import torch.nn.functional as F

    from .optim import SAM

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model = model.to(dev)
    x = torch.randn(64, 32, generator=g).to(dev)
    y = torch.randint(10, (64,), generator=g).to(dev)

    def make_step(m, opt):
        def step():
            F.cross_entropy(m(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(m(x), y).backward()
            opt.second_step(zero_grad=True)

        return step

    kw = dict(rho=0.05, lr=0.1, momentum=0.9, weight_decay=5e-4, fused_step=True, backend=backend)
    opt = SAM(model.parameters(), torch.optim.SGD, **kw)
    step = make_step(model, opt)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph asks
        for _ in range(3):
            step()
    torch.cuda.current_stream(dev).wait_stream(side)
    eager_model = copy.deepcopy(model)
    eager_opt = SAM(eager_model.parameters(), torch.optim.SGD, **kw)
    eager_opt.load_state_dict(opt.state_dict())
    eager_step = make_step(eager_model, eager_opt)
    before = [p.detach().clone() for p in model.parameters()]

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    junk = [torch.randn(100, device=dev) for _ in range(3)]
    junk_g, junk_s = [torch.randn_like(t) for t in junk], [torch.empty_like(t) for t in junk]
    for i in range(FORCED_MISSES):
        O.sam_perturb_(junk, junk_g, junk_s, rho=1e-3 * (i + 1), backend=backend)
    for _ in range(GRAPH_REPLAYS):
        graph.replay()
        eager_step()
    torch.cuda.synchronize(dev)
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
    if moved == 0.0:
        return "the replays did not change the weights"
    err, where = compare(dict(enumerate(model.parameters())), dict(enumerate(eager_model.parameters())))
    if not err <= 1.0:
        return f"replays differ from eager steps: max error {err:.2g} x tolerance at parameter {where}"
    return (f"replays match {GRAPH_REPLAYS} eager steps (max error {err:.2g} x tolerance; {FORCED_MISSES} plans "
            "made in between)")


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def availability(devices, names) -> dict:
    """{device: {check: {backend: None (available) or why not}}}."""
    out = {}
    for d in devices:
        dev = torch.device(d)
        out[d] = {}
        for n in names:
            out[d][n] = {b: next((w for op in CHECKS[n][0] if (w := _backend.missing(b, dev, op))), None)
                         for b in KERNEL_BACKENDS}
    return out


def run(devices, backends=KERNEL_BACKENDS, names=None, graphs: bool = True) -> Report:
    names = list(names or CHECKS)
    report = Report(build=build_facts(), availability=availability(devices, names))
    for d in devices:
        for n in names:
            for b in backends:
                report.rows.append(check_op(n, d, b))
        if graphs and torch.device(d).type == "cuda":
            for b in ("cuda", "triton"):
                if b in backends:
                    report.rows.append(check_sam_graph(d, b))
    stats = plan_cache_stats()
    if stats is not None:
        report.build["plan_cache"] = stats
    return report


def _print_build(facts: dict, out) -> None:
    w = out.write
    w("saf_kernels self-check\n")
    w(f"  saf_kernels {facts['saf_kernels']} | torch {facts['torch']}"
      f" ({'CUDA ' + facts['torch_cuda'] if facts['torch_cuda'] else 'CPU build'})"
      f" | Triton {facts['triton'] or 'not installed'}"
      f"{' (interpreter)' if facts['triton_interpreter'] else ''} | Python {facts['python']}\n")
    if not facts["extension"]:
        w(f"  extension saf_kernels._C: NOT AVAILABLE ({facts.get('extension_error')})\n")
    else:
        w(f"  extension saf_kernels._C: built for torch {facts.get('torch_built', '?')}; CPU kernels for "
          f"{facts.get('cpu_isas', '?')} ({facts.get('cpu_isa_selected', '?')} chosen here); ")
        if facts.get("cuda_built") == "1":
            w(f"CUDA kernels for {facts.get('cuda_archs', '?')} (CUDA {facts.get('cuda_runtime_built', '?')})\n")
        else:
            w("no CUDA kernels (a CPU build)\n")
    if "gpu" in facts:
        w(f"  GPU: {facts['gpu']} (compute capability {facts['gpu_capability']})"
          f"{'; CUDA kernels run as ' + facts['cuda_kernel_image'] if 'cuda_kernel_image' in facts else ''}\n")


def _print_availability(avail: dict, out) -> None:
    for d, per_check in avail.items():
        out.write(f"\nbackends on {d}:\n")
        reasons: dict[str, set] = {}
        for per_backend in per_check.values():
            for b, why in per_backend.items():
                if why is not None:
                    reasons.setdefault(b, set()).add(why)
        for b in KERNEL_BACKENDS:
            if b not in reasons:
                out.write(f"  {b:<7} available for every op\n")
            else:
                n = sum(1 for pb in per_check.values() if pb[b] is not None)
                out.write(f"  {b:<7} unavailable for {n} of {len(per_check)} ops: {'; '.join(sorted(reasons[b]))}\n")


def _print_rows(rows, out) -> None:
    out.write(f"\n{'check':<28}{'backend':<9}{'device':<8}{'result':<8}{'time':>8}  detail\n")
    for r in rows:
        out.write(f"{r.name:<28}{r.backend:<9}{r.device:<8}{r.status:<8}{r.seconds:>7.2f}s  {r.detail}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saf_kernels.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", action="append", choices=("cpu", "cuda"),
                    help="device to check (repeatable); default: cuda if available, else cpu")
    ap.add_argument("--backend", action="append", choices=KERNEL_BACKENDS,
                    help="backends to check (repeatable); default: all")
    ap.add_argument("--ops", nargs="+", choices=sorted(CHECKS), help="only these checks")
    ap.add_argument("--triton", action="store_true",
                    help="on CPU, run the Triton kernels under the interpreter (TRITON_INTERPRET=1; slow)")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph capture and replay")
    ap.add_argument("--require", action="append", choices=("cuda", "triton", "cpu"), default=[],
                    help="fail unless this backend runs every op on the checked device")
    ap.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    args = ap.parse_args(argv)

    devices = args.device or ["cuda" if torch.cuda.is_available() else "cpu"]
    if "cuda" in devices and not torch.cuda.is_available():
        print("saf_kernels.check: --device cuda but torch sees no CUDA device "
              f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not in this build'})", file=sys.stderr)
        return 2
    backends = tuple(args.backend or KERNEL_BACKENDS)
    if args.triton and "cuda" in devices and _backend.triton_interpreted():
        print("saf_kernels.check: --triton (the interpreter) cannot be combined with --device cuda", file=sys.stderr)
        return 2
    if not args.triton and not any(torch.device(d).type == "cuda" for d in devices):
        backends = tuple(b for b in backends if b != "triton")  # the interpreter only on request
    t0 = time.perf_counter()
    report = run(devices, backends, args.ops, graphs=not args.no_graphs)
    for d in devices:
        for b in args.require:
            for n, per_backend in report.availability[d].items():
                if per_backend[b] is not None and (args.ops is None or n in args.ops):
                    report.rows.append(Row("require", n, b, d, "FAIL", f"--require {b}: {per_backend[b]}"))
    out = sys.stdout
    _print_build(report.build, out)
    _print_availability(report.availability, out)
    _print_rows(report.rows, out)
    counts = {s: sum(r.status == s for r in report.rows) for s in ("pass", "FAIL", "skip")}
    elapsed = time.perf_counter() - t0
    out.write(f"\n{counts['pass']} passed, {counts['FAIL']} failed, {counts['skip']} skipped in {elapsed:.1f}s: "
              f"{'FAILED' if report.failed else 'OK'}\n")
    if args.json:
        data = {"build": report.build, "availability": report.availability,
                "rows": [asdict(r) for r in report.rows], "seconds": round(elapsed, 3),
                "ok": not report.failed, "argv": list(sys.argv[1:] if argv is None else argv)}
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1, default=str)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
