"""Small models and data for the ESAM / R-SAM / GSAM optimizer tests (float64 by default)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


def assert_same_params(a: nn.Module, b: nn.Module, rtol: float, atol: float, what: str = "") -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{what} {n}: {m}")
