"""Small models and data for the ESAM / R-SAM / GSAM optimizer tests (float64 by default)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from saf_kernels.ops import sds_count


class Net(nn.Module):
    """Many small tensors, one large one (12,000 weights: several kernel chunks), a 1-D scale and
    a parameter the forward never uses (no gradient)."""

    def __init__(self, bn: bool = False):
        super().__init__()
        self.l1 = nn.Linear(6, 40)
        self.bn = nn.BatchNorm1d(40) if bn else None
        self.l2 = nn.Linear(40, 300)
        self.l3 = nn.Linear(300, 5)
        self.scale = nn.Parameter(torch.ones(5))
        self.unused = nn.Parameter(torch.randn(7))

    def forward(self, x):
        h = self.l1(x)
        if self.bn is not None:
            h = self.bn(h)
        h = torch.tanh(self.l2(torch.tanh(h)))
        return self.l3(h) * self.scale


def make_model(seed: int = 0, dtype=torch.float64, bn: bool = False) -> Net:
    torch.manual_seed(seed)
    return Net(bn).to(dtype)


def batches(n: int, B: int = 24, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, 6, generator=g, dtype=dtype), torch.randint(0, 5, (B,), generator=g)) for _ in range(n)]


def per_sample(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def amp_sam_step(opt, model, scaler, x, y) -> None:
    """One step under a GradScaler as the README shows it: scaled backward, ``first_step`` with
    the scaler (skipped when a scheduled optimizer's ``sam_step`` is false), scaled backward,
    ``scaler.step`` and ``update``. The caller zeroes the gradients before."""
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    if getattr(opt, "sam_step", True):
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()


def assert_same_params(a: nn.Module, b: nn.Module, rtol: float, atol: float, what: str = "") -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{what} {n}: {m}")


def esam_reference_step(model, sgd, x, y, rho, beta, gamma, keep_fn, eps=1e-7, per_sample=per_sample):
    """One ESAM step as utils/Esam.py computes it (the SDS rule keeping ceil(gamma B) samples),
    written plainly. keep_fn(params with a gradient) -> one bool mask per tensor (flat). With
    ``sgd=None`` the weights are left unchanged and ``p.grad`` holds the second gradients. Returns
    the kept sample indices (None: all). ``per_sample(model, x, y)``: the per-sample losses."""
    params = list(model.parameters())
    for p in params:
        p.grad = None
    before = per_sample(model, x, y)
    before.mean().backward()
    live = [p for p in params if p.grad is not None]
    masks = keep_fn(live)
    norm = math.sqrt(sum(float((p.grad.reshape(-1)[m] ** 2).sum()) for p, m in zip(live, masks)))
    saved = [p.detach().clone() for p in live]
    with torch.no_grad():
        for p, m in zip(live, masks):
            e = torch.where(m, rho / beta * p.grad.reshape(-1) / (norm + eps), torch.zeros((), dtype=p.dtype))
            p.add_(e.view_as(p))
        after = per_sample(model, x, y)
    k = sds_count(gamma, x.shape[0])
    idx = torch.sort(torch.topk(after - before.detach(), k).indices).values if k < x.shape[0] else None
    for p in params:
        p.grad = None
    xs, ys = (x, y) if idx is None else (x[idx], y[idx])
    per_sample(model, xs, ys).mean().backward()
    with torch.no_grad():
        for p, s in zip(live, saved):
            p.copy_(s)
    if sgd is not None:
        sgd.step()
    return idx
