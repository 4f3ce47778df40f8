"""sam_perturb_, sam_restore_ and the fused restore + SGD / AdamW ops on every backend against the
float64 reference, on awkward tensor lists."""

from __future__ import annotations

import math

import pytest
import torch

from saf_kernels import _backend, reference
from saf_kernels import ops as O

from .helpers import FULL, KERNEL_PAIRS, bits, skip_unless_available

# Every kernel backend, plus the plain-PyTorch path (the fallback users get without kernels).
PAIRS = KERNEL_PAIRS + [pytest.param("torch", "cpu", id="torch-cpu")]
# Relative spacing of each dtype (an upper bound on one rounding, relative to the value).
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 2.0**-52}


def _skip(backend, device, op="sam_perturb_"):
    skip_unless_available(backend, device, op)


def _awkward_shapes(backend):
    """Many small tensors of odd sizes, one empty, and one large one whose size is not a
    multiple of any chunk (CPU 16384, Triton 16384, CUDA 65536) nor of the vector widths."""
    big = 70001 if backend != "triton" or FULL or torch.cuda.is_available() else 33331
    return [
        (3, 5),
        (1,),
        (64,),
        (7, 7, 3),
        (0,),
        (129,),
        (2, 3, 4, 5),
        (big,),
        (31,),
        (1000, 3),
        (5, 1, 1, 1),
    ]


def _dtypes_for(shapes, mixed):
    if not mixed:
        return [torch.float32] * len(shapes)
    cycle = [torch.float32, torch.bfloat16, torch.float32, torch.float16]
    return [cycle[i % len(cycle)] for i in range(len(shapes))]


def _make(shapes, dtypes, device, grad_scale=1.0):
    params = [torch.randn(s, dtype=torch.float64).to(device=device, dtype=d) for s, d in zip(shapes, dtypes)]
    grads = [
        (torch.randn(s, dtype=torch.float64) * grad_scale).to(device=device, dtype=d)
        for s, d in zip(shapes, dtypes)
    ]
    return params, grads


def _expected(params, grads, rho, adaptive, eta, eps=1e-12):
    """The perturbation in float64 from the (rounded) inputs, written out independently of
    reference.py: e = rho * T^2 * g / (||T g|| + eps), T = |w| + eta where adaptive, else 1."""
    w64 = [p.detach().double().cpu().clone() for p in params]
    g64 = [g.detach().double().cpu() for g in grads]
    ts = [(w.abs() + et) if a else torch.ones_like(w) for w, a, et in zip(w64, adaptive, eta)]
    norm = math.sqrt(sum(float(((t * g) ** 2).sum()) for t, g in zip(ts, g64)))
    es = [r * t * t * g / (norm + eps) for r, t, g in zip(rho, ts, g64)]
    return norm, w64, es


def _check_perturbed(params, w64, es, what):
    for i, (p, w, e) in enumerate(zip(params, w64, es)):
        got = p.detach().double().cpu()
        want = w + e
        # One rounding of w + e to the param's dtype (relative, or the subnormal spacing), plus
        # float32 arithmetic on e.
        tol = 2 * ULP[p.dtype] * want.abs() + torch.finfo(p.dtype).tiny * ULP[p.dtype] + 1e-5 * e.abs()
        bad = (got - want).abs() > tol
        assert not bad.any(), (
            f"{what}: tensor {i} ({p.dtype}, shape {tuple(p.shape)}): max err "
            f"{(got - want).abs().max().item():.3g}, e max {e.abs().max().item():.3g}"
        )


