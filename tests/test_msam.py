"""Momentum-SAM: the fused ops (msam_sgd_, msam_adamw_) on every backend and the optimizers
against a plain-PyTorch transcription of the authors' rule (MarlonBecker/MSAM) over several steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from saf_kernels import ops as O
from saf_kernels.ops import _multi_tensor as mt
from saf_kernels.optim import MSAM, MSAMAdamW

from .cheap_common import assert_resume_bit_identical, closure
from .helpers import KERNEL_PAIRS, skip_unless_available
from .optim_models import assert_same_params, batches, make_model

PAIRS = KERNEL_PAIRS + [pytest.param("torch", "cpu", id="torch-cpu")]
SHAPES = [(3, 5), (1,), (7, 7, 3), (129,), (20001,)]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


class AuthorsMSAM:
    """The authors' SGD rule, transcribed in our own words: the weights live at the perturbed point;
    a step un-perturbs, steps and re-perturbs along the new momentum."""

    def __init__(self, params, lr, momentum, rho, wd):
        self.params, self.lr, self.mom, self.rho, self.wd = list(params), lr, momentum, rho, wd
        self.buf = [torch.zeros_like(p) for p in self.params]
        self.inv = 0.0

    @torch.no_grad()
    def step(self):
        live = [(i, p) for i, p in enumerate(self.params) if p.grad is not None]
        for i, p in live:
            d = p.grad + self.wd * p
            p.add_(self.rho * self.inv * self.buf[i])
            self.buf[i] = self.mom * self.buf[i] + d
            p.sub_(self.lr * self.buf[i])
        self.inv = 1.0 / (float(sum((self.buf[i] ** 2).sum() for i, _ in live).sqrt()) + 1e-12)
        for i, p in live:
            p.sub_(self.rho * self.inv * self.buf[i])


class AuthorsAdamWMSAM:
    """The authors' ``adamW_msam``: Adam step, then the decay, then the ascent along ``-m / |m|``."""

    def __init__(self, params, lr, betas, eps, wd, rho):
        self.params, self.lr, self.b1, self.b2, self.eps, self.wd, self.rho = list(params), lr, *betas, eps, wd, rho
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0
        self.nf = 0.0

    @torch.no_grad()
    def step(self):
        self.t += 1
        live = [(i, p) for i, p in enumerate(self.params) if p.grad is not None]
        for i, p in live:
            p.add_(self.nf * self.m[i])
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * p.grad
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * p.grad ** 2
            denom = self.v[i].sqrt() / (1 - self.b2 ** self.t) ** 0.5 + self.eps
            p.sub_(self.lr / (1 - self.b1 ** self.t) * self.m[i] / denom)
            p.mul_(1 - self.lr * self.wd)
        self.nf = self.rho / (float(sum((self.m[i] ** 2).sum() for i, _ in live).sqrt()) + 1e-12)
        for i, p in live:
            p.sub_(self.nf * self.m[i])


