"""trajectory_kl_loss and saf_loss on every backend against the float64 reference."""

from __future__ import annotations

import math
import os

import pytest
import torch

import saf_kernels as sk
from saf_kernels import reference
from saf_kernels.ops import trajectory_loss as tl_ops

from .helpers import FULL, KERNEL_PAIRS, skip_unless_available
from .tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "sum", "mean", "batchmean"]


def _inputs(B, C, dtype, device, target_dtype=None, scale=3.0):
    z = (torch.randn(B, C, dtype=torch.float64) * scale).to(device=device, dtype=dtype).requires_grad_()
    t = (torch.randn(B, C, dtype=torch.float64) * scale).to(device=device, dtype=target_dtype or dtype)
    y = torch.randint(0, C, (B,), device=device)
    return z, t, y


def _ref_grad(fn, z, *args, weight=None):
    """Reference value and gradient in float64 on the same (rounded) inputs."""
    z64 = z.detach().to(torch.float64).requires_grad_()
    out = fn(z64, *args)
    w = torch.ones_like(out) if weight is None else weight.to(torch.float64)
    (g,) = torch.autograd.grad((out * w).sum(), z64)
    return out, g


def _grad(out, z, weight=None):
    w = torch.ones_like(out) if weight is None else weight.to(out.dtype)
    (g,) = torch.autograd.grad((out * w).sum(), z)
    return g


def _shapes(backend):
    quick = [(1, 10), (7, 1000), (5, 1271), (2, 9000)]
    if backend != "triton" or FULL or torch.cuda.is_available():
        quick += [(64, 10), (3, 50257), (33, 4096)]
    return quick


