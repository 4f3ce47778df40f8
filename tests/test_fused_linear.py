"""fused_linear_trajectory_loss (output layer + CE + trajectory KL, chunk by chunk) against the
materialised float64 reference, on every row-kernel backend; the top-k bank."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import saf_kernels as sk
from saf_kernels import reference

from .helpers import KERNEL_PAIRS, skip_unless_available
from .tolerances import assert_close

TARGETS = ["hidden", "logits", "topk", "topk_valid"]


def _case(N, H, V, dtype=torch.float64, target="hidden", bias=True, k=5, ignore_every=4, lead=None, device="cpu"):
    """Inputs (rounded to ``dtype``) and the target keyword arguments of one call."""
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    shape = lead or (N,)
    h = rnd(*shape, H).requires_grad_()
    w = rnd(V, H, scale=H**-0.5 * 3).requires_grad_()
    b = rnd(V).requires_grad_() if bias else None
    y = torch.randint(0, V, shape, device=device)
    if ignore_every:
        y.view(-1)[::ignore_every] = -100
    if target == "hidden":
        kw = dict(target_hidden=rnd(*shape, H + 3), target_weight=rnd(V, H + 3, scale=(H + 3) ** -0.5 * 3),
                  target_bias=rnd(V) if bias else None)
    elif target == "logits":
        kw = dict(target_logits=rnd(*shape, V, scale=3).to(torch.bfloat16))
    else:
        z = torch.randn(*shape, V, dtype=torch.float64, device=device) * 3
        val, idx = z.topk(min(k, V), dim=-1)
        topk = (idx, val.float(), z.logsumexp(-1).float())
        if target == "topk_valid":
            topk += (torch.rand(shape, device=device) > 0.4,)
        kw = dict(target_topk=topk)
    return h, w, b, y, kw


def _params(h, w, b):
    return (h, w) + ((b,) if b is not None else ())


def _ref(h, w, b, y, kw, **opts):
    """Float64 reference loss and gradients on the same (rounded) inputs."""
    leaves = [t.detach().double().requires_grad_() for t in _params(h, w, b)]
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and k != "target_logits" else v) for k, v in kw.items()}
    loss = reference.fused_linear_trajectory_loss(leaves[0], leaves[1], y, bias=leaves[2] if b is not None else None,
                                                  **kw64, **opts)
    return loss, torch.autograd.grad(loss, leaves)


def _check(h, w, b, y, kw, dtype, backend, chunk_size, what, **opts):
    loss = sk.fused_linear_trajectory_loss(h, w, y, bias=b, chunk_size=chunk_size, backend=backend, **kw, **opts)
    grads = torch.autograd.grad(loss * 1.7, _params(h, w, b))
    ref, ref_grads = _ref(h, w, b, y, kw, **opts)
    assert_close(loss, ref, dtype, f"{what} loss")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g, r * 1.7, dtype, f"{what} grad {name}")
    return loss


# ---------------------------------------------------------------------------------------------
# Values and gradients against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
@pytest.mark.parametrize("target", TARGETS)
def test_matches_reference(backend, device, target):
    skip_unless_available(backend, device)
    torch.manual_seed(0)
    shapes = [(1, 8, 7, 1), (37, 16, 101, 8), (20, 12, 33, None)]
    dtypes = (torch.float64, torch.float32)
    if backend == "triton" and device == "cpu":  # the interpreter is slow: one awkward shape, float32
        if target in ("logits", "topk"):
            pytest.skip("the interpreter is slow; the hidden and topk_valid targets cover the Triton row op")
        shapes, dtypes = shapes[1:2], dtypes[1:]
    for (N, H, V, chunk), bias in zip(shapes, (True, False, True)):
        for dtype in dtypes:
            h, w, b, y, kw = _case(N, H, V, dtype, target, bias, ignore_every=4 if N > 1 else 0, device=device)
            _check(h, w, b, y, kw, dtype, backend, chunk, f"{backend} {target} {N}x{H}x{V} {dtype}",
                   lam=0.7, temperature=2.0, label_smoothing=0.1)


def test_bfloat16_inputs_accumulate_in_float32():
    torch.manual_seed(1)
    h, w, b, y, kw = _case(45, 32, 257, torch.bfloat16, "hidden")
    loss = _check(h, w, b, y, kw, torch.bfloat16, "auto", 16, "bf16")
    assert loss.dtype == torch.float32


def test_leading_dims_and_int32_labels():
    torch.manual_seed(2)
    h, w, b, y, kw = _case(0, 8, 19, lead=(3, 5), target="topk_valid")
    _check(h, w, b, y.int(), kw, torch.float64, "auto", 4, "[3, 5, H]")


def test_all_rows_ignored_gives_zero_loss_and_gradients():
    h, w, b, y, kw = _case(6, 8, 11)
    y.fill_(-100)
    loss = sk.fused_linear_trajectory_loss(h, w, y, bias=b, chunk_size=4, **kw)
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, (h, w, b)):
        assert torch.count_nonzero(g).item() == 0


def test_reference_is_cross_entropy_plus_kl():
    """The reference against the issue's eager formula: F.cross_entropy + lam T^2 F.kl_div."""
    torch.manual_seed(3)
    h, w, b, y, kw = _case(9, 8, 13, ignore_every=3)
    lam, T = 0.6, 3.0
    z = F.linear(h, w, b)
    t = F.linear(kw["target_hidden"], kw["target_weight"], kw["target_bias"])
    keep = y != -100
    kl = F.kl_div(F.log_softmax(z[keep] / T, -1), F.log_softmax(t[keep] / T, -1), log_target=True,
                  reduction="batchmean")
    eager = F.cross_entropy(z, y) + lam * T * T * kl
    ref = reference.fused_linear_trajectory_loss(h, w, y, bias=b, lam=lam, temperature=T, **kw)
    assert_close(ref, eager, torch.float64, "reference vs eager")


