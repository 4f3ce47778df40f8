"""ESAM: the fused stochastic weight perturbation (esam_perturb_ / esam_restore_) on every backend
against float64, the mask regenerated identically everywhere, sharpness-sensitive data selection,
and the ESAM optimizer against a plain-PyTorch version of its published rule."""

from __future__ import annotations

import math

import pytest
import torch

from saf_kernels import ops as O
from saf_kernels import reference

from .helpers import FULL, KERNEL_PAIRS, bits, skip_unless_available

PAIRS = KERNEL_PAIRS + [pytest.param("torch", "cpu", id="torch-cpu")]
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 2.0**-52}


def _skip(backend, device, op="esam_perturb_"):
    skip_unless_available(backend, device, op)


def _awkward_shapes(backend):
    """Many small tensors of odd sizes (not multiples of 4: the Philox padding), one empty, one
    large one that spans several chunks."""
    big = 70001 if backend != "triton" or FULL or torch.cuda.is_available() else 33331
    return [(3, 5), (1,), (64,), (7, 7, 3), (0,), (129,), (2, 3, 4, 5), (big,), (31,), (1000, 3), (5, 1, 1, 1)]


def _dtypes_for(shapes, mixed):
    cycle = [torch.float32, torch.bfloat16, torch.float32, torch.float16] if mixed else [torch.float32]
    return [cycle[i % len(cycle)] for i in range(len(shapes))]


def _make(shapes, dtypes, device):
    params = [torch.randn(s, dtype=torch.float64).to(device=device, dtype=d) for s, d in zip(shapes, dtypes)]
    grads = [torch.randn(s, dtype=torch.float64).to(device=device, dtype=d) for s, d in zip(shapes, dtypes)]
    return params, grads


def _expected(params, grads, rho, beta, adaptive, eta, seed, offset, eps=1e-7):
    """The perturbation in float64 from the rounded inputs, written out from the rule (the mask
    from reference.esam_keep_masks, the generator checked in tests/test_philox.py)."""
    masks = reference.esam_keep_masks([p.cpu() for p in params], beta, seed, offset)
    w64 = [p.detach().double().cpu().reshape(-1).clone() for p in params]
    g64 = [g.detach().double().cpu().reshape(-1) for g in grads]
    ts = [(w.abs() + et) if a else torch.ones_like(w) for w, a, et in zip(w64, adaptive, eta)]
    norm = math.sqrt(sum(float(((t * g)[m] ** 2).sum()) for t, g, m in zip(ts, g64, masks)))
    es = [torch.where(m, r / b * t * t * g / (norm + eps), torch.zeros_like(g))
          for r, b, t, g, m in zip(rho, beta, ts, g64, masks)]
    return norm, w64, es, masks


def _check_perturbed(params, w64, es, what):
    for i, (p, w, e) in enumerate(zip(params, w64, es)):
        got = p.detach().double().cpu().reshape(-1)
        want = w + e
        tol = 2 * ULP[p.dtype] * want.abs() + torch.finfo(p.dtype).tiny * ULP[p.dtype] + 1e-5 * e.abs()
        bad = (got - want).abs() > tol
        assert not bad.any(), f"{what}: tensor {i} ({p.dtype}, {tuple(p.shape)}): max err " \
                              f"{(got - want).abs().max().item():.3g}"