# ---------------------------------------------------------------------------------------------
# Values and gradients against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_trajectory_kl_loss_matches_reference(backend, device, dtype):
    skip_unless_available(backend, device)
    for B, C in _shapes(backend):
        for T in (1.0, 2.0, 5.0):
            z, t, _ = _inputs(B, C, dtype, device)
            for reduction in REDUCTIONS:
                # A non-uniform grad_output checks that backward scales row by row.
                weight = torch.rand(B, device=device) + 0.5 if reduction == "none" else torch.tensor(1.7, device=device)
                out = sk.trajectory_kl_loss(z, t, T, reduction, backend=backend)
                assert out.dtype == dtype
                ref, ref_g = _ref_grad(lambda a: reference.trajectory_kl_loss(a, t, T, reduction), z, weight=weight)
                what = f"{backend} {dtype} B={B} C={C} T={T} {reduction}"
                assert_close(out, ref, dtype, what + " loss")
                assert_close(_grad(out, z, weight), ref_g, dtype, what + " grad")


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saf_loss_matches_reference(backend, device, dtype):
    skip_unless_available(backend, device)
    for B, C in _shapes(backend):
        for T, lam, eps in ((1.0, 0.3, 0.0), (2.0, 0.8, 0.1), (5.0, 0.3, 0.2)):
            z, t, y = _inputs(B, C, dtype, device)
            ignore = -7 if B > 2 else -100  # a custom ignore_index too
            if B > 2:
                y[1] = y[B - 1] = ignore
            out = sk.saf_loss(z, y, t, lam, T, eps, ignore, backend=backend)
            assert out.dtype == dtype and out.dim() == 0
            ref, ref_g = _ref_grad(lambda a: reference.saf_loss(a, y, t, lam, T, eps, ignore), z)
            what = f"{backend} {dtype} B={B} C={C} T={T} lam={lam} eps={eps}"
            go = torch.tensor(0.37, device=device)
            assert_close(out, ref, dtype, what + " loss")
            assert_close(_grad(out, z, go), ref_g * 0.37, dtype, what + " grad")


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_mixed_dtypes(backend, device):
    """A bf16 store of past logits beside fp32 logits, and the other way round."""
    skip_unless_available(backend, device)
    for zd, td in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)):
        z, t, y = _inputs(9, 1000, zd, device, target_dtype=td)
        out = sk.saf_loss(z, y, t, 0.3, 5.0, backend=backend)
        ref, ref_g = _ref_grad(lambda a: reference.saf_loss(a, y, t, 0.3, 5.0), z)
        assert_close(out, ref, zd, f"{zd}/{td} loss")
        assert_close(_grad(out, z), ref_g, zd, f"{zd}/{td} grad")


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_strided_rows_and_int32_labels(backend, device):
    skip_unless_available(backend, device)
    big = torch.randn(6, 1300, device=device) * 2
    z = big[:, 17:1288].detach().requires_grad_()  # row stride 1300, not contiguous
    t = torch.randn(1300, 6, device=device).t()[:, :1271]  # column-major view
    y = torch.randint(0, 1271, (6,), device=device, dtype=torch.int32)
    out = sk.saf_loss(z, y, t, 0.5, 2.0, 0.1, backend=backend)
    ref, ref_g = _ref_grad(lambda a: reference.saf_loss(a, y, t, 0.5, 2.0, 0.1), z)
    assert_close(out, ref, torch.float32, "loss")
    assert_close(_grad(out, z), ref_g, torch.float32, "grad")


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_one_column_views_and_expanded_inputs(backend, device):
    """A [B, 1] view keeps its row stride (x[:, :1] of a wider x): the kernels must walk rows by
    it, never by 1 (a NaN elsewhere in x would land in another row's loss); expanded inputs (row
    stride 0) read their one row, in bounds."""
    skip_unless_available(backend, device)
    B = 6
    big = torch.randn(B, 5, device=device)
    big[:, 1:] = float("nan")  # only column 0 is read; a stride-1 walk of the rows reads these
    z = big[:, :1].detach().requires_grad_()
    t = torch.randn(B, 4, device=device)[:, 2:3]
    y = torch.zeros(B, dtype=torch.long, device=device)
    assert z.stride() == (5, 1) and t.stride() == (4, 1)
    rows = sk.trajectory_kl_loss(z, t, 2.0, "none", backend=backend)
    assert torch.equal(rows, torch.zeros_like(rows)), rows  # one class: KL = 0 exactly
    out = sk.saf_loss(z, y, t, 0.3, 2.0, backend=backend)
    assert out.item() == 0.0 and torch.equal(_grad(out, z), torch.zeros_like(z))
    # Expanded: one row seen B times (row stride 0), with one and with many classes.
    for C in (1, 37):
        z1 = torch.randn(1, C, device=device).expand(B, C).detach().requires_grad_()
        t1 = torch.randn(1, C, device=device).expand(B, C)
        y1 = torch.randint(0, C, (B,), device=device)
        assert z1.stride(0) == 0 and t1.stride(0) == 0
        out = sk.saf_loss(z1, y1, t1, 0.5, 2.0, backend=backend)
        ref, ref_g = _ref_grad(lambda a: reference.saf_loss(a, y1, t1, 0.5, 2.0), z1)
        assert_close(out, ref, torch.float32, f"expanded C={C} loss")
        assert_close(_grad(out, z1), ref_g, torch.float32, f"expanded C={C} grad")


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS + [pytest.param("torch", "cpu", id="torch-cpu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kl_value_when_tiny_against_large_logits(backend, device, dtype):
    """Nearly identical, peaked distributions (large logits, low T, two classes and more): the KL
    is ~1e-7 while the logits are ~30. The kernels' row loss must be within twice the error of the
    reference formula evaluated in float32 (log_softmax, then sum p (log p - log q)), both against
    float64, on the same rounded inputs. (The former formula, a difference of row-wide sums, was
    10-100x off here; bfloat16 inputs, whose rows round to near-copies, made it worse.)"""
    skip_unless_available(backend, device)
    g = torch.Generator().manual_seed(0)
    for C in (2, 3, 10, 100):
        for T in (0.5, 1.0, 2.0, 5.0):
            parts = []
            for scale, delta, shift in ((10, 1e-2, 3.0), (20, 1e-3, 0.0), (30, 1e-3, 40.0), (5, 1e-4, 1.0),
                                        (3, 1e-1, 0.0)):
                z = torch.randn(16, C, dtype=torch.float64, generator=g) * scale
                parts.append((z, z + delta * torch.randn(16, C, dtype=torch.float64, generator=g) + shift))
            z = torch.cat([p[0] for p in parts]).to(device=device, dtype=dtype)
            t = torch.cat([p[1] for p in parts]).to(device=device, dtype=dtype)
            if backend == "torch":
                rows = reference.trajectory_kl_rows(z, t, T)
            else:  # the op's own rows, in float32: the public function rounds them to bfloat16
                rows = tl_ops.fused_ops()[backend](z, t, None, T, 0.0, 1.0, 0.0, -100, 0, False)[0]
            r64 = reference.trajectory_kl_rows(z.double(), t.double(), T)
            r32 = reference.trajectory_kl_rows(z.float(), t.float(), T).double()
            err = (rows.double() - r64).abs().max().item()
            ref_err = (r32 - r64).abs().max().item()
            assert err <= 2 * ref_err, \
                f"{backend} {dtype} C={C} T={T}: error {err:.3g}, float32 reference {ref_err:.3g}"


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_official_formula(backend, device):
    """saf_loss equals the loss as the official SAF code writes it."""
    skip_unless_available(backend, device)
    z, t, y = _inputs(16, 100, torch.float64, device, scale=1.0)
    ours = sk.saf_loss(z, y, t, 0.3, 5.0, backend=backend)
    official = reference.saf_official_loss(z.detach(), y, t, 0.3, 5.0)
    assert_close(ours, official, torch.float32, "official formula")


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_ignored_rows_contribute_nothing(backend, device):
    skip_unless_available(backend, device)
    z, t, y = _inputs(10, 50, torch.float32, device)
    y[::3] = -100
    keep = y != -100
    full = sk.saf_loss(z, y, t, backend=backend)
    sub = sk.saf_loss(z[keep].detach(), y[keep], t[keep], backend="torch")
    assert_close(full, sub, torch.float32, "ignored rows")
    g = _grad(full, z)
    assert torch.all(g[~keep] == 0)
    # Every row ignored: zero loss and zero gradient, not NaN.
    y_all = torch.full_like(y, -100)
    out = sk.saf_loss(z, y_all, t, backend=backend)
    assert out.item() == 0.0
    assert torch.all(_grad(out, z) == 0)


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_no_gradient_to_target(backend, device):
    skip_unless_available(backend, device)
    z, t, y = _inputs(4, 30, torch.float32, device)
    t.requires_grad_()
    out = sk.saf_loss(z, y, t, backend=backend) + sk.trajectory_kl_loss(z, t, backend=backend)
    out.backward()
    assert t.grad is None and z.grad is not None


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_nan_and_inf_propagate(backend, device):
    skip_unless_available(backend, device)
    z, t, y = _inputs(5, 40, torch.float32, device)
    with torch.no_grad():
        z[1, 3] = float("nan")
        t[3, 5] = float("nan")
        z[4, 0] = float("inf")
    rows = sk.trajectory_kl_loss(z, t, reduction="none", backend=backend)
    bad = torch.tensor([False, True, False, True, True], device=device)
    assert torch.all(~torch.isfinite(rows[bad])), rows
    assert torch.all(torch.isfinite(rows[~bad])), rows
    assert not math.isfinite(sk.saf_loss(z, y, t, backend=backend).item())
    g = _grad(rows, z)
    assert torch.all(torch.isnan(g[1])) and torch.all(torch.isfinite(g[0]))


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_empty_batch_and_no_grad(backend, device):
    skip_unless_available(backend, device)
    z = torch.randn(0, 10, device=device, requires_grad=True)
    t = torch.randn(0, 10, device=device)
    y = torch.zeros(0, dtype=torch.long, device=device)
    assert sk.trajectory_kl_loss(z, t, reduction="none", backend=backend).shape == (0,)
    assert sk.trajectory_kl_loss(z, t, reduction="sum", backend=backend).item() == 0.0
    assert sk.saf_loss(z, y, t, backend=backend).item() == 0.0
    z2, t2, y2 = _inputs(3, 10, torch.float32, device)
    with torch.no_grad():
        out = sk.saf_loss(z2, y2, t2, backend=backend)
    assert not out.requires_grad
    assert_close(out, reference.saf_loss(z2.detach(), y2, t2), torch.float32, "no_grad")


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_bad_label(backend, device):
    """CPU kernel and reference raise; GPU kernels cannot without a sync and write NaN."""
    skip_unless_available(backend, device)
    z, t, y = _inputs(4, 10, torch.float32, device)
    y[2] = 10
    if backend == "cpu":
        with pytest.raises(IndexError, match="label 10 of row 2 is outside"):
            sk.saf_loss(z, y, t, backend=backend)
    else:
        rows = tl_ops.fused_ops()[backend](z, t, y, 5.0, 1.0, 0.3, 0.0, -100, 0, True)[0]
        assert torch.isnan(rows[2]) and torch.all(torch.isfinite(rows[[0, 1, 3]]))
    if device == "cpu":
        with pytest.raises(IndexError):
            sk.saf_loss(z, y, t, backend="torch")


# ---------------------------------------------------------------------------------------------
# CPU instruction sets, gradcheck, opcheck, torch.compile, autocast
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ["DEFAULT", "AVX2", "AVX512"])
def test_cpu_instruction_sets(isa, monkeypatch):
    skip_unless_available("cpu", "cpu")
    monkeypatch.setenv("SAF_KERNELS_CPU_ISA", isa)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        z, t, y = _inputs(6, 1271, dtype, "cpu")
        out = sk.saf_loss(z, y, t, 0.3, 2.0, 0.1, backend="cpu")
        ref, ref_g = _ref_grad(lambda a: reference.saf_loss(a, y, t, 0.3, 2.0, 0.1), z)
        assert_close(out, ref, dtype, f"{isa} {dtype} loss")
        assert_close(_grad(out, z), ref_g, dtype, f"{isa} {dtype} grad")


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_gradcheck_float64(backend, device):
    skip_unless_available(backend, device)
    z, t, y = _inputs(3, 7, torch.float64, device, scale=1.0)
    y[1] = -100
    assert torch.autograd.gradcheck(lambda a: sk.saf_loss(a, y, t, 0.5, 2.0, 0.1, backend=backend), (z,))
    w = torch.rand(3, dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda a: sk.trajectory_kl_loss(a, t, 3.0, "none", backend=backend) * w, (z,))


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_opcheck(backend, device):
    skip_unless_available(backend, device)
    op = tl_ops.fused_ops()[backend]
    for dtype in (torch.float32, torch.bfloat16):
        z, t, y = _inputs(4, 33, dtype, device)
        for reduction in (0, 1, 2):
            torch.library.opcheck(op, (z, t, y, 2.0, 1.0, 0.3, 0.1, -100, reduction, True))
            torch.library.opcheck(op, (z, t, None, 5.0, 0.0, 1.0, 0.0, -100, reduction, True))
        torch.library.opcheck(op, (z.detach(), t, y, 2.0, 1.0, 0.3, 0.0, -100, 2, False))


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_torch_compile_fullgraph(backend, device):
    skip_unless_available(backend, device)
    torch._dynamo.reset()
    z, t, y = _inputs(8, 100, torch.float32, device)

    def step(z, y, t):
        return sk.saf_loss(z * 1.5, y, t, 0.3, 5.0, 0.1, backend=backend) + 0.1 * sk.trajectory_kl_loss(
            z, t, 2.0, backend=backend
        )

    compiled = torch.compile(step, fullgraph=True)
    out = compiled(z, y, t)
    ref = step(z, y, t)
    assert_close(out, ref, torch.float32, "compiled loss")
    assert_close(_grad(out, z), _grad(ref, z), torch.float32, "compiled grad")


def test_autocast_cpu():
    """Under autocast a bf16 model output goes through the fused op and gradients reach fp32 weights."""
    lin = torch.nn.Linear(16, 10)
    x = torch.randn(8, 16)
    y = torch.randint(0, 10, (8,))
    past = torch.randn(8, 10, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(x)
        assert logits.dtype == torch.bfloat16
        loss = sk.saf_loss(logits, y, past)
    loss.backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float32
    assert torch.isfinite(lin.weight.grad).all()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    z = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10)
    y = torch.randint(0, 10, (4,))
    cases = [
        (lambda: sk.trajectory_kl_loss(z[0], t[0]), ValueError, "must be 2-D"),
        (lambda: sk.trajectory_kl_loss(z, t[:3]), ValueError, "differs from logits shape"),
        (lambda: sk.trajectory_kl_loss(z, t.long()), TypeError, "float32, float16, bfloat16 or float64"),
        (lambda: sk.trajectory_kl_loss(z.int(), t), TypeError, "float32, float16"),
        (lambda: sk.trajectory_kl_loss(z, t, temperature=0.0), ValueError, "temperature must be > 0"),
        (lambda: sk.trajectory_kl_loss(z, t, temperature=-1), ValueError, "temperature must be > 0"),
        (lambda: sk.trajectory_kl_loss(z, t, temperature=float("nan")), ValueError, "finite number"),
        (lambda: sk.trajectory_kl_loss(z, t, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda: sk.trajectory_kl_loss(z, t, backend="gpu"), ValueError, "unknown backend"),
        (lambda: sk.trajectory_kl_loss(z, t, backend="cuda"), sk.BackendUnavailable, "needs cuda tensors"),
        (lambda: sk.trajectory_kl_loss(torch.randn(4, 0), torch.randn(4, 0)), ValueError, "at least one class"),
        (lambda: sk.trajectory_kl_loss(z, "t"), TypeError, "must be a torch.Tensor"),
        (lambda: sk.saf_loss(z, y.short(), t), TypeError, "int64 or int32"),
        (lambda: sk.saf_loss(z, y[:3], t), ValueError, r"class-index targets must have shape \(4,\)"),
        (lambda: sk.saf_loss(z, y, t, label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0.0, 1.0\]"),
        (lambda: sk.saf_loss(z, y, t, lam=float("inf")), ValueError, "lam must be a finite number"),
        (lambda: sk.saf_loss(z, y, t, ignore_index=1.5), TypeError, "ignore_index must be an int"),
    ]
    if torch.device("meta") != z.device:
        cases.append((lambda: sk.trajectory_kl_loss(z, t.to("meta")), ValueError, "is on meta but logits are on cpu"))
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_cpp_op_checks_its_inputs():
    """Calling the registered op directly still gets clear errors (no crash)."""
    skip_unless_available("cpu", "cpu")
    op = torch.ops.saf_kernels.trajectory_loss
    z = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        op(z[0], z[0], None, 1.0, 0.0, 1.0, 0.0, -100, 0, False)
    with pytest.raises(RuntimeError, match="differs from logits shape"):
        op(z, z[:2], None, 1.0, 0.0, 1.0, 0.0, -100, 0, False)
    with pytest.raises(RuntimeError, match="temperature must be a finite number > 0"):
        op(z, z, None, -1.0, 0.0, 1.0, 0.0, -100, 0, False)
    with pytest.raises(RuntimeError, match="labels must have shape"):
        op(z, z, torch.zeros(3, dtype=torch.long), 1.0, 1.0, 1.0, 0.0, -100, 0, False)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        op(z.int(), z, None, 1.0, 0.0, 1.0, 0.0, -100, 0, False)
    with pytest.raises(RuntimeError, match="reduction must be 0"):
        op(z, z, None, 1.0, 0.0, 1.0, 0.0, -100, 3, False)
    with pytest.raises(RuntimeError, match="need_grad=False"):
        z2 = z.clone().requires_grad_()
        op(z2, z, None, 1.0, 0.0, 1.0, 0.0, -100, 1, False)[0].backward()


def test_env_backend_override(monkeypatch):
    z, t, _ = _inputs(3, 10, torch.float32, "cpu")
    monkeypatch.setenv("SAF_KERNELS_BACKEND", "torch")
    assert sk._backend.resolve("auto", z.device, "trajectory_loss") == "torch"
    monkeypatch.setenv("SAF_KERNELS_BACKEND", "cuda")
    with pytest.raises(sk.BackendUnavailable, match="needs cuda tensors"):
        sk.trajectory_kl_loss(z, t)
    # An explicit argument wins over the environment.
    assert sk._backend.resolve("torch", z.device, "trajectory_loss") == "torch"


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = sk._backend.missing("triton", torch.device("cpu"), "trajectory_loss")
    assert why is not None and "TRITON_INTERPRET=1" in why


def test_import_without_extension_warns_once_and_falls_back(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, warnings\n"
        "sys.modules['saf_kernels._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import saf_kernels as sk\n"
        "    import saf_kernels.ops\n"
        "msgs = [str(x.message) for x in w if 'saf_kernels._C' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "import torch\n"
        "z = torch.randn(3, 5, requires_grad=True); t = torch.randn(3, 5); y = torch.tensor([0, 1, 2])\n"
        "assert sk._backend.resolve('auto', z.device, 'trajectory_loss') == 'torch'\n"
        "sk.saf_loss(z, y, t).backward()\n"
        "try:\n"
        "    sk.saf_loss(z, y, t, backend='cpu')\n"
        "except sk.BackendUnavailable as e:\n"
        "    assert 'saf_kernels._C is not available' in str(e)\n"
        "else:\n"
        "    raise AssertionError('cpu backend without extension')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, SAF_KERNELS_BACKEND="auto")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_repeated_backward_and_accumulation(backend, device):
    """retain_graph and a second backward give twice the gradient (the saved gradient is reused,
    never mutated), also through a layer below the logits."""
    skip_unless_available(backend, device)
    lin = torch.nn.Linear(12, 30).to(device)
    x = torch.randn(5, 12, device=device)
    y = torch.randint(0, 30, (5,), device=device)
    t = torch.randn(5, 30, device=device)
    z = lin(x)
    z.retain_grad()
    loss = sk.saf_loss(z, y, t, backend=backend) + 0.5 * sk.trajectory_kl_loss(z, t, backend=backend)
    loss.backward(retain_graph=True)
    g1, w1 = z.grad.clone(), lin.weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * g1)
    torch.testing.assert_close(lin.weight.grad, 2 * w1)
    ref_z = z.detach().clone().requires_grad_()
    (reference.saf_loss(ref_z, y, t) + 0.5 * reference.trajectory_kl_loss(ref_z, t)).backward()
    assert_close(g1, ref_z.grad, torch.float32, "first backward")