def test_topk_target_keeps_the_kept_probabilities():
    """At T = 1 the rebuilt target gives every kept class its exact probability and the others the
    rest uniformly; with nothing left over (k = V, or all mass kept) no NaN and zero for the rest."""
    torch.manual_seed(4)
    z = torch.randn(6, 50, dtype=torch.float64) * 3
    val, idx = z.topk(7, -1)
    lse = z.logsumexp(-1)
    p = reference.topk_target_logits(idx, val, lse, 50, 1.0).softmax(-1)
    assert_close(p.gather(1, idx), (val - lse[:, None]).exp(), torch.float64, "kept")
    rest = 1 - (val - lse[:, None]).exp().sum(1, keepdim=True)
    others = p.scatter(1, idx, 0.0)
    assert_close(others, (rest / 43).expand(6, 50).scatter(1, idx, 0.0), torch.float64, "rest")
    val, idx = z.topk(50, -1)
    full = reference.topk_target_logits(idx, val, lse, 50, 5.0)
    assert_close(full.softmax(-1), z.softmax(-1), torch.float64, "k = V")
    one_hot = torch.tensor([[0.0, -1e4, -1e4]], dtype=torch.float64)
    t = reference.topk_target_logits(torch.tensor([[0]]), one_hot[:, :1], one_hot.logsumexp(-1), 3, 5.0)
    assert torch.isfinite(t).all() and (t[0, 1:] / 5.0).softmax(-1).sum() > 0
    assert (t / 5.0).softmax(-1)[0, 0].item() == 1.0


def test_rows_without_a_record_have_no_kl():
    """Every row invalid: the loss is the cross-entropy alone (an independent check of the mask)."""
    torch.manual_seed(5)
    h, w, b, y, kw = _case(10, 8, 21, target="topk_valid")
    kw["target_topk"][3].fill_(False)
    loss = sk.fused_linear_trajectory_loss(h, w, y, bias=b, chunk_size=3, **kw)
    assert_close(loss, F.cross_entropy(F.linear(h, w, b), y), torch.float64, "invalid rows: CE only")


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, autocast
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["hidden", "topk_valid"])
def test_gradcheck_float64(target):
    torch.manual_seed(6)
    h, w, b, y, kw = _case(5, 3, 7, target=target, ignore_every=3)
    assert torch.autograd.gradcheck(
        lambda h, w, b: sk.fused_linear_trajectory_loss(h, w, y, bias=b, chunk_size=2, label_smoothing=0.2,
                                                        temperature=2.0, **kw), (h, w, b))


def _op_args(h, w, b, y, kw, need_grad=True):
    th, tw = kw.get("target_hidden"), kw.get("target_weight")
    topk = tuple(kw.get("target_topk", ())) + (None,) * (4 - len(kw.get("target_topk", ())))
    return (h, w, b, y, th, tw, kw.get("target_bias"), kw.get("target_logits"), *topk, 0.8, 5.0, 0.1, -100, 3,
            "cpu", need_grad)


@pytest.mark.parametrize("target", ["hidden", "topk_valid"])
def test_opcheck(target):
    skip_unless_available("cpu", "cpu")
    h, w, b, y, kw = _case(7, 4, 9, torch.float32, target)
    op = torch.ops.saf_kernels.fused_linear_trajectory_loss
    torch.library.opcheck(op, _op_args(h, w, b, y, kw))
    torch.library.opcheck(op, _op_args(h.detach(), w.detach(), None, y, kw, need_grad=False))


def test_torch_compile_fullgraph():
    """aot_eager: the op's fake kernel and autograd under dynamo and AOTAutograd (inductor's code
    generation around an opaque custom op adds a minute on a 2-core machine and nothing to check)."""
    torch._dynamo.reset()
    torch.manual_seed(7)
    h, w, b, y, kw = _case(12, 8, 29, torch.float32, "hidden")

    def step(h, w, b):
        return sk.fused_linear_trajectory_loss(h * 1.5, w, y, bias=b, chunk_size=5, **kw)

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(h, w, b)
    ref = step(h, w, b)
    assert_close(out, ref, torch.float32, "compiled loss")
    for g, r in zip(torch.autograd.grad(out, (h, w, b)), torch.autograd.grad(ref, (h, w, b))):
        assert_close(g, r, torch.float32, "compiled grad")