# ---------------------------------------------------------------------------------------------
# esam_perturb_ / esam_restore_
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "mixed"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_perturb_matches_rule_and_restores_exactly(backend, device, mixed, adaptive):
    _skip(backend, device)
    shapes = _awkward_shapes(backend)
    params, grads = _make(shapes, _dtypes_for(shapes, mixed), device)
    n = len(params)
    rho = [0.05 + 0.01 * (i % 3) for i in range(n)]
    beta = [0.5 if i % 4 else 0.3 for i in range(n)]  # per-group beta
    ad = [adaptive and len(s) > 1 for s in shapes]
    eta = [0.01] * n
    orig = [p.clone() for p in params]
    stash = [torch.empty_like(p) for p in params]
    norm_ref, w64, es, masks = _expected(params, grads, rho, beta, ad, eta, seed=1234, offset=5)
    norm = O.esam_perturb_(params, grads, stash, rho, beta, seed=1234, offset=5, adaptive=ad, eta=eta,
                           backend=backend)
    assert norm.dtype == torch.float32 and norm.shape == () and norm.device.type == device
    assert norm.item() == pytest.approx(norm_ref, rel=1e-5)
    _check_perturbed(params, w64, es, f"{backend} mixed={mixed} adaptive={adaptive}")
    for p, o, m in zip(params, orig, masks):  # dropped elements keep their bits
        assert torch.equal(bits(p).reshape(-1)[~m], bits(o).reshape(-1)[~m])
    kept = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert 0.4 < kept < 0.55
    O.esam_restore_(params, stash, beta, 1234, 5, backend=backend)
    for p, o in zip(params, orig):
        assert torch.equal(bits(p), bits(o)), "copy-mode restore must be bit exact"


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_same_mask_on_every_backend(backend, device):
    """The elements a backend perturbs are exactly the reference mask (integer arithmetic: no
    backend may differ), for several seeds, offsets and a list whose sizes are not multiples of 4."""
    _skip(backend, device)
    shapes = [(3,), (5, 7), (1,), (2001,)]
    for seed, offset in ((0, 0), (-77, 3), (2**62 + 5, 2**33)):
        params, _ = _make(shapes, [torch.float32] * 4, device)
        grads = [torch.rand_like(p) + 0.5 for p in params]  # never zero: every kept element moves
        before = [p.clone() for p in params]
        O.esam_perturb_(params, grads, [torch.empty_like(p) for p in params], 0.5, 0.5, seed, offset,
                        backend=backend)
        masks = reference.esam_keep_masks([p.cpu() for p in params], [0.5] * 4, seed, offset)
        for p, b, m in zip(params, before, masks):
            assert torch.equal((p != b).cpu().reshape(-1), m), f"seed {seed} offset {offset}"
        out = torch.empty(sum((p.numel() + 3) // 4 * 4 for p in params))
        O.philox_(out, seed, offset, "bernoulli", p=0.5, backend="torch")
        assert torch.equal(out[:3].bool(), masks[0])  # the mask is philox_'s stream at the positions


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("stash_dtype", [None, torch.bfloat16], ids=["same", "bf16"])
def test_delta_stash_regenerates_the_mask(backend, device, stash_dtype):
    _skip(backend, device, "esam_restore_")
    shapes = [(7,), (40001,), (3, 3)]
    params, grads = _make(shapes, [torch.float32, torch.float32, torch.bfloat16], device)
    orig = [p.clone() for p in params]
    stash = [torch.empty_like(p, dtype=stash_dtype or p.dtype) for p in params]
    beta = [0.5, 0.25, 0.5]
    norm_ref, w64, es, masks = _expected(params, grads, [0.5] * 3, beta, [False] * 3, [0.0] * 3, 9, 0)
    O.esam_perturb_(params, grads, stash, 0.5, beta, 9, stash_mode="delta", backend=backend)
    for p, o, s, e in zip(params, orig, stash, es):
        # The stash holds e rounded to its dtype (0 where dropped); exactly that was added.
        torch.testing.assert_close(s.double().cpu().reshape(-1), e, rtol=2 * ULP[s.dtype], atol=1e-30)
        added = (o.double() + s.double()).to(p.dtype)
        torch.testing.assert_close(p.double(), added.double(), rtol=2 * ULP[p.dtype], atol=0)
    O.esam_restore_(params, stash, beta, 9, stash_mode="delta", backend=backend)
    for p, o, m in zip(params, orig, masks):
        # Dropped elements are bit exact (the restore never touches them); kept ones lossy.
        assert torch.equal(bits(p).reshape(-1)[~m], bits(o).reshape(-1)[~m])
        torch.testing.assert_close(p.double(), o.double(), rtol=4 * ULP[p.dtype], atol=4 * ULP[p.dtype])
    # A restore with another seed regenerates another mask: detectably wrong.
    O.esam_perturb_(params, grads, stash, 0.5, beta, 9, stash_mode="delta", backend=backend)
    O.esam_restore_(params, stash, beta, 10, stash_mode="delta", backend=backend)
    assert any((p.double() - o.double()).abs().max() > 1e-3 for p, o in zip(params, orig))


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_beta_one_is_sam(backend, device):
    _skip(backend, device)
    params, grads = _make([(5,), (300,), (4, 4)], [torch.float32] * 3, device)
    p2 = [p.clone() for p in params]
    O.esam_perturb_(params, grads, [torch.empty_like(p) for p in params], 0.1, 1.0, 3, backend=backend)
    O.sam_perturb_(p2, grads, [torch.empty_like(p) for p in p2], 0.1, eps=1e-7, backend="torch")
    for a, b in zip(params, p2):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_nonfinite_and_amp(backend, device):
    _skip(backend, device)
    shapes = [(9,), (3000,)]
    params, grads = _make(shapes, [torch.float32, torch.float32], device)
    masks = reference.esam_keep_masks([p.cpu() for p in params], [0.5, 0.5], 11, 0)
    dropped = int(torch.nonzero(~masks[1])[0])
    kept = int(torch.nonzero(masks[1])[0])
    orig = [p.clone() for p in params]
    stash = [torch.empty_like(p) for p in params]
    # An inf in a dropped element changes nothing: the norm is over the kept gradients.
    g = [x.clone() for x in grads]
    g[1][dropped] = math.inf
    norm = O.esam_perturb_(params, g, stash, 0.05, 0.5, 11, backend=backend)
    assert math.isfinite(norm.item())
    O.esam_restore_(params, stash, 0.5, 11, backend=backend)
    # One in a kept element: nothing is perturbed.
    g[1][kept] = math.nan
    norm = O.esam_perturb_(params, g, stash, 0.05, 0.5, 11, backend=backend)
    assert not math.isfinite(norm.item())
    assert all(torch.equal(p, o) for p, o in zip(params, orig))
    # Scaled gradients with grad_scale give the unscaled result; found_inf perturbs nothing.
    p2 = [p.clone() for p in params]
    n1 = O.esam_perturb_(params, grads, stash, 0.05, 0.5, 11, backend=backend)
    scale = torch.tensor(512.0, device=device)
    n2 = O.esam_perturb_(p2, [x * 512 for x in grads], [torch.empty_like(p) for p in p2], 0.05, 0.5, 11,
                         grad_scale=scale, backend=backend)
    assert n2.item() == pytest.approx(n1.item(), rel=1e-6)
    for a, b in zip(params, p2):
        torch.testing.assert_close(a, b, rtol=4 * ULP[a.dtype], atol=0)
    p3 = [o.clone() for o in orig]
    O.esam_perturb_(p3, grads, stash, 0.05, 0.5, 11, found_inf=torch.ones((), device=device), backend=backend)
    assert all(torch.equal(p, o) for p, o in zip(p3, orig))


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_float64_tight(backend, device):
    _skip(backend, device)
    params, grads = _make([(17,), (3, 300), (5000,)], [torch.float64] * 3, device)
    norm_ref, w64, es, _ = _expected(params, grads, [0.1] * 3, [0.7] * 3, [True, False, True], [0.2] * 3, 4, 2)
    norm = O.esam_perturb_(params, grads, [torch.empty_like(p) for p in params], 0.1, 0.7, 4, 2,
                           adaptive=[True, False, True], eta=0.2, backend=backend)
    assert norm.dtype == torch.float64 and norm.item() == pytest.approx(norm_ref, rel=1e-12)
    for p, w, e in zip(params, w64, es):
        torch.testing.assert_close(p.cpu().reshape(-1), w + e, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_bad_arguments(backend, device):
    _skip(backend, device)
    p = [torch.randn(4, device=device)]
    g = [torch.randn(4, device=device)]
    s = [torch.empty(4, device=device)]
    with pytest.raises(ValueError, match=r"beta\[0\] must be in \(0, 1\], got 0.0"):
        O.esam_perturb_(p, g, s, 0.05, 0.0, 1, backend=backend)
    with pytest.raises(ValueError, match=r"beta\[0\] must be in \(0, 1\], got 1.5"):
        O.esam_perturb_(p, g, s, 0.05, 1.5, 1, backend=backend)
    with pytest.raises(ValueError, match=r"rho\[0\] must be >= 0, got -0.1"):
        O.esam_perturb_(p, g, s, -0.1, 0.5, 1, backend=backend)
    with pytest.raises(ValueError, match="offset must be an integer"):
        O.esam_perturb_(p, g, s, 0.05, 0.5, 1, -3, backend=backend)
    with pytest.raises(ValueError, match="seed must be an integer"):
        O.esam_perturb_(p, g, s, 0.05, 0.5, 1.5, backend=backend)
    with pytest.raises(ValueError, match=r"beta\[0\] must be in \(0, 1\]"):
        O.esam_restore_(p, s, -1.0, 1, backend=backend)


def test_cpp_checks_the_same():
    """The C++ ops check their arguments themselves (a direct torch.ops call)."""
    _skip("cpu", "cpu")
    p, g, s = [torch.randn(4)], [torch.randn(4)], [torch.empty(4)]
    op = torch.ops.saf_kernels.esam_perturb_
    with pytest.raises(ValueError, match=r"beta\[0\] must be in \(0, 1\], got 2"):
        op(p, g, s, [0.05], [0.0], [2.0], [0], 1e-7, 1, 0, 0, None, None)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        op(p, g, s, [0.05], [0.0], [0.5], [0], 1e-7, 1, -1, 0, None, None)


def test_cpu_result_does_not_depend_on_threads_or_isa(monkeypatch):
    _skip("cpu", "cpu")
    params, grads = _make([(50000,), (17,), (70001,)], [torch.float32, torch.bfloat16, torch.float32], "cpu")
    out = {}
    prev = torch.get_num_threads()
    try:
        for threads, isa in ((1, "AVX2"), (2, "AVX2"), (2, "DEFAULT"), (2, "AVX512")):
            torch.set_num_threads(threads)
            monkeypatch.setenv("SAF_KERNELS_CPU_ISA", isa)
            ps = [p.clone() for p in params]
            n = O.esam_perturb_(ps, grads, [torch.empty_like(p) for p in ps], 0.05, 0.5, 77, backend="cpu")
            out[(threads, isa)] = (n, ps)
    finally:
        torch.set_num_threads(prev)
    # Same build, any thread count: the same bits (partials are summed in chunk order).
    assert torch.equal(out[(1, "AVX2")][0], out[(2, "AVX2")][0])
    assert all(torch.equal(a, b) for a, b in zip(out[(1, "AVX2")][1], out[(2, "AVX2")][1]))
    # Other builds: the same mask, values to rounding.
    ref = out[(2, "AVX2")][1]
    for key in ((2, "DEFAULT"), (2, "AVX512")):
        for a, b, p in zip(out[key][1], ref, params):
            assert torch.equal(a != p, b != p)
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    _skip(backend, "cpu")
    sfx = "_" if backend == "cpu" else "_triton"
    params, grads = _make([(5,), (3, 4)], [torch.float32, torch.float32], "cpu")
    stash = [torch.empty_like(p) for p in params]
    torch.library.opcheck(getattr(torch.ops.saf_kernels, "esam_perturb" + sfx),
                          (params, grads, stash, [0.05, 0.1], [0.0, 0.0], [0.5, 0.5], [0, 2], 1e-7, 3, 0, 0, None,
                           None))
    torch.library.opcheck(getattr(torch.ops.saf_kernels, "esam_restore" + sfx), (params, stash, [0.5], 3, 0, 1))


# ---------------------------------------------------------------------------------------------
# Sharpness-sensitive data selection
# ---------------------------------------------------------------------------------------------


def test_sds_counts():
    assert O.sds_count(0.5, 128) == 64
    assert O.sds_count(0.5, 1) == 1  # at least one sample (the official code crashes: k = 0)
    assert O.sds_count(0.01, 10) == 1
    assert O.sds_count(0.3, 10) == 3  # not 4: 0.3 * 10 = 3.0000000000000004 in floating point
    assert O.sds_count(0.5, 7) == 4  # ceil
    assert O.sds_count(1.0, 33) == 33
    for bad in (0.0, -0.5, 1.01, math.nan):
        with pytest.raises(ValueError, match="gamma must be in"):
            O.sds_count(bad, 10)


def test_sds_select_picks_the_largest_increases():
    for B in (1, 2, 7, 128):
        before = torch.randn(B)
        after = before + torch.randn(B)
        for gamma in (0.1, 0.5, 0.9, 1.0):
            idx = O.sds_select(before, after, gamma)
            k = O.sds_count(gamma, B)
            assert idx.dtype == torch.int64 and idx.numel() == k
            assert torch.equal(idx, torch.sort(idx).values)
            assert torch.equal(idx, reference.sds_select(before, after, gamma))
            diff = after - before
            rest = torch.ones(B, dtype=torch.bool)
            rest[idx] = False
            if rest.any():
                assert diff[idx].min() >= diff[rest].max()
    with pytest.raises(ValueError, match="per-sample loss vectors"):
        O.sds_select(torch.randn(4, 2), torch.randn(4, 2), 0.5)


# ---------------------------------------------------------------------------------------------
# The ESAM optimizer against a plain-PyTorch version of the official rule
# ---------------------------------------------------------------------------------------------

import copy  # noqa: E402
import functools  # noqa: E402
import random  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from saf_kernels.optim import ESAM, per_sample_closure  # noqa: E402
from saf_kernels.optim._rng import step_key  # noqa: E402

from .optim_models import assert_same_params, batches, esam_reference_step, make_model, per_sample  # noqa: E402

LOSS = functools.partial(F.cross_entropy, reduction="none")
OPT_PAIRS = [pytest.param("cpu", id="cpu"), pytest.param("torch", id="torch"),
             pytest.param("triton", marks=pytest.mark.triton, id="triton")]


@pytest.mark.parametrize("backend", OPT_PAIRS)
@pytest.mark.parametrize("stash_mode", ["copy", "delta"])
def test_esam_element_matches_reference(backend, stash_mode):
    _skip(backend if backend != "torch" else "torch", "cpu")
    model, ref = make_model(), make_model()
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.1, beta=0.5, gamma=0.5, seed=1234, stash_mode=stash_mode,
               backend=backend, **kw)
    sgd = torch.optim.SGD(ref.parameters(), **kw)
    for i, (x, y) in enumerate(batches(4)):
        key = step_key(1234, i)
        losses = opt.step(per_sample_closure(model, x, y, LOSS))
        assert losses.shape == (x.shape[0],) and not losses.requires_grad
        idx = esam_reference_step(ref, sgd, x, y, 0.1, 0.5, 0.5,
                                  lambda live, k=key: reference.esam_keep_masks(live, [0.5] * len(live), k, 0))
        assert torch.equal(opt.last_selected, idx), f"step {i}: SDS picked other samples"
        assert opt.last_selected.numel() == 12
        assert_same_params(model, ref, rtol=1e-10, atol=1e-12, what=f"{backend} step {i}")
    assert model.unused.grad is None


def test_esam_tensor_granularity_matches_reference_and_skips_gradients():
    model, ref = make_model(), make_model()
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.1, beta=0.5, gamma=0.75, swp="tensor", seed=7, lr=0.05,
               model=model)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05)
    rng = random.Random(7)  # the official per-tensor draw: random.random() per tensor
    names = [n for n, _ in model.named_parameters()]

    def draw():
        keep = [rng.random() < 0.5 for _ in names]
        if not any(keep):
            keep[rng.randrange(len(names))] = True
        return keep

    for i, (x, y) in enumerate(batches(4)):
        keep = draw()
        kept_names = {n for n, k in zip(names, keep) if k}
        # The first pass by hand: the dropped tensors get no gradient (autograd skipped them).
        with opt.first_pass():
            per_sample(model, x, y).mean().backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None}
        assert got == kept_names - {"unused"}, f"step {i}"
        assert all(p.requires_grad for p in model.parameters())
        opt.zero_grad()
        break
    # A clean run: optimizer vs reference, several steps.
    model, ref = make_model(), make_model()
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.1, beta=0.5, gamma=0.75, swp="tensor", seed=7, lr=0.05,
               model=model)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05)
    rng = random.Random(7)
    for i, (x, y) in enumerate(batches(4)):
        keep = draw()
        kept = {id(p) for p, k in zip(ref.parameters(), keep) if k}
        opt.step(per_sample_closure(model, x, y, LOSS))
        esam_reference_step(ref, sgd, x, y, 0.1, 0.5, 0.75,
                            lambda live: [torch.full((p.numel(),), id(p) in kept) for p in live])
        assert_same_params(model, ref, rtol=1e-10, atol=1e-12, what=f"tensor step {i}")