# ---------------------------------------------------------------------------------------------
# sam_perturb_ / sam_restore_
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "mixed"])
@pytest.mark.parametrize("asam", [False, True], ids=["sam", "asam"])
def test_perturb_matches_reference_and_restores_exactly(backend, device, mixed, asam):
    _skip(backend, device)
    shapes = _awkward_shapes(backend)
    params, grads = _make(shapes, _dtypes_for(shapes, mixed), device)
    n = len(params)
    rho = [0.05 + 0.01 * (i % 3) for i in range(n)]  # per-group rho
    adaptive = [asam and len(s) > 1 for s in shapes]  # ASAM's default: 1-D tensors unscaled
    eta = [0.01] * n
    orig = [p.clone() for p in params]
    stash = [torch.empty_like(p) for p in params]
    norm_ref, w64, es = _expected(params, grads, rho, adaptive, eta)
    norm = O.sam_perturb_(params, grads, stash, rho, adaptive=adaptive, eta=eta, backend=backend)
    assert norm.dtype == torch.float32 and norm.shape == () and norm.device.type == device
    assert norm.item() == pytest.approx(norm_ref, rel=1e-5)
    _check_perturbed(params, w64, es, f"{backend} mixed={mixed} asam={asam}")
    assert any(not torch.equal(p, o) for p, o in zip(params, orig)), "nothing was perturbed"
    O.sam_restore_(params, stash, backend=backend)
    for p, o in zip(params, orig):
        assert torch.equal(bits(p), bits(o)), "copy-mode restore must be bit exact"


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_float64_tight(backend, device):
    _skip(backend, device)
    shapes = [(17,), (3, 300), (5000,)]
    params, grads = _make(shapes, [torch.float64] * 3, device)
    stash = [torch.empty_like(p) for p in params]
    norm_ref, w64, es = _expected(params, grads, [0.1] * 3, [True, False, True], [0.2] * 3)
    norm = O.sam_perturb_(params, grads, stash, 0.1, adaptive=[True, False, True], eta=0.2, backend=backend)
    assert norm.dtype == torch.float64
    assert norm.item() == pytest.approx(norm_ref, rel=1e-12)
    for p, w, e in zip(params, w64, es):
        torch.testing.assert_close(p.cpu(), w + e, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("stash_dtype", [None, torch.bfloat16], ids=["same", "bf16"])
def test_delta_mode(backend, device, stash_dtype):
    _skip(backend, device)
    shapes = [(7,), (40001,), (3, 3)]
    params, grads = _make(shapes, [torch.float32, torch.float32, torch.bfloat16], device)
    orig = [p.clone() for p in params]
    stash = [torch.empty_like(p, dtype=stash_dtype or p.dtype) for p in params]
    norm_ref, w64, es = _expected(params, grads, [0.5] * 3, [False] * 3, [0.0] * 3)
    O.sam_perturb_(params, grads, stash, 0.5, stash_mode="delta", backend=backend)
    # The stash holds e rounded to its dtype, and that is exactly what was added.
    for p, o, s, e in zip(params, orig, stash, es):
        torch.testing.assert_close(s.double().cpu(), e, rtol=2 * ULP[s.dtype], atol=1e-30)
        added = (o.double() + s.double()).to(p.dtype)
        torch.testing.assert_close(p.double(), added.double(), rtol=2 * ULP[p.dtype], atol=0)
    O.sam_restore_(params, stash, stash_mode="delta", backend=backend)
    for p, o in zip(params, orig):  # lossy, by at most a couple of roundings
        torch.testing.assert_close(p.double(), o.double(), rtol=4 * ULP[p.dtype], atol=4 * ULP[p.dtype])


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_zero_gradients_give_no_nan(backend, device):
    _skip(backend, device)
    params, _ = _make([(5,), (300,)], [torch.float32, torch.bfloat16], device)
    grads = [torch.zeros_like(p) for p in params]
    orig = [p.clone() for p in params]
    stash = [torch.empty_like(p) for p in params]
    for adaptive in (False, True):
        norm = O.sam_perturb_(params, grads, stash, 0.05, adaptive=adaptive, backend=backend)
        assert norm.item() == 0.0
        for p, o in zip(params, orig):
            assert torch.equal(p, o)
        O.sam_restore_(params, stash, backend=backend)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("stash_mode", ["copy", "delta"])
def test_nonfinite_gradient_perturbs_nothing(backend, device, bad, stash_mode):
    _skip(backend, device)
    params, grads = _make([(5,), (20000,)], [torch.float32, torch.float32], device)
    grads[1][1234] = bad
    orig = [p.clone() for p in params]
    stash = [torch.empty_like(p) for p in params]
    norm = O.sam_perturb_(params, grads, stash, 0.05, stash_mode=stash_mode, backend=backend)
    assert not math.isfinite(norm.item())
    for p, o in zip(params, orig):
        assert torch.equal(p, o)
    O.sam_restore_(params, stash, stash_mode=stash_mode, backend=backend)
    for p, o in zip(params, orig):
        assert torch.equal(p, o)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_grad_scale_and_found_inf(backend, device):
    _skip(backend, device)
    shapes = [(9,), (3000,), (4, 4)]
    params, grads = _make(shapes, [torch.float32, torch.float32, torch.bfloat16], device)
    p2 = [p.clone() for p in params]
    scale = torch.tensor(1024.0, device=device)  # a power of two: scaling is exact
    scaled = [g * 1024.0 for g in grads]
    s1 = [torch.empty_like(p) for p in params]
    s2 = [torch.empty_like(p) for p in params]
    n1 = O.sam_perturb_(params, grads, s1, 0.05, adaptive=True, backend=backend)
    n2 = O.sam_perturb_(p2, scaled, s2, 0.05, adaptive=True, grad_scale=scale, backend=backend)
    assert n2.item() == pytest.approx(n1.item(), rel=1e-6)
    for a, b in zip(params, p2):
        torch.testing.assert_close(a, b, rtol=4 * ULP[a.dtype], atol=0)
    # found_inf > 0: nothing is perturbed, the stash still restores.
    p3 = [p.clone() for p in p2]
    O.sam_perturb_(
        p2, scaled, s2, 0.05, grad_scale=scale, found_inf=torch.ones((), device=device), backend=backend
    )
    for a, b in zip(p2, p3):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_empty_list(backend, device):
    _skip(backend, device)
    norm = O.sam_perturb_([], [], [], 0.05, backend=backend)
    assert norm.item() == 0.0
    O.sam_restore_([], [], backend=backend)
    O.sam_restore_sgd_([], [], [], [], lr=0.1, backend=backend)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_bad_arguments(backend, device):
    _skip(backend, device)
    p = [torch.randn(4, device=device), torch.randn(3, device=device)]
    g = [torch.randn(4, device=device), torch.randn(3, device=device)]
    s = [torch.empty(4, device=device), torch.empty(3, device=device)]
    with pytest.raises(ValueError, match=r"rho\[0\] must be >= 0, got -0.1"):
        O.sam_perturb_(p, g, s, -0.1, backend=backend)
    with pytest.raises(ValueError, match="grads has 1 tensors but params has 2"):
        O.sam_perturb_(p, g[:1], s, 0.05, backend=backend)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \[4\] but params\[1\] has shape \[3\]"):
        O.sam_perturb_(p, [g[0], torch.randn(4, device=device)], s, 0.05, backend=backend)
    with pytest.raises(TypeError, match=r"params\[1\] has dtype torch.int64|params\[1\] has dtype Long"):
        O.sam_perturb_([p[0], torch.ones(3, dtype=torch.long, device=device)], g, s, 0.05, backend=backend)
    with pytest.raises(TypeError, match=r"stash\[0\] has dtype"):
        O.sam_perturb_(p, g, [s[0].half(), s[1]], 0.05, backend=backend)
    with pytest.raises(ValueError, match="stash_mode"):
        O.sam_perturb_(p, g, s, 0.05, stash_mode="swap", backend=backend)
    with pytest.raises(ValueError, match="eps must be"):
        O.sam_perturb_(p, g, s, 0.05, eps=-1.0, backend=backend)
    with pytest.raises(ValueError, match=r"rho has 3 values for 2 tensors"):
        O.sam_perturb_(p, g, s, [0.1, 0.1, 0.1], backend=backend)
    with pytest.raises(ValueError, match="not dense"):
        big = torch.randn(4, 6, device=device)[:, ::2]
        O.sam_perturb_(
            [big],
            [torch.randn(4, 3, device=device)[:, :]],
            [torch.empty(4, 3, device=device)],
            0.05,
            backend=backend,
        )
    with pytest.raises(TypeError, match="list or tuple"):
        O.sam_perturb_(p[0], g, s, 0.05, backend=backend)


def test_cpu_result_does_not_depend_on_threads():
    _skip("cpu", "cpu")
    params, grads = _make([(50000,), (17,), (70000,)], [torch.float32] * 3, "cpu")
    out = []
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ps = [p.clone() for p in params]
            n = O.sam_perturb_(ps, grads, [torch.empty_like(p) for p in ps], 0.05, backend="cpu")
            out.append((n, ps))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))


