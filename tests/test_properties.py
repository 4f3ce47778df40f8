"""Property-based tests (hypothesis) of the public ops against the reference: random shapes,
dtypes, temperatures, reductions and seeds, NaN rows, B = 0."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("hypothesis", reason="property tests need hypothesis (the GPU machines lack it)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import saf_kernels as sk
from saf_kernels import reference

from .helpers import skip_unless_available
from .tolerances import assert_close

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])
CPU_EXAMPLES, TRITON_EXAMPLES = 60, 10  # the Triton interpreter is slow


def _settings(n):
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    B = draw(st.integers(0, 9))
    C = draw(st.sampled_from([1, 2, 3, 10, 31, 64, 100, 257, 1000, 1271]))
    return dict(
        B=B, C=C, dtype=draw(DTYPES), tdtype=draw(DTYPES),
        T=draw(st.floats(0.25, 8.0)), lam=draw(st.floats(0.0, 2.0)), eps=draw(st.sampled_from([0.0, 0.1, 0.5])),
        scale=draw(st.sampled_from([0.1, 1.0, 5.0, 30.0])), seed=draw(st.integers(0, 2**31 - 1)),
        reduction=draw(st.sampled_from(["none", "sum", "mean", "batchmean"])),
        ignore=draw(st.sampled_from([-100, 0])), nan_row=draw(st.booleans()),
        ignored=draw(st.lists(st.booleans(), min_size=B, max_size=B)),
    )


def _tensors(p, device):
    g = torch.Generator().manual_seed(p["seed"])
    z = (torch.randn(p["B"], p["C"], generator=g, dtype=torch.float64) * p["scale"]).to(p["dtype"]).to(device)
    t = (torch.randn(p["B"], p["C"], generator=g, dtype=torch.float64) * p["scale"]).to(p["tdtype"]).to(device)
    y = torch.randint(0, p["C"], (p["B"],), generator=g).to(device)
    if p["nan_row"] and p["B"] > 0:
        z[p["B"] - 1, 0] = float("nan")
    z, t = _view(z, p.get("view")), _view(t, p.get("view"))
    return z.requires_grad_(), t, y


def _view(x, kind):
    """The same values as a strided view (tests/test_fuzz.py draws the kind): a column slice of
    a wider tensor (row stride > columns, also for one column: ``logits[:, :1]``), the transpose
    of a [C, B] tensor (column stride B), or None (contiguous)."""
    if kind == "slice":
        wide = torch.full((x.shape[0], x.shape[1] + 3), float("nan"), dtype=x.dtype, device=x.device)
        wide[:, 1:-2] = x
        return wide[:, 1:-2]
    if kind == "transpose":
        return x.t().contiguous().t()
    return x


def _tol_dtype(p):
    # Inputs are rounded to their dtype first and the reference sees the rounded values, so
    # the tolerance is that of the arithmetic: float32 unless everything is float64.
    if p["dtype"] == torch.float64:
        return torch.float32 if p["tdtype"] != torch.float64 else torch.float64
    return p["dtype"]


def _kl_floor(p, dtype):
    # float32 arithmetic cannot resolve a KL term below ~eps * T^2 * (log C + 1 + |z| / T): the
    # terms that cancel are that large (torch's own float32 log_softmax misses by as much).
    eps = torch.finfo(dtype).eps if dtype != torch.float64 else torch.finfo(torch.float32).eps
    return 2 * eps * p["T"] ** 2 * (math.log(p["C"]) + 1 + p["scale"] / p["T"])


def _check(out, ref, dtype, what, floor):
    assert torch.equal(torch.isnan(out.detach().double().cpu()), torch.isnan(ref.detach().double().cpu())), what
    assert_close(out, ref, dtype, what, atol_floor=floor)


def _kl_property(p, backend, device):
    skip_unless_available(backend, device)
    z, t, _ = _tensors(p, device)
    out = sk.trajectory_kl_loss(z, t, p["T"], p["reduction"], backend=backend)
    ref = reference.trajectory_kl_loss(z.detach().double(), t, p["T"], p["reduction"])
    n = p["B"] if p["reduction"] == "sum" else 1
    _check(out, ref, _tol_dtype(p), str(p), n * _kl_floor(p, _tol_dtype(p)))
    if p["B"] and not p["nan_row"]:
        (g,) = torch.autograd.grad(out.sum(), z)
        z64 = z.detach().double().requires_grad_()
        (g_ref,) = torch.autograd.grad(reference.trajectory_kl_loss(z64, t, p["T"], p["reduction"]).sum(), z64)
        _check(g, g_ref, _tol_dtype(p), str(p) + " grad", 4 * torch.finfo(torch.float32).eps * p["T"])


def _saf_property(p, backend, device):
    skip_unless_available(backend, device)
    z, t, y = _tensors(p, device)
    if p["B"]:
        y[torch.tensor(p["ignored"], device=device)] = p["ignore"]
    out = sk.saf_loss(z, y, t, p["lam"], p["T"], p["eps"], p["ignore"], backend=backend)
    ref = reference.saf_loss(z.detach().double(), y, t, p["lam"], p["T"], p["eps"], p["ignore"])
    if p["nan_row"] and p["B"] and y[-1] != p["ignore"]:
        assert math.isnan(out.item()), p
        return
    dt = _tol_dtype(p)
    floor = 2 * torch.finfo(torch.float32).eps * (math.log(p["C"]) + 1 + p["scale"]) + p["lam"] * _kl_floor(p, dt)
    _check(out, ref, dt, str(p), floor)


@_settings(CPU_EXAMPLES)
@given(problems())
def test_trajectory_kl_loss_property_cpu(p):
    _kl_property(p, "cpu", "cpu")


@_settings(TRITON_EXAMPLES)
@given(problems())
def test_trajectory_kl_loss_property_triton(p):
    _kl_property(p, "triton", "cpu")


@_settings(CPU_EXAMPLES)
@given(problems())
def test_saf_loss_property_cpu(p):
    _saf_property(p, "cpu", "cpu")


@_settings(TRITON_EXAMPLES)
@given(problems())
def test_saf_loss_property_triton(p):
    _saf_property(p, "triton", "cpu")
