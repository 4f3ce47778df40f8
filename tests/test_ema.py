"""ema_update_ on every backend against the float64 formula, on awkward tensor lists."""

from __future__ import annotations

import pytest
import torch

from saf_kernels import ops as O
from saf_kernels import reference

from .helpers import FULL, KERNEL_PAIRS, skip_unless_available

PAIRS = KERNEL_PAIRS + [pytest.param("torch", "cpu", id="torch-cpu")]
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 2.0**-52}


def _lists(device, backend, mixed):
    big = 70001 if backend != "triton" or FULL or torch.cuda.is_available() else 20001
    shapes = [(3, 5), (1,), (0,), (129,), (big,), (7, 7, 3), (64, 1)]
    ema_dt = [torch.float32] * len(shapes)
    model_dt = list(ema_dt)
    if mixed:  # a float32 EMA of bfloat16 weights, a bfloat16 EMA, a float16 pair
        model_dt[1] = model_dt[4] = torch.bfloat16
        ema_dt[3] = model_dt[3] = torch.bfloat16
        ema_dt[5] = model_dt[5] = torch.float16
    ema = [torch.randn(s, dtype=torch.float64).to(device=device, dtype=d) for s, d in zip(shapes, ema_dt)]
    model = [torch.randn(s, dtype=torch.float64).to(device=device, dtype=d) for s, d in zip(shapes, model_dt)]
    return ema, model


def _check(ema, before, model, decay, what):
    for i, (e, b, m) in enumerate(zip(ema, before, model)):
        want = decay * b.double().cpu() + (1 - decay) * m.double().cpu()
        got = e.double().cpu()
        tol = (
            2 * ULP[e.dtype] * want.abs()
            + 4 * ULP[torch.float32] * (b.double().abs() + m.double().abs()).cpu()
            + torch.finfo(e.dtype).tiny
        )
        assert ((got - want).abs() <= tol).all(), (
            f"{what}: tensor {i} ({e.dtype}): max err {(got - want).abs().max()}"
        )


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "mixed"])
@pytest.mark.parametrize("decay", [0.9998, 0.5, 0.3, 0.0, 1.0])
def test_ema_matches_formula(backend, device, mixed, decay):
    skip_unless_available(backend, device, "ema_update_")
    ema, model = _lists(device, backend, mixed)
    before = [e.clone() for e in ema]
    O.ema_update_(ema, model, decay, backend=backend)
    _check(ema, before, model, decay, f"{backend} decay={decay}")
    if decay == 1.0:
        assert all(torch.equal(e, b) for e, b in zip(ema, before))
    if decay == 0.0:  # exact copy (rounded to the EMA's dtype)
        assert all(torch.equal(e, m.to(e.dtype)) for e, m in zip(ema, model))


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_ema_decay_tensor(backend, device):
    skip_unless_available(backend, device, "ema_update_")
    ema, model = _lists(device, backend, True)
    e2 = [e.clone() for e in ema]
    before = [e.clone() for e in ema]
    d = torch.tensor(0.75, device=device)  # exact in every float dtype
    O.ema_update_(ema, model, d, backend=backend)
    O.ema_update_(e2, model, 0.75, backend=backend)
    _check(ema, before, model, 0.75, backend)
    for a, b in zip(ema, e2):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_ema_empty_and_errors(backend, device):
    skip_unless_available(backend, device, "ema_update_")
    O.ema_update_([], [], 0.9, backend=backend)
    e = [torch.randn(4, device=device), torch.randn(3, device=device)]
    m = [torch.randn(4, device=device), torch.randn(3, device=device)]
    with pytest.raises(ValueError, match="decay must be in"):
        O.ema_update_(e, m, 1.5, backend=backend)
    with pytest.raises(ValueError, match="ema has 2 tensors but model has 1"):
        O.ema_update_(e, m[:1], 0.9, backend=backend)
    with pytest.raises(ValueError, match=r"model\[1\] has shape \[4\]"):
        O.ema_update_(e, [m[0], torch.randn(4, device=device)], 0.9, backend=backend)
    with pytest.raises(TypeError, match=r"ema\[1\] has dtype"):
        O.ema_update_([e[0], torch.ones(3, dtype=torch.long, device=device)], m, 0.9, backend=backend)
    with pytest.raises(ValueError, match="one-element floating tensor"):
        O.ema_update_(e, m, torch.tensor([0.9, 0.8], device=device), backend=backend)


def test_ema_reference_agrees():
    ema, model = _lists("cpu", "cpu", False)
    r = [e.clone() for e in ema]
    before = [e.clone() for e in ema]
    reference.ema_update_(r, model, 0.9)
    _check(r, before, model, 0.9, "reference")
