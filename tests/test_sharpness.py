"""Sharpness tools on a quadratic with a known Hessian, and on a small network."""

from __future__ import annotations

import pytest
import torch

from saf_kernels import sharpness


class Quadratic(torch.nn.Module):
    """L(w) = 0.5 w^T A w + b^T w, returned as the model's 'output' so loss_fn can be the identity."""

    def __init__(self, A, b):
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("b", b)
        self.w = torch.nn.Parameter(torch.zeros(A.shape[0], dtype=A.dtype))

    def forward(self, x):
        return 0.5 * self.w @ self.A @ self.w + self.b @ self.w + 0 * x.sum()


def _spd(d, top, rest_max, dtype=torch.float64):
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=dtype))
    eig = torch.rand(d, dtype=dtype) * rest_max
    eig[0] = top
    return q @ torch.diag(eig) @ q.T


def _data(n=3):
    return [(torch.zeros(1, dtype=torch.float64), torch.zeros(1)) for _ in range(n)]


def test_top_eigenvalue_of_quadratic():
    A = _spd(20, top=7.5, rest_max=3.0)
    model = Quadratic(A, torch.randn(20, dtype=torch.float64))
    res = sharpness.hessian_top_eigenvalue(model, lambda out, y: out, _data(), iters=200, tol=1e-10)
    assert res.converged
    assert res.eigenvalue == pytest.approx(7.5, rel=1e-6)
    # The eigenvalue does not depend on where we are (the Hessian is constant).
    with torch.no_grad():
        model.w.normal_()
    assert sharpness.hessian_top_eigenvalue(model, lambda o, y: o, _data(), iters=200, tol=1e-10).eigenvalue == (
        pytest.approx(7.5, rel=1e-6)
    )


def test_max_loss_increase_at_minimum():
    A = _spd(10, top=4.0, rest_max=1.0)
    b = torch.randn(10, dtype=torch.float64)
    model = Quadratic(A, b)
    with torch.no_grad():
        model.w.copy_(-torch.linalg.solve(A, b))  # the minimum
    before = model.w.detach().clone()
    rho = 0.1
    res = sharpness.max_loss_increase(model, lambda o, y: o, _data(), rho=rho, steps=60)
    exact = 0.5 * 4.0 * rho**2  # along the top eigenvector, on the sphere
    assert exact * 0.98 <= res.increase <= exact * (1 + 1e-9)
    assert torch.equal(model.w.detach(), before), "weights must be restored bit for bit"


def test_flatter_quadratic_has_smaller_values():
    b = torch.zeros(8, dtype=torch.float64)
    sharp, flat = Quadratic(_spd(8, 10.0, 1.0), b), Quadratic(_spd(8, 1.0, 0.5), b)
    eig = [sharpness.hessian_top_eigenvalue(m, lambda o, y: o, _data(), iters=100).eigenvalue for m in (sharp, flat)]
    inc = [sharpness.max_loss_increase(m, lambda o, y: o, _data(), rho=0.1, steps=30).increase for m in (sharp, flat)]
    assert eig[0] > eig[1] and inc[0] > inc[1]


def test_network_restores_mode_and_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model.train()
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(2)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lam = sharpness.hessian_top_eigenvalue(model, torch.nn.functional.cross_entropy, data, iters=10)
    inc = sharpness.max_loss_increase(model, torch.nn.functional.cross_entropy, data, rho=0.05, steps=3)
    assert lam.eigenvalue > 0 and inc.increase >= 0
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_bad_arguments():
    model = torch.nn.Linear(2, 2)
    data = [(torch.randn(3, 2), torch.randint(0, 2, (3,)))]
    ce = torch.nn.functional.cross_entropy
    with pytest.raises(ValueError, match="rho must be a finite number > 0"):
        sharpness.max_loss_increase(model, ce, data, rho=0)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        sharpness.max_loss_increase(model, ce, data, steps=0)
    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        sharpness.hessian_top_eigenvalue(model, ce, data, iters=0)
    with pytest.raises(ValueError, match="yielded no batches"):
        sharpness.hessian_top_eigenvalue(model, ce, [])
    with pytest.raises(TypeError, match="must be an nn.Module"):
        sharpness.hessian_top_eigenvalue(lambda x: x, ce, data)
    with pytest.raises(ValueError, match="max_batches must be an int >= 1"):
        sharpness.hessian_top_eigenvalue(model, ce, data, max_batches=0)