def _lists(dtype, device, n):
    return [[torch.randn(s, dtype=torch.float64).to(device=device, dtype=dtype) for s in SHAPES] for _ in range(n)]


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_sgd_op_matches_reference_in_float64(backend, device, dtype):
    skip_unless_available(backend, device, "msam_sgd_")
    p, g, b = _lists(dtype, device, 3)
    p64, g64, b64 = ([t.double().cpu().clone() for t in ts] for ts in (p, g, b))
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # as the optimizers keep it
    inv, inv64 = torch.full((), 0.25, dtype=acc, device=device), torch.full((), 0.25, dtype=torch.float64)
    kw = dict(lr=[0.1, 0.2, 0.1, 0.05, 0.1], weight_decay=1e-3, momentum=0.9, rho_prev=0.3, rho=0.2)
    n = O.msam_sgd_(p, g, b, inv, backend=backend, **kw)
    n64 = O.msam_sgd_(p64, g64, b64, inv64, backend="torch", **kw)
    for a, w in zip(p + b, p64 + b64):
        torch.testing.assert_close(a.double().cpu(), w, **TOL[dtype])
    srtol = 1e-2 if dtype == torch.bfloat16 else 1e-4  # the norm of the buffer as stored
    torch.testing.assert_close(float(n), float(n64), rtol=srtol, atol=0)
    torch.testing.assert_close(float(inv), float(inv64), rtol=srtol, atol=0)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_adamw_op_matches_reference_in_float64(backend, device, dtype):
    skip_unless_available(backend, device, "msam_adamw_")
    p, g, m, v = _lists(dtype, device, 4)
    v = [t.abs() for t in v]
    steps = [torch.full((), 3.0, device=device) for _ in p]
    p64, g64, m64, v64 = ([t.double().cpu().clone() for t in ts] for ts in (p, g, m, v))
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # as the optimizers keep it
    inv, inv64 = torch.full((), 0.25, dtype=acc, device=device), torch.full((), 0.25, dtype=torch.float64)
    kw = dict(lr=1e-2, weight_decay=0.05, rho_prev=0.3, rho=0.2)
    O.msam_adamw_(p, g, m, v, steps, inv, backend=backend, **kw)
    O.msam_adamw_(p64, g64, m64, v64, [s.cpu() for s in steps], inv64, backend="torch", **kw)
    for a, w in zip(p + m + v, p64 + m64 + v64):
        torch.testing.assert_close(a.double().cpu(), w, **TOL[dtype])


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_awkward_lists_match_reference(backend, device, rule):
    """float16, bfloat16, float32 and float64 tensors in one list, transposed (dense, not contiguous)
    views, an empty tensor and one across a CPU chunk, per-tensor values and a float16 inv_norm,
    against the reference in float64; an empty list touches nothing."""
    skip_unless_available(backend, device, f"msam_{rule}_")
    gen = torch.Generator().manual_seed(17)
    shapes = [(5, 3), (0,), (16385,), (4, 6), (1,)]
    dtypes = [torch.float16, torch.float32, torch.bfloat16, torch.float64, torch.float32]

    def make(scale=1.0):
        out = []
        for s, d in zip(shapes, dtypes):
            t = (torch.randn(s[::-1], generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=d)
            out.append(t.t() if len(s) == 2 else t)
        return out

    lists = [make(), make(), make(0.1)] + ([[t.abs() for t in make(0.01)]] if rule == "adamw" else [])
    ref = [[t.double().cpu() for t in ts] for ts in lists]
    inv, inv64 = torch.full((), 0.25, dtype=torch.float16, device=device), torch.full((), 0.25, dtype=torch.float64)
    kw = dict(lr=[0.1, 0.2, 0.1, 0.05, 0.1], weight_decay=1e-3, rho_prev=0.3, rho=[0.2, 0.1, 0.2, 0.3, 0.0])
    if rule == "sgd":
        n = O.msam_sgd_(*lists, inv, momentum=0.9, backend=backend, **kw)
        n64 = O.msam_sgd_(*ref, inv64, momentum=0.9, backend="torch", **kw)
    else:
        steps = [torch.full((), 3.0, device=device) for _ in shapes]
        n = O.msam_adamw_(*lists, steps, inv, backend=backend, **kw)
        n64 = O.msam_adamw_(*ref, [s.cpu() for s in steps], inv64, backend="torch", **kw)
    for got, want in zip(lists, ref):
        for a, w in zip(got, want):
            tol = 2e-2 if a.dtype in (torch.float16, torch.bfloat16) else 1e-5
            torch.testing.assert_close(a.double().cpu(), w, rtol=tol, atol=tol)
    torch.testing.assert_close(float(n), float(n64), rtol=1e-2, atol=0)
    torch.testing.assert_close(float(inv), 1.0 / (float(n) + 1e-12), rtol=1e-3, atol=0)  # stored in float16
    args = ([], [], [], inv) if rule == "sgd" else ([], [], [], [], [], inv)
    fn = O.msam_sgd_ if rule == "sgd" else O.msam_adamw_
    before = inv.clone()
    assert float(fn(*args, lr=0.1, rho_prev=0.1, rho=0.1, backend=backend)) == 0.0 and torch.equal(inv, before)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_opcheck(backend):
    skip_unless_available(backend, "cpu", "msam_sgd_")
    p, g, b, v = _lists(torch.float32, "cpu", 4)
    torch.library.opcheck(mt.kernels("msam_sgd_")[backend],
                          (p, g, b, torch.zeros(()), [0.1], [0.0], [0.9], [0.3], [0.3], 1e-12))
    steps = [torch.ones(()) for _ in p]
    torch.library.opcheck(mt.kernels("msam_adamw_")[backend],
                          (p, g, b, [t.abs() for t in v], steps, torch.zeros(()), [1e-3], [0.9], [0.999], [1e-8],
                           [0.01], [0.3], [0.3], 1e-12))


OPT_BACKENDS = ["torch", "cpu", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("backend", OPT_BACKENDS)
def test_msam_matches_authors_rule(backend):
    skip_unless_available(backend, "cpu", "msam_sgd_")
    model, ref = make_model(), make_model()
    opt = MSAM(model.parameters(), lr=0.05, momentum=0.9, rho=0.3, weight_decay=1e-3, backend=backend)
    authors = AuthorsMSAM(ref.parameters(), 0.05, 0.9, 0.3, 1e-3)
    for t, (x, y) in enumerate(batches(5)):
        cl = closure(opt, model, x, y)
        opt.step(cl)
        assert len(cl.calls) == 1
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        authors.step()
        assert_same_params(model, ref, rtol=1e-10, atol=1e-12, what=f"{backend} step {t}")


@pytest.mark.parametrize("backend", OPT_BACKENDS)
def test_msam_adamw_matches_authors_rule(backend):
    skip_unless_available(backend, "cpu", "msam_adamw_")
    model, ref = make_model(), make_model()
    opt = MSAMAdamW(model.parameters(), lr=1e-2, weight_decay=0.05, rho=0.3, backend=backend)
    authors = AuthorsAdamWMSAM(ref.parameters(), 1e-2, (0.9, 0.999), 1e-8, 0.05, 0.3)
    for t, (x, y) in enumerate(batches(5)):
        opt.step(closure(opt, model, x, y))
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        authors.step()
        # The step count is float32 (as torch's AdamW): the bias corrections agree to ~1e-8.
        assert_same_params(model, ref, rtol=1e-7, atol=1e-9, what=f"{backend} step {t}")


def test_rho_zero_is_the_base_optimizer():
    data = batches(4)
    for make, base in ((lambda ps: MSAM(ps, lr=0.1, momentum=0.9, rho=0.0, weight_decay=1e-2),
                        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2)),
                       (lambda ps: MSAMAdamW(ps, lr=1e-2, rho=0.0, weight_decay=0.0),
                        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0))):
        m1, m2 = make_model(), make_model()
        o1, o2 = make(m1.parameters()), base(m2.parameters())
        for x, y in data:
            for m, o in ((m1, o1), (m2, o2)):
                o.zero_grad()
                F.cross_entropy(m(x), y).backward()
                o.step()
        assert_same_params(m1, m2, rtol=1e-8, atol=1e-10, what=type(o1).__name__)