def test_autocast_bfloat16_reaches_float32_parameters():
    torch.manual_seed(8)
    h, w, b, y, kw = _case(16, 16, 40, torch.float32, "hidden")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sk.fused_linear_trajectory_loss(h, w, y, bias=b, chunk_size=6, **kw)
    grads = torch.autograd.grad(loss, (h, w, b))
    assert all(g.dtype == torch.float32 for g in grads)
    bf = [t.detach().bfloat16().requires_grad_() for t in (h, w, b)]
    kw_bf = {k: v.bfloat16() for k, v in kw.items()}
    ref, ref_grads = _ref(*bf, y, kw_bf)
    assert_close(loss, ref, torch.bfloat16, "autocast loss")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.bfloat16, "autocast grad")


# ---------------------------------------------------------------------------------------------
# The top-k trajectory bank
# ---------------------------------------------------------------------------------------------


def test_topk_bank_delay_lookup_and_state_round_trip():
    torch.manual_seed(9)
    V, k, T = 23, 4, 3
    bank = sk.TopKTrajectoryBank(10, k=k, tokens=T, delay=2)
    assert bank.nbytes == sum(t.numel() * t.element_size() for t in (bank.idx, bank.logit, bank.lse, bank.epochs))
    assert bank.nbytes == 10 * 2 * (T * (k * (4 + 2) + 4) + 4)
    ids = torch.tensor([7, 2, 5])
    z0 = torch.randn(3, T, V)
    bank.record(ids, z0, epoch=0)
    assert not bank.lookup(ids, epoch=1)[3].any()  # delay 2: epoch 0's record is for epoch 2
    idx, logit, lse, valid = bank.lookup(torch.tensor([5, 7, 1]), epoch=2)
    assert valid.tolist() == [[True] * T, [True] * T, [False] * T]
    val0, idx0 = z0.topk(k, -1)
    assert torch.equal(idx[:2], idx0[[2, 0]]) and idx.dtype == torch.int64
    assert torch.equal(logit[:2], val0[[2, 0]].bfloat16())
    assert_close(lse[:2], z0.logsumexp(-1)[[2, 0]], torch.float32, "lse")
    bank.record(torch.tensor([5]), torch.randn(1, T, V), epoch=2)  # overwrites slot 0: gone at epoch 2
    assert bank.lookup(torch.tensor([5, 7]), epoch=2)[3][:, 0].tolist() == [False, True]

    other = sk.TopKTrajectoryBank(10, k=k, tokens=T, delay=2)
    other.load_state_dict(bank.state_dict())
    for a, b in zip(bank.lookup(ids, epoch=2), other.lookup(ids, epoch=2)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"k is 4 in the checkpoint but 5 here"):
        sk.TopKTrajectoryBank(10, k=5, tokens=T, delay=2).load_state_dict(bank.state_dict())


def test_topk_bank_record_linear_and_the_loss():
    """record_linear (chunked) stores what record of the materialised logits stores, and its lookup
    feeds the fused loss, which then matches the reference on the same record."""
    torch.manual_seed(10)
    B, T, H, V = 4, 5, 8, 31
    w, b = torch.randn(V, H, dtype=torch.float64), torch.randn(V, dtype=torch.float64)
    h_old = torch.randn(B, T, H, dtype=torch.float64)
    ids = torch.tensor([3, 0, 6, 1])
    banks = [sk.TopKTrajectoryBank(8, k=6, tokens=T, dtype=torch.float32) for _ in range(2)]
    banks[0].record(ids, F.linear(h_old, w, b), epoch=0)
    banks[1].record_linear(ids, h_old, w, b, epoch=0, chunk_size=3)
    for a, c in zip(banks[0].lookup(ids, 1), banks[1].lookup(ids, 1)):
        assert_close(a, c, torch.float32, "record_linear vs record")
    target = banks[1].lookup(torch.tensor([3, 0, 7, 1]), 1)
    h = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    wg = w.clone().requires_grad_()
    y = torch.randint(0, V, (B, T))
    _check(h, wg, None, y, {"target_topk": target}, torch.float64, "auto", 7, "bank", lam=0.3, temperature=2.0)


def test_bench_measure_and_table():
    """The benchmark's per-process measurement (run here in-process, tiny) and its table."""
    from saf_kernels.bench import fused_linear as bench

    rows = [{"kind": "fused_linear", "case": "64x16x100 float32", "provider": v,
             **bench.measure(v, 64, 16, 100, "float32", "cpu", 1)} for v in ("eager", "fused")]
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 1e-4 * abs(rows[0]["loss"])
    text = bench.table(rows)
    assert "fused" in text and "speed-up vs eager" in text and "compile" not in text.split("\n", 2)[2]