def test_sds_counts_in_the_optimizer():
    model = make_model()
    calls = []

    def closure(idx):
        calls.append(None if idx is None else idx.numel())
        return per_sample(model, x, y) if idx is None else per_sample(model, x[idx], y[idx])

    for B, gamma, k in ((7, 0.5, 4), (1, 0.5, 1), (10, 0.3, 3), (24, 1.0, 24), (24, 0.99, 24)):
        x, y = batches(1, B=B)[0]
        opt = ESAM(model.parameters(), torch.optim.SGD, gamma=gamma, lr=0.01)
        calls.clear()
        opt.step(closure)
        if k < B:  # pass 1, the no-grad forward at w + e, pass 2 on k samples
            assert calls == [None, None, k] and opt.last_selected.numel() == k
        else:  # every sample: no extra forward
            assert calls == [None, None] and opt.last_selected is None


def test_esam_bad_arguments():
    p = make_model().parameters()
    for kw, msg in ((dict(beta=0.0), r"beta must be in \(0, 1\], got 0.0"), (dict(beta=1.5), "got 1.5"),
                    (dict(gamma=0.0), r"gamma must be in \(0, 1\], got 0.0"), (dict(gamma=2), "got 2"),
                    (dict(rho=-0.1), "rho must be a finite number >= 0, got -0.1"),
                    (dict(swp="layer"), "swp must be 'element' or 'tensor', got 'layer'")):
        with pytest.raises(ValueError, match=msg):
            ESAM(p, torch.optim.SGD, lr=0.1, **kw)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['beta'\] must be in \(0, 1\], got 0"):
        m = make_model()
        ESAM([{"params": [m.l1.weight]}, {"params": [m.l2.weight], "beta": 0}], torch.optim.SGD, lr=0.1)
    model = make_model()
    opt = ESAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    with pytest.raises(TypeError, match="per-sample losses"):
        opt.step(lambda idx: F.cross_entropy(model(x), y))