def test_unperturbed_context():
    model = make_model()
    opt = MSAM(model.parameters(), lr=0.05, rho=0.3)
    for x, y in batches(3):
        opt.step(closure(opt, model, x, y))
    perturbed = [p.clone() for p in model.parameters()]
    live = [i for i, p in enumerate(model.parameters()) if p.grad is not None]
    inv = float(opt._inv_norm)
    with opt.unperturbed():
        clean = [p.clone() for p in model.parameters()]
    ps = list(model.parameters())
    for i in live:
        want = perturbed[i] + 0.3 * inv * opt.state[ps[i]]["momentum_buffer"]
        torch.testing.assert_close(clean[i], want, rtol=1e-12, atol=1e-14)
    for p, q in zip(model.parameters(), perturbed):  # put back bit for bit
        assert torch.equal(p, q)
    dist = float(sum(((clean[i] - perturbed[i]) ** 2).sum() for i in live).sqrt())
    assert abs(dist - 0.3) < 1e-9  # the perturbation has norm rho


@pytest.mark.parametrize("cls", [MSAM, MSAMAdamW])
def test_resume_bit_identical(cls):
    def step(o, m, x, y):
        o.step(closure(o, m, x, y))

    kw = dict(lr=0.05, rho=0.3) if cls is MSAM else dict(lr=1e-2, rho=0.3)
    assert_resume_bit_identical(lambda m: cls(m.parameters(), **kw), make_model, batches(6), 3, step)
