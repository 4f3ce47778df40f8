"""Shared by the LookSAM, Momentum-SAM and schedule tests: a closure, float64 norms, a resume check."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


def closure(opt, model, x, y, record=None):
    """torch's closure convention; ``record`` gets the clean gradient's norm (first call of a step)."""
    calls = []

    def run():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if record is not None and not calls:
            record.append(gnorm([p.grad for p in model.parameters() if p.grad is not None]))
        calls.append(1)
        return loss

    run.calls = calls
    return run


def gnorm(tensors) -> float:
    return float(sum((t.double() ** 2).sum() for t in tensors).sqrt())


def assert_resume_bit_identical(make_opt, make_model, data, split: int, step) -> None:
    """Train on ``data``; restart from a checkpoint taken after ``split`` steps; the two runs end
    with equal parameters bit for bit. ``step(opt, model, x, y)`` takes one step."""
    m1 = make_model()
    o1 = make_opt(m1)
    for x, y in data[:split]:
        step(o1, m1, x, y)
    ckpt = copy.deepcopy({"model": m1.state_dict(), "opt": o1.state_dict()})
    for x, y in data[split:]:
        step(o1, m1, x, y)
    m2 = make_model()
    o2 = make_opt(m2)
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    for x, y in data[split:]:
        step(o2, m2, x, y)
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n