@pytest.mark.parametrize("isa", ["DEFAULT", "AVX2", "AVX512"])
def test_cpu_isa_builds_agree(monkeypatch, isa):
    _skip("cpu", "cpu")
    shapes = [(3,), (20001,), (7, 5)]
    params, grads = _make(shapes, [torch.float32, torch.float32, torch.bfloat16], "cpu")
    norm_ref, w64, es = _expected(params, grads, [0.05] * 3, [True] * 3, [0.01] * 3)
    monkeypatch.setenv("SAF_KERNELS_CPU_ISA", isa)
    norm = O.sam_perturb_(
        params, grads, [torch.empty_like(p) for p in params], 0.05, adaptive=True, eta=0.01, backend="cpu"
    )
    assert norm.item() == pytest.approx(norm_ref, rel=1e-5)
    _check_perturbed(params, w64, es, f"isa {isa}")


# ---------------------------------------------------------------------------------------------
# Fused restore + SGD / AdamW against torch.optim
# ---------------------------------------------------------------------------------------------


def _perturbed_setup(device, shapes, dtypes):
    params, grads = _make(shapes, dtypes, device)
    orig = [p.clone() for p in params]
    stash = [torch.empty_like(p) for p in params]
    O.sam_perturb_(params, grads, stash, 0.3, backend="torch")
    grads2 = [torch.randn_like(p) for p in params]
    return params, orig, stash, grads2


SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
    dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-3, maximize=True),
]


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_fused_restore_sgd_matches_torch(backend, device, cfg):
    _skip(backend, device, "sam_restore_sgd_")
    shapes = [(5,), (3, 7), (20001,)]
    dtypes = [torch.float32, torch.float32, torch.float32]
    params, orig, stash, g2 = _perturbed_setup(device, shapes, dtypes)
    ref = [o.clone().requires_grad_() for o in orig]
    opt = torch.optim.SGD(ref, **cfg, foreach=False)
    mom = cfg.get("momentum", 0.0)
    bufs = [torch.zeros_like(p) for p in params] if mom else []
    for step in range(3):
        for r, g in zip(ref, g2):
            r.grad = g.clone()
        opt.step()
        O.sam_restore_sgd_(
            params,
            g2,
            stash,
            bufs,
            lr=cfg["lr"],
            weight_decay=cfg.get("weight_decay", 0.0),
            momentum=mom,
            dampening=cfg.get("dampening", 0.0),
            nesterov=cfg.get("nesterov", False),
            maximize=cfg.get("maximize", False),
            first_run=step == 0,
            backend=backend,
        )
        for p, r in zip(params, ref):
            torch.testing.assert_close(p, r.detach(), rtol=1e-6, atol=1e-7)
        # Perturb again from the new weights, as the next SAM step would.
        O.sam_perturb_(params, g2, stash, 0.3, backend="torch")
        g2 = [torch.randn_like(p) for p in params]


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_fused_restore_sgd_amp(backend, device):
    _skip(backend, device, "sam_restore_sgd_")
    params, orig, stash, g2 = _perturbed_setup(device, [(6,), (3000,)], [torch.float32, torch.bfloat16])
    bufs = [torch.randn_like(p) for p in params]
    bufs0 = [b.clone() for b in bufs]
    scale = torch.tensor(256.0, device=device)
    # found_inf: the weights are restored, the buffers untouched.
    O.sam_restore_sgd_(params, [g * 256 for g in g2], stash, bufs, lr=0.1, momentum=0.9, grad_scale=scale,
                       found_inf=torch.ones((), device=device), backend=backend)
    assert all(torch.equal(p, o) for p, o in zip(params, orig))
    assert all(torch.equal(b, c) for b, c in zip(bufs, bufs0))
    # Scaled gradients give the unscaled result.
    p2 = [p.clone() for p in params]
    b2 = [b.clone() for b in bufs]
    s2 = [p.clone() for p in params]
    O.sam_restore_sgd_(params, [g * 256 for g in g2], [p.clone() for p in params], bufs, lr=0.1, momentum=0.9,
                       grad_scale=scale, found_inf=torch.zeros((), device=device), backend=backend)
    O.sam_restore_sgd_(p2, g2, s2, b2, lr=0.1, momentum=0.9, backend=backend)
    for a, b in zip(params + bufs, p2 + b2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


ADAMW_CONFIGS = [
    dict(lr=1e-3),
    dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    dict(lr=1e-3, betas=(0.5, 0.9), maximize=True),
]


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("cfg", ADAMW_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_fused_restore_adamw_matches_torch(backend, device, cfg):
    _skip(backend, device, "sam_restore_adamw_")
    params, orig, stash, g2 = _perturbed_setup(device, [(5,), (3, 7), (20001,)], [torch.float32] * 3)
    ref = [o.clone().requires_grad_() for o in orig]
    opt = torch.optim.AdamW(ref, **cfg, foreach=False)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=device) for _ in params]
    b1, b2 = cfg.get("betas", (0.9, 0.999))
    for _ in range(3):
        for r, g in zip(ref, g2):
            r.grad = g.clone()
        opt.step()
        torch._foreach_add_(steps, 1.0)
        O.sam_restore_adamw_(
            params,
            g2,
            stash,
            m,
            v,
            steps,
            lr=cfg["lr"],
            beta1=b1,
            beta2=b2,
            eps=cfg.get("eps", 1e-8),
            weight_decay=cfg.get("weight_decay", 1e-2),
            maximize=cfg.get("maximize", False),
            backend=backend,
        )
        for p, r in zip(params, ref):
            torch.testing.assert_close(p, r.detach(), rtol=1e-5, atol=1e-6)
        O.sam_perturb_(params, g2, stash, 0.3, backend="torch")
        g2 = [torch.randn_like(p) for p in params]


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------


