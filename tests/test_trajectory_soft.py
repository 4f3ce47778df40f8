"""Probability ("soft") targets in the fused loss, the bank step, SAF and MESA, on every backend,
against the float64 reference (which uses F.cross_entropy with probability targets): mixup and
cutmix targets, one-hot targets equal to index targets, label smoothing folded in, awkward C,
bad values, opcheck, gradcheck, torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import saf_kernels as sk
from saf_kernels import reference
from saf_kernels.ops import trajectory_bank as tb
from saf_kernels.ops import trajectory_loss as tl_ops

from .helpers import FULL, HAS_CUDA, KERNEL_PAIRS, skip_unless_available
from .test_trajectory_bank import batch_ids, make_bank, random_history
from .tolerances import assert_close

ALL_PAIRS = KERNEL_PAIRS + [pytest.param("torch", "cpu", id="torch-cpu")]
SOFT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def mixup_targets(B, C, device, dtype=torch.float32, smoothing=0.0, generator=None):
    """timm-style mixup targets: lam * y_a + (1 - lam) * y_b of (smoothed) one-hot rows, with the
    batch mixed with its flip and lam ~ Beta(0.8, 0.8)."""
    y = torch.randint(0, C, (B,), generator=generator)
    off, on = smoothing / C, 1.0 - smoothing + smoothing / C
    hot = torch.full((B, C), off, dtype=torch.float64).scatter_(1, y[:, None], on)
    lam = float(torch.distributions.Beta(0.8, 0.8).sample())
    return (lam * hot + (1 - lam) * hot.flip(0)).to(device=device, dtype=dtype)


def cutmix_targets(B, C, device, dtype=torch.float32):
    """cutmix: per row a box area ratio r, targets r * y_a + (1 - r) * y_b (also random soft rows)."""
    y_a, y_b = torch.randint(0, C, (B,)), torch.randint(0, C, (B,))
    r = torch.rand(B, 1, dtype=torch.float64)
    t = r * F.one_hot(y_a, C).double() + (1 - r) * F.one_hot(y_b, C).double()
    return t.to(device=device, dtype=dtype)


def dense_targets(B, C, device, dtype=torch.float32):
    """Every class non-zero (a teacher's softmax, heavy label smoothing)."""
    return torch.softmax(torch.randn(B, C, dtype=torch.float64) * 2, -1).to(device=device, dtype=dtype)


TARGETS = {"mixup": lambda B, C, d, dt: mixup_targets(B, C, d, dt, smoothing=0.1), "cutmix": cutmix_targets,
           "dense": dense_targets}


def _inputs(B, C, dtype, device, scale=3.0):
    z = (torch.randn(B, C, dtype=torch.float64) * scale).to(device=device, dtype=dtype).requires_grad_()
    t = (torch.randn(B, C, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return z, t


def _ref(z, y, t, lam, T):
    z64 = z.detach().to(torch.float64).requires_grad_()
    out = reference.saf_loss(z64, y, t, lam, T)
    (g,) = torch.autograd.grad(out, z64)
    return out, g


def _shapes(backend):
    quick = [(1, 10), (7, 1000), (5, 1271), (2, 9000)]
    if backend != "triton" or FULL or HAS_CUDA:
        quick += [(64, 10), (3, 50257)]
    return quick


# ---------------------------------------------------------------------------------------------
# saf_loss with probability targets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_saf_loss_soft_matches_reference(backend, device, dtype):
    skip_unless_available(backend, device)
    for i, (B, C) in enumerate(_shapes(backend)):
        for kind, make in TARGETS.items():
            T, lam = ((1.0, 0.3), (2.0, 0.8), (5.0, 0.3))[i % 3]
            y_dtype = SOFT_DTYPES[(i + len(kind)) % 4]
            z, t = _inputs(B, C, dtype, device)
            y = make(B, C, device, y_dtype)
            out = sk.saf_loss(z, y, t, lam, T, backend=backend)
            assert out.dtype == dtype and out.dim() == 0
            ref, ref_g = _ref(z, y, t, lam, T)
            what = f"{backend} {dtype} {kind} targets {y_dtype} B={B} C={C} T={T}"
            assert_close(out, ref, dtype, what + " loss")
            (g,) = torch.autograd.grad(out * 0.37, z)
            assert_close(g, ref_g * 0.37, dtype, what + " grad")


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
def test_one_hot_targets_equal_index_targets(backend, device):
    """One-hot rows give the index-target loss and gradient; smoothed one-hot rows give the
    index-target loss with label_smoothing (what folding it into the targets means); rows scaled by
    0.5 halve the CE, as F.cross_entropy's (rows need not sum to 1)."""
    skip_unless_available(backend, device)
    for B, C, T in ((6, 10, 2.0), (5, 1271, 5.0)):
        z, t = _inputs(B, C, torch.float32, device)
        y = torch.randint(0, C, (B,), device=device)
        hot = F.one_hot(y, C).float()
        for eps in (0.0, 0.1):
            soft = hot * (1 - eps) + eps / C
            a = sk.saf_loss(z, soft, t, 0.3, T, backend=backend)
            b = sk.saf_loss(z, y, t, 0.3, T, label_smoothing=eps, backend=backend)
            assert_close(a, b, torch.float32, f"eps={eps} loss")
            assert_close(torch.autograd.grad(a, z)[0], torch.autograd.grad(b, z)[0], torch.float32, f"eps={eps} grad")
        half = sk.saf_loss(z, 0.5 * hot, t, 0.0, T, backend=backend)
        assert_close(half, 0.5 * F.cross_entropy(z.detach().double(), y), torch.float32, "half rows")


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_soft_strided_and_expanded_targets(backend, device):
    """Targets as a strided view, a column-major view and an expanded row."""
    skip_unless_available(backend, device)
    B, C = 6, 37
    z, t = _inputs(B, C, torch.float32, device)
    big = dense_targets(B, 2 * C, device)
    views = {
        "strided": big[:, :C],
        "column-major": dense_targets(C, B, device).t(),
        "expanded": dense_targets(1, C, device).expand(B, C),
    }
    for name, y in views.items():
        out = sk.saf_loss(z, y, t, 0.5, 2.0, backend=backend)
        ref, ref_g = _ref(z, y, t, 0.5, 2.0)
        assert_close(out, ref, torch.float32, name + " loss")
        assert_close(torch.autograd.grad(out, z)[0], ref_g, torch.float32, name + " grad")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
@pytest.mark.parametrize("bad", ["negative", "nan", "inf"])
def test_bad_probabilities(backend, device, bad):
    """CPU kernel and reference (CPU tensors) raise ValueError naming the row, column and value;
    the GPU kernels cannot raise without a host sync and make that row's loss and gradient NaN."""
    skip_unless_available(backend, device)
    z, t = _inputs(4, 10, torch.float32, device)
    y = dense_targets(4, 10, device)
    value = {"negative": -0.25, "nan": float("nan"), "inf": float("inf")}[bad]
    y[2, 3] = value
    if backend in ("cpu", "torch") and device == "cpu":
        with pytest.raises(ValueError, match=rf"probability targets must be finite and >= 0; row 2 holds {value} at "
                                             r"column 3"):
            sk.saf_loss(z, y, t, backend=backend)
        return
    rows, g = tl_ops.fused_ops()[backend](z.detach(), t, y, 5.0, 1.0, 0.3, 0.0, -100, 0, True)
    assert torch.isnan(rows[2]) and torch.all(torch.isfinite(rows[[0, 1, 3]]))
    assert torch.all(torch.isnan(g[2])) and torch.all(torch.isfinite(g[[0, 1, 3]]))


def test_soft_target_argument_errors():
    z = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10)
    y = dense_targets(4, 10, "cpu")
    cases = [
        (lambda: sk.saf_loss(z, y[:3], t), ValueError, r"probability targets must have the logits' shape \(4, 10\), "
                                                         r"got \(3, 10\)"),
        (lambda: sk.saf_loss(z, y[:, 0], t), ValueError, r"probability targets must have the logits' shape"),
        (lambda: sk.saf_loss(z, y.to(torch.complex64), t), TypeError, "floating probabilities, got torch.complex64"),
        (lambda: sk.saf_loss(z, torch.zeros(4, 10, dtype=torch.long), t), ValueError,
         r"class-index targets must have shape \(4,\), got \(4, 10\)"),
        (lambda: sk.saf_loss(z, y.bool(), t), TypeError, "int64 or int32 class indices or floating probabilities"),
        (lambda: sk.saf_loss(z, y, t, label_smoothing=0.1), ValueError,
         r"label_smoothing=0\.1 applies to class-index targets; with probability targets fold it into them"),
        (lambda: sk.saf_loss(z, y.to("meta"), t), ValueError, "targets are on meta but logits are on cpu"),
        (lambda: sk.SAF(10, 10, label_smoothing=0.1)(z, y, torch.arange(4), 0), ValueError,
         "label_smoothing=0.1 applies to class-index targets"),
        (lambda: sk.MESA(torch.nn.Linear(3, 10), label_smoothing=0.1)(z, y, torch.randn(4, 3), 0), ValueError,
         "label_smoothing=0.1 applies to class-index targets"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_cpp_op_checks_probability_targets():
    skip_unless_available("cpu", "cpu")
    op = torch.ops.saf_kernels.trajectory_loss
    z = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="probability targets must have the logits' shape"):
        op(z, z, torch.rand(3, 10), 1.0, 1.0, 1.0, 0.0, -100, 0, False)
    with pytest.raises(RuntimeError, match="label_smoothing .* applies to class-index labels"):
        op(z, z, torch.rand(4, 10), 1.0, 1.0, 1.0, 0.1, -100, 0, False)


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
def test_soft_gradcheck_float64(backend, device):
    skip_unless_available(backend, device)
    z = torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randn(3, 7, dtype=torch.float64, device=device)
    y = dense_targets(3, 7, device, torch.float64)
    assert torch.autograd.gradcheck(lambda a: sk.saf_loss(a, y, t, 0.5, 2.0, backend=backend), (z,))


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_soft_opcheck(backend, device):
    skip_unless_available(backend, device)
    op = tl_ops.fused_ops()[backend]
    for dtype, y_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float16)):
        z, t = _inputs(4, 33, dtype, device)
        y = dense_targets(4, 33, device, y_dtype)
        for reduction in (0, 2):
            torch.library.opcheck(op, (z, t, y, 2.0, 1.0, 0.3, 0.0, -100, reduction, True))
        torch.library.opcheck(op, (z.detach(), t, y, 2.0, 1.0, 0.3, 0.0, -100, 1, False))


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_soft_torch_compile_fullgraph(backend, device):
    skip_unless_available(backend, device)
    torch._dynamo.reset()
    z, t = _inputs(8, 100, torch.float32, device)
    y = mixup_targets(8, 100, device, smoothing=0.1)

    def step(z, y, t):
        return sk.saf_loss(z * 1.5, y, t, 0.3, 5.0, backend=backend)

    out = torch.compile(step, fullgraph=True)(z, y, t)
    ref = step(z, y, t)
    assert_close(out, ref, torch.float32, "compiled loss")
    assert_close(torch.autograd.grad(out, z)[0], torch.autograd.grad(ref, z)[0], torch.float32, "compiled grad")


# ---------------------------------------------------------------------------------------------
# The bank step, SAF and MESA with probability targets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
def test_bank_step_soft_matches_reference(backend, device):
    skip_unless_available(backend, device, "saf_bank_step")
    cases = [(5, 3, 1, 10), (50, 3, 7, 1000), (9, 2, 5, 1271)]
    if backend != "triton" or FULL or HAS_CUDA:
        cases.append((20, 3, 3, 9000))
    for (N, S, B, C), bank_dtype, z_dtype in zip(cases, (torch.float32, torch.bfloat16, torch.float16, torch.bfloat16),
                                                  (torch.float32, torch.bfloat16, torch.float32, torch.float16)):
        epoch = S + 2
        bank = make_bank(N, S, C, bank_dtype)
        random_history(bank, epoch)
        bank = [x.to(device) for x in bank]
        ref_bank = [x.clone() for x in bank]
        ids = batch_ids(N, B).to(device)
        z = (torch.randn(B, C, dtype=torch.float64) * 3).to(device=device, dtype=z_dtype).requires_grad_()
        y = cutmix_targets(B, C, device, torch.bfloat16 if B % 2 else torch.float32)
        z64 = z.detach().double().requires_grad_()
        ref, ref_counts = reference.saf_bank_step(z64, y, ids, ref_bank[0], ref_bank[1], epoch, 5.0, 1.0, 0.3)
        (ref_g,) = torch.autograd.grad(ref, z64)
        loss, counts = tb.trajectory_bank_step(z, y, ids, *bank, epoch, 0.3, 5.0, backend=backend)
        what = f"{backend} N={N} B={B} C={C} {bank_dtype} {z_dtype}"
        assert torch.isfinite(loss), what
        assert_close(loss, ref, z_dtype, what + " loss")
        assert_close(torch.autograd.grad(loss, z)[0], ref_g, z_dtype, what + " grad")
        assert counts.tolist() == ref_counts.tolist() and int(counts[0]) == B, what
        assert torch.equal(bank[1], ref_bank[1]), what
        torch.testing.assert_close(bank[0], ref_bank[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
def test_bank_step_bad_probability(backend, device):
    """CPU and reference raise before touching the bank; the GPU kernels give a NaN loss."""
    skip_unless_available(backend, device, "saf_bank_step")
    bank = make_bank(6, 2, 5, device=device)
    random_history(bank, 2, p_valid=1.0)
    before = [x.clone() for x in bank]
    y = dense_targets(3, 5, device)
    y[1, 4] = -1.0
    z = torch.randn(3, 5, device=device)
    if backend in ("cpu", "torch"):
        with pytest.raises(ValueError, match=r"row 1 holds -1 at column 4"):
            tb.trajectory_bank_step(z, y, torch.tensor([0, 1, 2], device=device), *bank, 2, backend=backend)
        for a, b in zip(bank, before):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    else:
        loss, _ = tb.trajectory_bank_step(z, y, torch.tensor([0, 1, 2], device=device), *bank, 2, backend=backend)
        assert torch.isnan(loss)


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_bank_step_soft_opcheck_and_compile(backend, device):
    skip_unless_available(backend, device, "saf_bank_step")
    bank = make_bank(20, 3, 33, torch.bfloat16, device)
    random_history(bank, 4)
    bank[0].nan_to_num_(0.0)
    z = torch.randn(6, 33, device=device, requires_grad=backend != "triton")
    y = dense_targets(6, 33, device)
    ids = batch_ids(20, 6).to(device)
    torch.library.opcheck(tb.fused_ops()[backend], (z, y, ids, *bank, 4, 2.0, 1.0, 0.3, 0.0, -100, True, True, True))
    torch._dynamo.reset()
    eager = [x.clone() for x in bank]
    zz = torch.randn(6, 33, device=device, requires_grad=True)

    def step(z, bank):
        return tb.trajectory_bank_step(z * 1.5, y, ids, *bank, 5, 0.3, 5.0, backend=backend)

    out, counts = torch.compile(step, fullgraph=True)(zz, bank)
    ref, ref_counts = step(zz, eager)
    assert_close(out, ref, torch.float32, "compiled loss")
    assert torch.equal(counts, ref_counts)
    assert_close(torch.autograd.grad(out, zz)[0], torch.autograd.grad(ref, zz)[0], torch.float32, "compiled grad")
    for a, b in zip(bank, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
def test_saf_with_mixup_targets_is_soft_ce_plus_trajectory_term(backend, device):
    """SAF(...)(logits, mixup_targets, ids, epoch) = CE with probability targets + lam * T^2 *
    KL(past || now), the official loss with its cross-entropy on soft targets."""
    skip_unless_available(backend, device, "saf_bank_step")
    N, C, B, delay, start, lam, T = 16, 10, 8, 1, 1, 0.3, 5.0
    saf = sk.SAF(N, C, lam=lam, temperature=T, delay=delay, start_epoch=start, dtype=torch.float32,
                 backend=backend)
    history = {}
    for epoch in range(start + 2):
        for s in range(0, N, B):
            idx = torch.arange(s, s + B, device=device)
            z = (torch.randn(B, C) * 2).to(device).requires_grad_()
            y = mixup_targets(B, C, device, smoothing=0.1)
            loss = saf(z, y, idx, epoch)
            expected = F.cross_entropy(z.detach().double(), y.double())
            if epoch >= start:
                past = torch.stack([history[(epoch - delay, int(i))] for i in idx]).to(device)
                expected = expected + lam * reference.trajectory_kl_rows(z.detach().double(), past, T).mean()
            assert_close(loss, expected, torch.float32, f"{backend} epoch {epoch}")
            for i, row in zip(idx.tolist(), z.detach().cpu()):
                history[(epoch, i)] = row


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
def test_mesa_with_soft_targets(backend, device):
    skip_unless_available(backend, device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).to(device)
    mesa = sk.MESA(model, lam=0.8, temperature=2.0, start_epoch=1, backend=backend)
    x = torch.randn(8, 6, device=device)
    y = cutmix_targets(8, 5, device, torch.bfloat16)
    before = mesa(model(x), y, x, epoch=0)
    assert_close(before, F.cross_entropy(model(x).detach().double(), y.double()), torch.float32, "warm-up")
    with torch.no_grad():
        model[0].weight.add_(0.1)  # the teacher now differs from the model
    out = mesa(model(x), y, x, epoch=1)
    with torch.no_grad():
        teacher = mesa.teacher(x)
    expected = reference.saf_loss(model(x).detach().double(), y, teacher, 0.8, 2.0)
    assert_close(out, expected, torch.float32, "MESA soft")
    out.backward()
    assert model[0].weight.grad is not None
