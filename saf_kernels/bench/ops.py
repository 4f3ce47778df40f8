"""Fused ops against the eager reference and ``torch.compile`` of it, forward + backward.

Each op family contributes a list of :class:`OpCase` (shape sweep per device) and a set of
providers: every saf_kernels backend available on the device, ``eager`` (``saf_kernels.reference``)
and ``compile`` (``torch.compile`` of the same reference). The pytest-benchmark suites in
``benchmarks/`` use the same cases and providers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F

from .. import reference
from ..ops import trajectory_loss as tl_ops
from .timing import kernel_backends, peak_bandwidth, time_fn

_DT_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@dataclass
class OpCase:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    target_dtype: torch.dtype | None = None
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        dt = _DT_NAME[self.dtype]
        if self.target_dtype is not None and self.target_dtype != self.dtype:
            dt += "/" + _DT_NAME[self.target_dtype]
        return f"{'x'.join(map(str, self.shape))} {dt}"


# --------------------------------------------------------------------------------------------
# Trajectory loss: saf_loss (CE + lam * T^2 KL) and trajectory_kl_loss, forward + backward
# --------------------------------------------------------------------------------------------

# saf_loss_soft: saf_loss with probability targets [B, C] (mixup / cutmix), beside saf_loss with
# class indices; its extra provider "ce+kl[...]" is the two-pass way (F.cross_entropy with
# probability targets, then the fused trajectory_kl_loss), what one had to do before.
TRAJECTORY_OPS = ("saf_loss", "saf_loss_soft", "trajectory_kl_loss")


def soft_targets(B: int, C: int, device: torch.device) -> torch.Tensor:
    """Mixup targets with label smoothing 0.1 folded in: lam * y_a + (1 - lam) * y_b, float32."""
    y = torch.randint(0, C, (B,), device=device)
    hot = torch.full((B, C), 0.1 / C, device=device).scatter_(1, y[:, None], 0.9 + 0.1 / C)
    return 0.7 * hot + 0.3 * hot.roll(1, 0)


def trajectory_cases(device: torch.device, quick: bool) -> list[OpCase]:
    if device.type == "cuda":
        shapes = [((256, 1000), torch.float32, None), ((1024, 32000), torch.float32, None),
                  ((1024, 32000), torch.bfloat16, None), ((1024, 32000), torch.bfloat16, torch.float32),
                  ((4096, 128256), torch.bfloat16, None)]
        if quick:
            shapes = shapes[:3]
    else:
        shapes = [((256, 10), torch.float32, None), ((256, 100), torch.float32, None),
                  ((256, 1000), torch.float32, None), ((1024, 4096), torch.float32, None)]
        if quick:
            shapes = [shapes[2], shapes[3]]
    ops = ("saf_loss", "saf_loss_soft") if quick else TRAJECTORY_OPS
    return [OpCase(op, s, d, td) for op in ops for s, d, td in shapes]


def trajectory_bytes(case: OpCase) -> int:
    """Least traffic of the fused forward + backward: read z and t, write dz (+ labels or
    probability targets (float32), row loss)."""
    B, C = case.shape
    sz = torch.finfo(case.dtype).bits // 8
    st = torch.finfo(case.target_dtype or case.dtype).bits // 8
    labels = {"saf_loss": 8 * B, "saf_loss_soft": 4 * B * C}.get(case.op, 0)
    return B * C * (2 * sz + st) + labels + 4 * B


def trajectory_inputs(case: OpCase, device: torch.device, sets: int = 1):
    B, C = case.shape
    out = []
    for _ in range(sets):
        z = (torch.randn(B, C, device=device) * 2).to(case.dtype).requires_grad_()
        t = (torch.randn(B, C, device=device) * 2).to(case.target_dtype or case.dtype)
        y = soft_targets(B, C, device) if case.op == "saf_loss_soft" else torch.randint(0, C, (B,), device=device)
        out.append((z, y, t))
    return out


def _trajectory_call(op: str, backend: str | None, fn=None):
    def call(z, y, t):
        if fn is not None:
            return fn(z, y, t)
        if op in ("saf_loss", "saf_loss_soft"):
            return tl_ops.saf_loss(z, y, t, 0.3, 5.0, backend=backend)
        return tl_ops.trajectory_kl_loss(z, t, 5.0, backend=backend)

    return call


def _split_soft_call(backend: str):
    """The two-pass way to CE on probability targets + the trajectory term: F.cross_entropy,
    then the fused KL-only kernel (two reads of the logits, two gradients summed by autograd)."""
    return lambda z, y, t: F.cross_entropy(z, y) + 0.3 * tl_ops.trajectory_kl_loss(z, t, 5.0, backend=backend)


def _reference_fn(op: str):
    if op in ("saf_loss", "saf_loss_soft"):
        return lambda z, y, t: reference.saf_loss(z, y, t, 0.3, 5.0)
    return lambda z, y, t: reference.trajectory_kl_loss(z, t, 5.0)


def trajectory_providers(
    case: OpCase, device: torch.device, compile_baseline: bool = True
) -> dict[str, Callable | str]:
    """Provider name -> ``call(z, y, t) -> loss``, or a string saying why it is unavailable."""
    providers: dict[str, Callable | str] = {}
    for b, why in kernel_backends(device, "trajectory_loss"):
        providers[f"saf_kernels[{b}]"] = why if why else _trajectory_call(case.op, b)
        if case.op == "saf_loss_soft":
            providers[f"ce+kl[{b}]"] = why if why else _split_soft_call(b)
    providers["eager"] = _trajectory_call(case.op, None, _reference_fn(case.op))
    if compile_baseline:
        providers["compile"] = _trajectory_call(case.op, None, torch.compile(_reference_fn(case.op), dynamic=False))
    else:
        providers["compile"] = "left out (--no-compile)"
    return providers


def fwd_bwd_step(call: Callable, inputs: list) -> Callable[[int], None]:
    """``step(i)``: forward and backward on input set ``i % len(inputs)``."""

    def step(i: int) -> None:
        z, y, t = inputs[i % len(inputs)]
        z.grad = None
        call(z, y, t).backward()

    return step


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

FAMILIES = {
    "trajectory_loss": (trajectory_cases, trajectory_providers, trajectory_inputs, trajectory_bytes, fwd_bwd_step),
}
OP_NAMES = {op: "trajectory_loss" for op in TRAJECTORY_OPS}

# ---- multi-tensor family: SAM first_step + second_step on ResNet-18/50 and ViT-B parameter lists
# (cases, providers, byte counts and table: saf_kernels/bench/multi_tensor.py) ----
MULTI_TENSOR_OPS = ("sam_step",)
OP_NAMES.update({op: "multi_tensor" for op in MULTI_TENSOR_OPS})
# ---- end multi-tensor family ----
# Host time of the Triton pointer tables (saf_kernels/bench/host_overhead.py).
OP_NAMES["triton_tables"] = "host_overhead"
OP_NAMES["fused_linear"] = "fused_linear"  # saf_kernels/bench/fused_linear.py, a process per variant


def run_op_benchmarks(device: torch.device, quick: bool, ops: list[str] | None, progress,
                      compile_baseline: bool = True) -> list[dict]:
    """One result row per (case, provider); unavailable providers are listed with the reason."""
    rows = []
    budget = 0.5 if quick else 2.0
    plan = []
    for family, (cases_fn, prov_fn, inputs_fn, bytes_fn, step_fn) in FAMILIES.items():
        for case in cases_fn(device, quick):
            if ops and case.op not in ops:
                continue
            plan.append((family, case, prov_fn, inputs_fn, bytes_fn, step_fn))
    peak = peak_bandwidth(device)
    planned = [(p, p[2](p[1], device, compile_baseline)) for p in plan]
    progress.add(sum(len(provs) for _, provs in planned))
    for (family, case, _, inputs_fn, bytes_fn, step_fn), providers in planned:
        nbytes = bytes_fn(case)
        # Rotate through enough input sets to overflow the last-level cache where that is cheap.
        sets = max(1, min(4, (256 << 20) // max(nbytes, 1)))
        inputs = inputs_fn(case, device, sets)
        for name, call in providers.items():
            progress(f"{case.op} {case.label} {name}")
            row = {"kind": "op", "op": case.op, "family": family, "case": case.label, "shape": list(case.shape),
                   "dtype": _DT_NAME[case.dtype], "provider": name, "bytes": nbytes}
            if isinstance(call, str):
                row["unavailable"] = call
            else:
                try:
                    t = time_fn(step_fn(call, inputs), device, budget_s=budget, min_time_s=0.01 if quick else 0.05)
                    row.update(t.as_dict())
                    row["gbps"] = nbytes / t.median_s / 1e9
                    if peak:
                        row["floor_share"] = nbytes / peak / t.median_s
                except Exception as e:  # noqa: BLE001  (a provider failing is a result, not a crash)
                    row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
    # ---- multi-tensor family ----
    if ops is None or any(op in MULTI_TENSOR_OPS for op in ops):
        from . import multi_tensor

        rows += multi_tensor.run(device, quick, progress)
    # ---- end multi-tensor family ----
    return rows


# --------------------------------------------------------------------------------------------
# SAF trajectory bank: the fused step (gather + loss + gradient + record in one kernel) against
# the unfused sequence on the same device (indexing gather, cross-entropy + KL, backward,
# index_put_ scatter), eager and compiled. Each provider owns a bank pre-filled so that every
# sample has its entry from `delay` epochs ago; ids walk through the bank, one epoch per pass.
# --------------------------------------------------------------------------------------------

BANK_OPS = ("saf_bank_step", "saf_bank_step_soft")  # _soft: probability targets [B, C] (mixup)
BANK_DELAY, BANK_LAM, BANK_T = 3, 0.3, 5.0


def bank_cases(device: torch.device, quick: bool) -> list[OpCase]:
    """Shapes (B, C, N): batch, classes, samples in the bank."""
    if device.type == "cuda":
        shapes = [((128, 100, 50_000), torch.float32, torch.bfloat16),     # CIFAR-100
                  ((256, 1000, 200_000), torch.float32, torch.bfloat16),   # ImageNet-style rows
                  ((256, 1000, 200_000), torch.bfloat16, torch.float32),
                  ((1024, 1000, 200_000), torch.float32, torch.bfloat16)]
        if quick:
            shapes = shapes[:2]
    else:
        shapes = [((128, 10, 60_000), torch.float32, torch.bfloat16),      # MNIST
                  ((128, 100, 50_000), torch.float32, torch.bfloat16),     # CIFAR-100
                  ((256, 1000, 10_000), torch.float32, torch.bfloat16)]
        if quick:
            shapes = shapes[1:]
    # Probability targets beside class indices on the CIFAR-100 shape (and ImageNet rows on a GPU).
    soft = [s for s in shapes if s[0][1] in ((100, 1000) if device.type == "cuda" else (100,))][:2]
    return [OpCase("saf_bank_step", s, d, td) for s, d, td in shapes] + \
        [OpCase("saf_bank_step_soft", s, d, td) for s, d, td in soft]


def bank_bytes(case: OpCase) -> int:
    """Least traffic of the fused step: read z and the past rows, write dz and the new rows, plus
    ids, labels, tags (read and write) and the row losses."""
    B, C, _ = case.shape
    sz = torch.finfo(case.dtype).bits // 8
    sb = torch.finfo(case.target_dtype).bits // 8
    targets = 4 * B * C if case.op == "saf_bank_step_soft" else 8 * B
    return B * C * (2 * sz + 2 * sb) + targets + B * (8 + 4 + 4 + 4)


@dataclass
class BankInputs:
    logits: list
    labels: list
    ids: torch.Tensor  # [steps per pass, B]


def bank_inputs(case: OpCase, device: torch.device, sets: int = 1) -> list[BankInputs]:
    B, C, N = case.shape
    z = [(torch.randn(B, C, device=device) * 2).to(case.dtype).requires_grad_() for _ in range(sets)]
    if case.op == "saf_bank_step_soft":
        y = [soft_targets(B, C, device) for _ in range(sets)]
    else:
        y = [torch.randint(0, C, (B,), device=device) for _ in range(sets)]
    ids = torch.randperm(N, device=device)[: (N // B) * B].view(N // B, B)
    return [BankInputs(z, y, ids)]


def _prefilled(case: OpCase, device: torch.device):
    B, C, N = case.shape
    S = BANK_DELAY
    values = torch.randn(N, S, C, device=device).to(case.target_dtype)
    epochs = torch.empty(N, S, dtype=torch.int32, device=device)
    for e in range(S):  # epochs 0 .. S-1 recorded; timing starts at epoch S
        epochs[:, e % S] = e
    return values, epochs


def unfused_bank_step(z, y, ids, values, epochs, epoch_t, slot: int, delay: int, lam: float, T: float):
    """The bank step as separate PyTorch ops on the device: gather, CE + KL over rows with a past
    entry, (backward by the caller), scatter of the logits and tags.

    torch.compile of this function copies the whole bank back every step (the mutated input is
    functionalized; its time grows with N: 47 ms for a 240 MB bank on this CPU, 2.8 ms for 12 MB),
    which is what compiling this sequence gives a user. The fused op, a custom op that declares
    its mutations, does not: compiled it stays at its eager cost."""
    past = values[ids, slot].float()
    has = epochs[ids, slot] == epoch_t - delay
    zf = z.float()
    log_q = F.log_softmax(zf / T, dim=-1)
    log_p = F.log_softmax(past / T, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) * (T * T)
    kl = torch.where(has, kl, torch.zeros((), device=z.device)).sum() / has.sum().clamp(min=1)
    loss = F.cross_entropy(zf, y) + lam * kl
    with torch.no_grad():
        values[ids, slot] = z.detach().to(values.dtype)
        epochs[ids, slot] = epoch_t.to(torch.int32)
    return loss


def bank_providers(case: OpCase, device: torch.device, compile_baseline: bool = True) -> dict[str, Callable | str]:
    """Provider name -> ``call(inputs, i)`` doing step i forward + backward, or why it is unavailable."""
    from ..saf import TrajectoryBank

    B, C, N = case.shape
    providers: dict[str, Callable | str] = {}
    for b, why in kernel_backends(device, "saf_bank_step"):
        if why:
            providers[f"saf_kernels[{b}]"] = why
            continue
        bank = TrajectoryBank(N, C, BANK_DELAY, case.target_dtype, device=device, process_group=None, backend=b)
        bank.values, bank.epochs = _prefilled(case, device)

        def fused(inp: BankInputs, i: int, bank=bank) -> None:
            steps = inp.ids.shape[0]
            z = inp.logits[i % len(inp.logits)]
            z.grad = None
            loss = bank.step(z, inp.labels[i % len(inp.labels)], inp.ids[i % steps], BANK_DELAY + i // steps,
                             BANK_LAM, BANK_T)
            loss.backward()

        providers[f"saf_kernels[{b}]"] = fused

    def unfused_provider(fn):
        values, epochs = _prefilled(case, device)

        def call(inp: BankInputs, i: int) -> None:
            steps = inp.ids.shape[0]
            epoch = BANK_DELAY + i // steps
            z = inp.logits[i % len(inp.logits)]
            z.grad = None
            epoch_t = torch.tensor(epoch, device=device)
            fn(z, inp.labels[i % len(inp.labels)], inp.ids[i % steps], values, epochs, epoch_t, epoch % BANK_DELAY,
               BANK_DELAY, BANK_LAM, BANK_T).backward()

        return call

    providers["eager"] = unfused_provider(unfused_bank_step)
    if compile_baseline:
        providers["compile"] = unfused_provider(torch.compile(unfused_bank_step, dynamic=False))
    else:
        providers["compile"] = "left out (--no-compile)"
    return providers


def bank_step_fn(call: Callable, inputs: list) -> Callable[[int], None]:
    return lambda i: call(inputs[0], i)


FAMILIES["trajectory_bank"] = (bank_cases, bank_providers, bank_inputs, bank_bytes, bank_step_fn)
OP_NAMES.update({op: "trajectory_bank" for op in BANK_OPS})