def _op_args(device):
    params, grads = _make([(5,), (3, 4)], [torch.float32, torch.float32], device)
    stash = [torch.empty_like(p) for p in params]
    return params, grads, stash


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    _skip(backend, "cpu")

    def op(name):
        return getattr(torch.ops.saf_kernels, name + "_" if backend == "cpu" else f"{name}_triton")

    p, g, s = _op_args("cpu")
    torch.library.opcheck(op("sam_perturb"), (p, g, s, [0.05, 0.1], [0.0, 0.0], [0, 2], 1e-12, 0, None, None))
    torch.library.opcheck(op("sam_restore"), (p, s, 0))
    bufs = [torch.zeros_like(x) for x in p]
    torch.library.opcheck(
        op("sam_restore_sgd"), (p, g, s, bufs, [0.1], [0.0], [0.9], [0.0], [8], 0, None, None)
    )
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    steps = [torch.ones(()) for _ in p]
    torch.library.opcheck(
        op("sam_restore_adamw"),
        (p, g, s, m, v, steps, [1e-3], [0.9], [0.999], [1e-8], [0.01], [0], 0, None, None),
    )
    ema = [torch.randn_like(x) for x in p]
    name = "ema_update_" if backend == "cpu" else "ema_update_triton"
    torch.library.opcheck(getattr(torch.ops.saf_kernels, name), (ema, p, 0.9, None))


def test_backends_listed():
    # The four new C++ ops are registered for CPU whenever the extension is built.
    if not _backend.HAS_EXT:
        pytest.skip("extension not built")
    for op in ("sam_perturb_", "sam_restore_", "sam_restore_sgd_", "sam_restore_adamw_", "ema_update_"):
        assert _backend.missing("cpu", torch.device("cpu"), op) is None


def test_reference_is_sync_free_shape():
    # The reference returns a device tensor and takes tensors for the AMP scale and found_inf.
    params, grads = _make([(4,)], [torch.float32], "cpu")
    out = reference.sam_perturb_(
        params,
        grads,
        [torch.empty_like(params[0])],
        [0.05],
        [False],
        [0.0],
        1e-12,
        torch.tensor(2.0),
        torch.tensor(0.0),
    )
    assert isinstance(out, torch.Tensor) and out.dim() == 0


