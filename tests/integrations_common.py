"""What the trainer-integration tests share: the optimizers of the library as factories, a tiny
classifier, and the plain loop the integrations must reproduce (the documented recipe: first
pass over every micro-batch, first_step, second pass over every micro-batch inside second_pass,
clip the second gradients, step)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from saf_kernels.optim import ASAM, ESAM, GSAM, RSAM, SAM

# name -> (params, **overrides) -> optimizer. ESAM with gamma = 1: trainers cannot do SDS.
OPTIMIZERS = {
    "sam": lambda p: SAM(p, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "asam": lambda p: ASAM(p, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9),
    "esam": lambda p: ESAM(p, torch.optim.SGD, rho=0.1, beta=0.6, gamma=1.0, seed=3, lr=0.1),
    "rsam": lambda p: RSAM(p, torch.optim.SGD, rho=0.1, noise_std=1e-2, seed=4, lr=0.1),
    "gsam": lambda p: GSAM(p, torch.optim.SGD, rho=0.1, alpha=0.3, lr=0.1, momentum=0.9),
    "sam-adamw": lambda p: SAM(p, torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=1e-2),
}


def make_net(seed: int = 0, bn: bool = True) -> nn.Module:
    """An MLP with BatchNorm (whose statistics must come from the first pass only)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.Tanh(), nn.Linear(16, 5)]
    return nn.Sequential(*layers)


def make_data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def reference_loop(net, opt, micro_batches, k, *, clip=None, scaler=None, autocast=None, loss_of=None):
    """The plain loop: for each window of k micro-batches, both passes over all of them.
    ``loss_of(net, micro_batch)``: default ``F.cross_entropy(net(x), y)`` for ``(x, y)``."""
    loss_of = loss_of or (lambda net, mb: F.cross_entropy(net(mb[0]), mb[1]))
    ctx = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast is not None else contextlib.nullcontext
    scale = (lambda loss: scaler.scale(loss)) if scaler is not None else (lambda loss: loss)
    for s in range(0, len(micro_batches), k):
        window = micro_batches[s : s + k]
        opt.zero_grad(set_to_none=True)
        opt.begin_step()
        for mb in window:
            with ctx():
                loss = loss_of(net, mb) / k
            scale(loss).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        with opt.second_pass(net):
            for mb in window:
                with ctx():
                    loss = loss_of(net, mb) / k
                scale(loss).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return net


def assert_same_state(a: nn.Module, b: nn.Module, rtol=1e-6, atol=1e-7, what="") -> None:
    """Parameters and buffers (BatchNorm statistics) agree."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name].float(), sb[name].float(), rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{what} {n}: {m}")


def assert_differ(a: nn.Module, b: nn.Module) -> None:
    assert any(not torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))