@pytest.mark.parametrize("swp", ["element", "tensor"])
def test_esam_resume_is_exact(swp):
    data = batches(4)

    def run(model, opt, steps):
        for x, y in steps:
            opt.step(per_sample_closure(model, x, y, LOSS))

    m1 = make_model()
    o1 = ESAM(m1.parameters(), torch.optim.SGD, swp=swp, seed=3, lr=0.05, momentum=0.9)
    run(m1, o1, data[:2])
    # deepcopy: a state dict holds references to the live buffers (torch.save would copy them).
    ckpt = copy.deepcopy({"model": m1.state_dict(), "opt": o1.state_dict()})
    run(m1, o1, data[2:])
    m2 = make_model(seed=9)
    o2 = ESAM(m2.parameters(), torch.optim.SGD, swp=swp, seed=99, lr=0.05, momentum=0.9)
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    run(m2, o2, data[2:])
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_esam_amp_grad_scaler():
    """GradScaler: scaled losses, unscaled in the kernels; the same weights as without AMP (the
    scale is a power of two), and an overflow skips the step and backs off the scale."""
    data = batches(2)
    m1, m2 = make_model(dtype=torch.float32), make_model(dtype=torch.float32)
    o1 = ESAM(m1.parameters(), torch.optim.SGD, seed=5, lr=0.05)
    o2 = ESAM(m2.parameters(), torch.optim.SGD, seed=5, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in data:
        x = x.float()
        o1.step(per_sample_closure(m1, x, y, LOSS))
        o2.step(per_sample_closure(m2, x, y, LOSS), scaler=scaler)
        scaler.update()
    assert_same_params(m1, m2, rtol=1e-5, atol=1e-6, what="amp")
    before = [p.clone() for p in m2.parameters()]
    big = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    x, y = data[0]
    o2.step(per_sample_closure(m2, x.float() * 1e10, y, LOSS), scaler=big)
    big.update()
    assert all(torch.equal(p, b) for p, b in zip(m2.parameters(), before)), "an overflow must skip the step"
    assert big.get_scale() < 2.0**127


def test_esam_batchnorm_statistics_from_the_first_pass():
    model = make_model(bn=True)
    twin = make_model(bn=True)
    x, y = batches(1)[0]
    opt = ESAM(model.parameters(), torch.optim.SGD, lr=0.05, model=model)
    twin(x)  # one training forward at the clean weights
    opt.step(per_sample_closure(model, x, y, LOSS))
    assert torch.equal(model.bn.running_mean, twin.bn.running_mean)
    assert torch.equal(model.bn.num_batches_tracked, twin.bn.num_batches_tracked)
    # bn_first_pass_only=False: the three forwards update them (the official code).
    model = make_model(bn=True)
    opt = ESAM(model.parameters(), torch.optim.SGD, lr=0.05, model=model, bn_first_pass_only=False)
    opt.step(per_sample_closure(model, x, y, LOSS))
    assert int(model.bn.num_batches_tracked) == 3