def test_torch_compile_fullgraph():
    _skip("cpu", "cpu")
    params, grads = _make([(10,), (3, 4)], [torch.float32, torch.bfloat16], "cpu")
    ref = [p.clone() for p in params]
    st, rs = [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(ps, gs, st):
        return O.sam_perturb_(ps, gs, st, 0.05, adaptive=True, backend="cpu") * 2

    out = step(params, grads, st)
    want = O.sam_perturb_(ref, grads, rs, 0.05, adaptive=True, backend="cpu") * 2
    assert torch.equal(out, want)
    assert all(torch.equal(a, b) for a, b in zip(params, ref))


def test_benchmark_param_shapes_match_torchvision():
    from saf_kernels.bench import param_shapes as ps

    for name, make in ps.MODELS.items():
        assert ps.numel(make()) == ps.NUM_PARAMS[name], name
    assert len(ps.MODELS["resnet50"]()) == 161 and len(ps.MODELS["resnet18"]()) == 62


def test_serialised_plan_layout():
    """The bytes the CUDA kernels read (csrc/include/saf/multi_tensor.h), checked on the CPU: header,
    per-tensor entries and a chunk map that covers every element exactly once."""
    if not _backend.HAS_EXT:
        pytest.skip("extension not built")
    import numpy as np

    dt = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float64]
    params = [torch.randn(s).to(d) for s, d in zip([(5, 3), (100,), (0,), (7,), (300,)], dt)]
    params.append(torch.randn(9)[1:])  # storage offset 4 bytes: not 16-byte aligned
    grads = [torch.randn_like(p) for p in params]
    stash = [torch.empty_like(p) for p in params]
    rho = [0.1 * i for i in range(len(params))]
    eta = [0.5] * len(params)
    flags = [2 * (i % 2) for i in range(len(params))]
    chunk = 64
    raw = torch.ops.saf_kernels._sam_perturb_plan(params, grads, stash, rho, eta, flags, chunk).numpy()
    n_tensors, n_chunks, chunk_size, t_off, c_off = raw[:40].view(np.int64)
    n_lists = raw[40:44].view(np.int32)[0]
    assert (n_tensors, chunk_size, n_lists) == (len(params), chunk, 3)
    entry = np.dtype([("ptr", "<i8", 6), ("numel", "<i8"), ("rng_offset", "<i8"), ("param", "<f8", 8),
                      ("dtype", "<i4", 6), ("flags", "<i4"), ("reserved", "<i4")])
    assert entry.itemsize == 160
    entries = raw[t_off:t_off + n_tensors * 160].view(entry)
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
    offset = 0
    for i, (p, g, s, e) in enumerate(zip(params, grads, stash, entries)):
        assert list(e["ptr"][:3]) == [p.data_ptr(), g.data_ptr(), s.data_ptr()]
        assert e["numel"] == p.numel() and e["rng_offset"] == offset
        assert list(e["dtype"][:3]) == [codes[p.dtype]] * 3 and list(e["dtype"][3:]) == [-1] * 3
        assert e["param"][0] == pytest.approx(rho[i]) and e["param"][1] == 0.5
        aligned = all(t.data_ptr() % (4 * t.element_size()) == 0 for t in (p, g, s))
        assert e["flags"] == flags[i] | (1 if aligned else 0)
        offset += p.numel()
    assert entries[-1]["flags"] & 1 == 0
    chunks = raw[c_off:c_off + n_chunks * 8].view(np.int32).reshape(-1, 2)
    covered = {i: np.zeros(p.numel(), dtype=int) for i, p in enumerate(params)}
    for t, c in chunks:  # what chunk_ref() computes on the device
        start = c * chunk
        n = min(chunk, entries[t]["numel"] - start)
        assert n > 0
        covered[t][start:start + n] += 1
    assert all((v == 1).all() for v in covered.values())
    assert len(raw) == c_off + n_chunks * 8


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_strides_of_size_one_dims_do_not_matter(backend, device):
    """A [1, 7] view with strides (1, 1) (the transpose of a [7, 1]) lies in memory as a contiguous
    [1, 7] (strides (7, 1)): the lists share one element order, and every op takes them (the
    strides of a dimension of size 1 are arbitrary in torch)."""
    _skip(backend, device)
    g = torch.Generator().manual_seed(3)
    p = torch.randn(7, 1, generator=g).t().to(device)
    grad = torch.randn(1, 7, generator=g).to(device)
    assert p.stride() == (1, 1) and grad.stride() == (7, 1)
    want = p.double() + 0.05 * grad.double() / grad.double().norm()
    stash = [torch.empty_like(grad)]
    O.sam_perturb_([p], [grad], stash, 0.05, backend=backend)
    torch.testing.assert_close(p.double(), want, rtol=1e-6, atol=1e-7)
    O.sam_restore_([p], stash, backend=backend)
    torch.testing.assert_close(p.double(), want - 0.05 * grad.double() / grad.double().norm(), rtol=1e-6, atol=1e-6)
