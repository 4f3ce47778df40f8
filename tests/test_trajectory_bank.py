"""The SAF trajectory bank's fused step and record op on every backend against the float64
reference: values, gradients, counts and the bank's contents afterwards; semantics across epochs;
bad ids; opcheck, gradcheck, torch.compile; no host synchronisation on the GPU-style path."""

from __future__ import annotations

import sys

import pytest
import torch

import saf_kernels as sk
from saf_kernels import reference
from saf_kernels.ops import trajectory_bank as tb

from .helpers import FULL, HAS_CUDA, KERNEL_PAIRS, skip_unless_available
from .tolerances import assert_close

OP = "saf_bank_step"
BANK_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT64_MIN = -(2**63)

# Every backend, the reference included (it must agree with the kernels on bank semantics).
ALL_PAIRS = KERNEL_PAIRS + [pytest.param("torch", "cpu", id="torch-cpu")]


def _skip(backend, device):
    skip_unless_available(backend, device, OP)


def make_bank(N, S, C, dtype=torch.float32, device="cpu"):
    values = torch.zeros(N, S, C, dtype=dtype, device=device)
    epochs = torch.full((N, S), -1, dtype=torch.int32, device=device)
    claims = torch.zeros(N, dtype=torch.int32, device=device)
    state = torch.zeros(tb.STATE_SIZE, dtype=torch.int64, device=device)
    state[1] = state[2] = INT64_MIN
    state[3] = -1
    return [values, epochs, claims, state]


def random_history(bank, epoch, p_valid=0.6):
    """Random past rows; the slot of `epoch` is valid (tagged epoch - S) for about p_valid of the
    samples, else empty, stale, or already written this epoch -- and then holds NaN, which a correct
    kernel never reads."""
    values, epochs = bank[0], bank[1]
    N, S, C = values.shape
    values.copy_((torch.randn(N, S, C, dtype=torch.float64) * 3).to(values.dtype))
    tags = torch.randint(-1, max(epoch, 1), (N, S), dtype=torch.int32)
    slot = epoch % S
    valid = torch.rand(N) < p_valid
    other = torch.tensor([-1, epoch - 2 * S, epoch - S + 1, epoch], dtype=torch.int32)
    tags[:, slot] = torch.where(valid, torch.tensor(epoch - S, dtype=torch.int32), other[torch.randint(0, 4, (N,))])
    tags[tags < -1] = -1
    epochs.copy_(tags.to(epochs.device))
    invalid = (epochs[:, slot] != epoch - S).to(values.device)
    values[:, slot][invalid] = float("nan")
    return valid


def batch_ids(N, B):
    """B distinct ids in [0, N) that include both ends of the range when B allows."""
    ids = torch.randperm(N)[:B]
    if B >= 2:
        rest = torch.randperm(N - 2)[: B - 2] + 1
        ids = torch.cat([torch.tensor([N - 1, 0]), rest])[torch.randperm(B)]
    return ids


def _clone(bank):
    return [t.clone() for t in bank]


def _run(backend, z, y, ids, bank, epoch, lam, T, eps, ignore, use_past=True, record=True):
    loss, counts = tb.trajectory_bank_step(z, y, ids, *bank, epoch, lam, T, eps, ignore, use_past, record,
                                           backend=backend)
    return loss, counts


def _reference(z, y, ids, bank, epoch, lam, T, eps, ignore, use_past=True, record=True):
    """Float64 oracle on the same (rounded) logits: loss, gradient, counts, and the bank after."""
    ref_bank = _clone(bank)
    z64 = z.detach().to(torch.float64).requires_grad_()
    loss, counts = reference.saf_bank_step(z64, y, ids, ref_bank[0], ref_bank[1], epoch, T, 1.0, lam, eps, ignore,
                                           use_past, record)
    (g,) = torch.autograd.grad(loss, z64)
    return loss, g, counts, ref_bank


def _cases(backend):
    # (N, S, B, C): C = 10, 1000, 1271 (not a power of two, more than one block), B = 1, ids at the ends.
    quick = [(5, 3, 1, 10), (50, 3, 7, 1000), (9, 2, 5, 1271), (40, 1, 33, 10)]
    if backend != "triton" or FULL or HAS_CUDA:
        quick += [(300, 4, 64, 100), (20, 3, 3, 9000)]
    return quick


# ---------------------------------------------------------------------------------------------
# The fused step against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
@pytest.mark.parametrize("bank_dtype", BANK_DTYPES, ids=str)
def test_step_matches_reference(backend, device, bank_dtype):
    _skip(backend, device)
    for N, S, B, C in _cases(backend):
        for z_dtype, lam, T, eps in ((torch.float32, 0.3, 5.0, 0.0), (torch.bfloat16, 0.8, 2.0, 0.1),
                                     (torch.float16, 0.5, 1.0, 0.2)):
            epoch = S + int(torch.randint(0, 3 * S, ()))
            bank = make_bank(N, S, C, bank_dtype)
            random_history(bank, epoch)
            bank = [t.to(device) for t in bank]
            ids = batch_ids(N, B).to(device)
            z = (torch.randn(B, C, dtype=torch.float64) * 3).to(device=device, dtype=z_dtype).requires_grad_()
            y = torch.randint(0, C, (B,), device=device)
            ignore = -7
            if B > 3:
                y[1] = ignore
            ref_loss, ref_g, ref_counts, ref_bank = _reference(z, y, ids, bank, epoch, lam, T, eps, ignore)
            loss, counts = _run(backend, z, y, ids, bank, epoch, lam, T, eps, ignore)
            (g,) = torch.autograd.grad(loss * 0.37, z)
            what = f"{backend} bank={bank_dtype} z={z_dtype} N={N} S={S} B={B} C={C} epoch={epoch}"
            assert loss.dtype == z_dtype and loss.dim() == 0
            assert torch.isfinite(loss), what + ": a NaN slot was read"
            assert_close(loss, ref_loss, z_dtype, what + " loss")
            assert_close(g, ref_g * 0.37, z_dtype, what + " grad")
            assert torch.equal(counts.cpu(), ref_counts.cpu()), what
            # The bank afterwards: the logits rounded to the bank dtype, bit for bit, and the tags.
            assert torch.equal(bank[1].cpu(), ref_bank[1].cpu()), what + " tags"
            torch.testing.assert_close(bank[0].cpu(), ref_bank[0].cpu(), rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m, w=what: w + " values: " + m)
            assert int(bank[2].abs().sum()) == 0, "claims must be released"
            assert int(bank[3][0]) == 0, "no error flag"


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_step_variants(backend, device):
    """No labels (KL only), use_past=False, record=False, no grad, float64 logits."""
    _skip(backend, device)
    N, S, B, C = 30, 3, 6, 37
    epoch = 7
    for labels_on, use_past, record, grad_on, z_dtype in (
        (False, True, True, True, torch.float32),
        (True, False, True, True, torch.float32),
        (True, True, False, True, torch.float32),
        (True, True, True, False, torch.float32),
        (True, True, True, True, torch.float64),
    ):
        bank = make_bank(N, S, C, torch.float32)
        random_history(bank, epoch)
        bank = [t.to(device) for t in bank]
        ids = batch_ids(N, B).to(device)
        z = (torch.randn(B, C, dtype=torch.float64) * 2).to(device=device, dtype=z_dtype).requires_grad_(grad_on)
        y = torch.randint(0, C, (B,), device=device) if labels_on else None
        ref_loss, ref_g, ref_counts, ref_bank = _reference(z, y, ids, bank, epoch, 0.3, 5.0, 0.0, -100, use_past,
                                                           record)
        loss, counts = _run(backend, z, y, ids, bank, epoch, 0.3, 5.0, 0.0, -100, use_past, record)
        what = f"{backend} labels={labels_on} use_past={use_past} record={record} grad={grad_on} {z_dtype}"
        assert_close(loss, ref_loss, z_dtype, what + " loss")
        assert loss.requires_grad == grad_on
        if grad_on:
            assert_close(torch.autograd.grad(loss, z)[0], ref_g, z_dtype, what + " grad")
        assert torch.equal(counts.cpu(), ref_counts.cpu()), what
        if not use_past:
            assert int(counts[1]) == 0
        assert torch.equal(bank[1].cpu(), ref_bank[1].cpu()), what
        torch.testing.assert_close(bank[0].cpu(), ref_bank[0].cpu(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
def test_one_column_views_and_expanded_logits(backend, device):
    """A [B, 1] view of wider logits keeps its row stride: the step reads (and records) each row's
    own element, never its neighbours' (NaN here); expanded logits (row stride 0) read one row."""
    _skip(backend, device)
    N, S, B, epoch = 8, 2, 5, 3
    bank = make_bank(N, S, 1, torch.float32, device)
    random_history(bank, epoch, p_valid=1.0)
    big = torch.randn(B, 4, device=device)
    big[:, 1:] = float("nan")
    z = big[:, :1].detach().requires_grad_()
    ids = batch_ids(N, B).to(device)
    y = torch.zeros(B, dtype=torch.long, device=device)
    loss, counts = _run(backend, z, y, ids, bank, epoch, 0.3, 2.0, 0.0, -100)
    assert loss.item() == 0.0 and counts.tolist() == [B, B]  # one class: CE = KL = 0
    assert torch.equal(torch.autograd.grad(loss, z)[0], torch.zeros_like(z))
    assert torch.equal(bank[0][ids, epoch % S], z.detach())
    C = 37
    bank = make_bank(N, S, C, torch.float32, device)
    random_history(bank, epoch, p_valid=1.0)
    zc = torch.randn(1, C, device=device).expand(B, C).detach().requires_grad_()
    ref_loss, ref_g, ref_counts, ref_bank = _reference(zc, y, ids, bank, epoch, 0.3, 2.0, 0.0, -100)
    loss, counts = _run(backend, zc, y, ids, bank, epoch, 0.3, 2.0, 0.0, -100)
    assert_close(loss, ref_loss, torch.float32, "expanded loss")
    assert_close(torch.autograd.grad(loss, zc)[0], ref_g, torch.float32, "expanded grad")
    assert torch.equal(bank[0], ref_bank[0]) and torch.equal(bank[1], ref_bank[1])


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
def test_nan_rows_count_only_where_they_take_part(backend, device):
    """Policy (every backend, the reference included): NaN in a row's logits makes the loss NaN
    if the row takes part in a term (a label not ignored, or a past entry); a row in neither term
    (labels=None or ignore_index, and no past entry) contributes 0 loss and 0 gradient."""
    _skip(backend, device)
    N, S, C, B, epoch = 10, 2, 6, 4, 3
    for labels_on in (False, True):
        bank = make_bank(N, S, C, torch.float32)
        random_history(bank, epoch, p_valid=1.0)
        ids = torch.tensor([1, 4, 6, 8])
        bank[1][ids[0], epoch % S] = -1  # row 0: no past entry
        bank = [x.to(device) for x in bank]
        ids = ids.to(device)
        y = torch.tensor([-100, 1, 2, 3], device=device) if labels_on else None
        z = torch.randn(B, C, device=device)
        z[0, 2] = float("nan")
        z.requires_grad_()
        ref_loss, _, ref_counts, _ = _reference(z, y, ids, bank, epoch, 0.3, 2.0, 0.0, -100)
        loss, counts = _run(backend, z, y, ids, [x.clone() for x in bank], epoch, 0.3, 2.0, 0.0, -100)
        (g,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(ref_loss) and torch.isfinite(loss), (labels_on, loss)
        assert_close(loss, ref_loss, torch.float32, f"labels={labels_on}")
        assert torch.equal(g[0], torch.zeros_like(g[0])) and torch.isfinite(g).all()
        # The same NaN in a row that takes part: NaN.
        z2 = z.detach().clone()
        z2[1, 0] = float("nan")
        loss2, _ = _run(backend, z2, y, ids, [x.clone() for x in bank], epoch, 0.3, 2.0, 0.0, -100)
        assert torch.isnan(loss2)


def test_pinned_bank_reset_and_load_wait_for_the_device(monkeypatch):
    """reset() and load_state_dict() of a pinned-host bank write it with CPU ops: they must first
    wait for the device work still reading and writing it (the steps' kernels). Checked on the CPU
    by standing in for the device synchronisation and looking at the bank when it is called: it
    must still hold what the steps wrote."""
    import saf_kernels.saf as saf_mod

    bank = sk.TrajectoryBank(6, 4, delay=2, dtype=torch.float32, device="cpu")
    bank.step(torch.randn(3, 4), None, torch.arange(3), 0)
    saved = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in bank.state_dict().items()}
    bank.step(torch.randn(3, 4), None, torch.arange(3, 6), 0)
    seen = []
    monkeypatch.setattr(saf_mod, "_synchronize", lambda device: seen.append(int((bank.epochs >= 0).sum())))
    bank.load_state_dict(saved)
    bank.reset()
    assert seen == [], "no synchronisation for a bank on the device"
    bank.step(torch.randn(2, 4), None, torch.arange(3, 5), 0)  # 2 entries; the checkpoint has 3
    bank.pin_memory = True  # as a pinned bank: values and tags written by the device, over PCIe
    bank.load_state_dict(saved)
    assert seen == [2], "synchronised before the checkpoint overwrote the tags"
    assert int((bank.epochs >= 0).sum()) == 3 and torch.equal(bank.values, saved["values"])
    bank.reset()
    assert seen == [2, 3] and int((bank.epochs >= 0).sum()) == 0


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
def test_empty_batch(backend, device):
    _skip(backend, device)
    bank = make_bank(5, 2, 4, device=device)
    z = torch.zeros(0, 4, device=device, requires_grad=True)
    loss, counts = _run(backend, z, torch.zeros(0, dtype=torch.long, device=device),
                        torch.zeros(0, dtype=torch.long, device=device), bank, 3, 0.3, 5.0, 0.0, -100)
    assert float(loss.detach()) == 0.0 and counts.tolist() == [0, 0]
    loss.backward()


# ---------------------------------------------------------------------------------------------
# Semantics across epochs: warm-up, delay, missing entries, skipped epochs, wrap-around
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
@pytest.mark.parametrize("delay", [1, 2, 3])
def test_semantics_across_epochs(backend, device, delay):
    """Simulate a run in which each epoch sees a random subset of the samples and one epoch is
    skipped; the loss must use exactly the rows seen `delay` epochs earlier."""
    _skip(backend, device)
    N, C, B, lam, T = 24, 10, 5, 0.3, 5.0
    bank = make_bank(N, delay, C, torch.float32, device)
    history: dict[tuple[int, int], torch.Tensor] = {}  # (epoch, id) -> logits recorded then
    epochs_run = [e for e in range(4 * delay + 3) if e != delay + 1]  # skip one: its successors lose their past
    for epoch in epochs_run:
        seen = torch.randperm(N)[: N - 4]  # 4 samples missing each epoch
        for s in range(0, len(seen) - B + 1, B):
            ids = seen[s : s + B]
            z = (torch.randn(B, C) * 2).to(device).requires_grad_()
            y = torch.randint(0, C, (B,), device=device)
            loss, counts = _run(backend, z, y, ids.to(device), bank, epoch, lam, T, 0.0, -100)
            has = torch.tensor([(epoch - delay, int(i)) in history for i in ids])
            expected = torch.nn.functional.cross_entropy(z.detach().double(), y)
            if has.any():
                past = torch.stack([history[(epoch - delay, int(i))] for i in ids[has]]).to(device)
                expected = expected + lam * reference.trajectory_kl_rows(z.detach()[has].double(), past, T).mean()
            assert int(counts[1]) == int(has.sum()), (epoch, counts)
            if epoch < delay:
                assert int(counts[1]) == 0, "warm-up: no entry can be old enough"
            assert_close(loss, expected, torch.float32, f"epoch {epoch}")
            for i, row in zip(ids.tolist(), z.detach().cpu()):
                history[(epoch, i)] = row
    # Wrap-around: the bank holds, for each slot, the last epoch that wrote it.
    for i in range(N):
        for slot in range(delay):
            written = [e for e in epochs_run if e % delay == slot and (e, i) in history]
            tag = int(bank[1][i, slot])
            assert tag == (written[-1] if written else -1)
            if written:
                assert torch.equal(bank[0][i, slot].cpu(), history[(written[-1], i)])


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
def test_repeat_within_epoch_has_no_target_and_overwrites(backend, device):
    """An id seen twice in one epoch (different batches): the second time finds its slot already
    tagged with this epoch, so it gets no trajectory term, and its logits replace the first."""
    _skip(backend, device)
    N, S, C = 6, 2, 5
    bank = make_bank(N, S, C, torch.float32, device)
    ids = torch.arange(3, device=device)
    for epoch in range(2):
        _run(backend, torch.randn(3, C, device=device), None, ids, bank, epoch, 0.3, 5.0, 0.0, -100)
    z1 = torch.randn(3, C, device=device)
    _, c1 = _run(backend, z1, None, ids, bank, 2, 0.3, 5.0, 0.0, -100)
    z2 = torch.randn(3, C, device=device)
    loss, c2 = _run(backend, z2, None, ids, bank, 2, 0.3, 5.0, 0.0, -100)
    assert c1.tolist() == [3, 3] and c2.tolist() == [3, 0] and float(loss) == 0.0
    assert torch.equal(bank[0][:3, 0], z2)


# ---------------------------------------------------------------------------------------------
# Bad ids, bad labels, bad arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
@pytest.mark.parametrize("kind", ["out_of_range", "negative", "duplicate"])
def test_bad_ids(backend, device, kind):
    _skip(backend, device)
    N, S, C, B, epoch = 10, 2, 7, 5, 4
    bank = make_bank(N, S, C, torch.float32)
    random_history(bank, epoch, p_valid=1.0)
    bank = [t.to(device) for t in bank]
    before = _clone(bank)
    ids = torch.tensor([3, 0, 9, 5, 7], device=device)
    bad_rows = {"out_of_range": [2], "negative": [1], "duplicate": [1, 3]}[kind]
    if kind == "out_of_range":
        ids[2] = N + 3
    elif kind == "negative":
        ids[1] = -1
    else:
        ids[3] = ids[1]
    z = torch.randn(B, C, device=device, requires_grad=True)
    y = torch.randint(0, C, (B,), device=device)
    exc, msg = {"out_of_range": (IndexError, f"sample id {N + 3}"), "negative": (IndexError, "sample id -1"),
                "duplicate": (ValueError, "sample id 0 appears in rows 1 and 3")}[kind]
    if backend in ("cpu", "torch"):
        with pytest.raises(exc, match=msg):
            _run(backend, z, y, ids, bank, epoch, 0.3, 5.0, 0.0, -100)
        for a, b in zip(bank, before):
            assert torch.equal(a, b), "a rejected batch must leave the bank untouched"
        return
    # GPU-style kernels: no exception, the bad rows are skipped (no read, no record, no KL term),
    # the others processed, and the flag raised later by the bank.
    loss, counts = _run(backend, z, y, ids, bank, epoch, 0.3, 5.0, 0.0, -100)
    good = [i for i in range(B) if i not in bad_rows]
    assert torch.isfinite(loss) and counts.tolist() == [B, len(good)]
    ref_loss = reference.saf_loss(z.detach().double(), y, torch.zeros(B, C), 0.0)  # CE over all rows
    past = before[0][ids[good], epoch % S].double()
    ref_loss = ref_loss + 0.3 * reference.trajectory_kl_rows(z.detach()[good].double(), past, 5.0).mean()
    assert_close(loss, ref_loss, torch.float32, "loss with bad rows skipped")
    slot = epoch % S
    ok_ids = ids[good]
    assert torch.equal(bank[0][ok_ids, slot], z.detach()[good])
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[ok_ids.cpu()] = False
    assert torch.equal(bank[0][untouched.to(device)], before[0][untouched.to(device)])
    assert torch.equal(bank[1][untouched.to(device)], before[1][untouched.to(device)])
    assert int(bank[2].abs().sum()) == 0
    flags, bad_id, dup_id, err_epoch = bank[3][:4].tolist()
    assert err_epoch == epoch
    if kind == "duplicate":
        assert flags == 2 and dup_id == 0
    else:
        assert flags == 1 and bad_id == int(ids[bad_rows[0]])


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_bank_raises_flagged_errors_at_epoch_change(backend, device):
    _skip(backend, device)
    bank = sk.TrajectoryBank(8, 4, delay=2, dtype=torch.float32, backend=backend)
    z = torch.randn(3, 4, device=device)
    bank.step(z, None, torch.tensor([1, 2, 3], device=device), 0)
    bad = torch.tensor([1, 9, 3], device=device)
    if backend == "cpu":
        with pytest.raises(IndexError, match="sample id 9 of row 1 is outside the bank's range"):
            bank.step(z, None, bad, 0)
        return
    bank.step(z, None, bad, 0)  # no host sync: flagged only
    bank.step(z, None, torch.tensor([4, 5, 6], device=device), 0)
    with pytest.raises(IndexError, match=r"sample id 9 is outside the bank's range \[0, 8\) in a step of epoch 0"):
        bank.step(z, None, torch.tensor([1, 2, 3], device=device), 1)  # the epoch changes: checked
    bank.check_errors()  # cleared
    bank.step(z, None, torch.tensor([2, 2, 3], device=device), 1)
    with pytest.raises(ValueError, match="sample id 2 appeared twice in one batch"):
        bank.state_dict()
    strict = sk.TrajectoryBank(8, 4, delay=2, dtype=torch.float32, backend=backend, check_every_step=True)
    with pytest.raises(ValueError, match="appeared twice"):
        strict.step(z, None, torch.tensor([5, 5, 1], device=device), 0)


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
def test_bad_label_raises_before_touching_the_bank(backend, device):
    _skip(backend, device)
    bank = make_bank(6, 2, 5, device=device)
    before = _clone(bank)
    y = torch.tensor([0, 5, 1], device=device)
    z = torch.randn(3, 5, device=device)
    if backend in ("cpu", "torch"):
        with pytest.raises(IndexError, match="label 5 of row 1 is outside"):
            _run(backend, z, y, torch.tensor([0, 1, 2], device=device), bank, 0, 0.3, 5.0, 0.0, -100)
        assert all(torch.equal(a, b) for a, b in zip(bank, before))
    else:  # as saf_loss on the GPU: NaN in that row, which the loss shows
        loss, _ = _run(backend, z, y, torch.tensor([0, 1, 2], device=device), bank, 0, 0.3, 5.0, 0.0, -100)
        assert torch.isnan(loss)


def test_bad_arguments_raise_clear_errors():
    N, S, C = 6, 2, 5
    bank = make_bank(N, S, C)
    z = torch.randn(3, C)
    ids = torch.tensor([0, 1, 2])
    y = torch.tensor([0, 1, 2])
    step = tb.trajectory_bank_step
    cases = [
        (lambda: step(z[0], y, ids, *bank, 0), ValueError, "logits must be 2-D"),
        (lambda: step(z.long(), y, ids, *bank, 0), TypeError, "float32, float16, bfloat16 or float64"),
        (lambda: step(z, y, ids.float(), *bank, 0), TypeError, "sample ids must be int64 or int32"),
        (lambda: step(z, y, ids[:2], *bank, 0), ValueError, r"sample ids must have shape \(3,\)"),
        (lambda: step(z, y[:2], ids, *bank, 0), ValueError, r"class-index targets must have shape \(3,\)"),
        (lambda: step(torch.randn(3, 4), y, ids, *bank, 0), ValueError, "holds 5 classes but the logits have 4"),
        (lambda: step(z, y, ids, bank[0].double(), *bank[1:], 0), ValueError, "float32/bfloat16/float16"),
        (lambda: step(z, y, ids, bank[0], bank[1].long(), *bank[2:], 0), ValueError, "epochs must be a contiguous int32"),  # noqa: E501
        (lambda: step(z, y, ids, *bank[:2], bank[2][:3], bank[3], 0), ValueError, r"claims must be .* shape \(6,\)"),
        (lambda: step(z, y, ids, *bank[:3], bank[3][:4], 0), ValueError, r"state must be an int64 tensor of shape \(8,\)"),  # noqa: E501
        (lambda: step(z, y, ids, *bank, -1), ValueError, "epoch must be an int in"),
        (lambda: step(z, y, ids, *bank, 1.5), ValueError, "epoch must be an int in"),
        (lambda: step(z, y, ids, *bank, 0, temperature=0.0), ValueError, "temperature must be > 0"),
        (lambda: step(z, y, ids, *bank, 0, lam=float("nan")), ValueError, "lam must be a finite number"),
        (lambda: step(z, y, ids, *bank, 0, label_smoothing=2.0), ValueError, "label_smoothing must be in"),
        (lambda: step(z, y, ids, *bank, 0, backend="gpu"), ValueError, "unknown backend"),
        (lambda: step(z, y, ids, *[t.to("meta") for t in bank], 0), ValueError, "must be on the logits' device"),
        (lambda: sk.TrajectoryBank(0, 10), ValueError, "num_samples must be an int >= 1, got 0"),
        (lambda: sk.TrajectoryBank(10, 10, delay=0), ValueError, "delay must be an int >= 1, got 0"),
        (lambda: sk.TrajectoryBank(10, 10, dtype=torch.float64), TypeError, "dtype must be torch.bfloat16"),
        (lambda: sk.TrajectoryBank(10, 10, device="cpu", pin_memory=True), ValueError, "pin_memory=True serves CUDA"),
        (lambda: sk.SAF(10, 10, start_epoch=-1), ValueError, "start_epoch must be an int >= 0"),
        (lambda: sk.MESA("model"), TypeError, "model must be a torch.nn.Module"),
        (lambda: sk.MESA(torch.nn.Linear(2, 2), decay=1.5), ValueError, r"decay must be in \[0.0, 1.0\]"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()
    b = sk.TrajectoryBank(6, 5, delay=2, device="cpu")
    with pytest.raises(ValueError, match="serves logits on cpu, got logits on meta"):
        b.step(z.to("meta"), None, ids.to("meta"), 0)


def test_cpp_op_checks_its_inputs():
    skip_unless_available("cpu", "cpu", OP)
    op = torch.ops.saf_kernels.saf_bank_step
    bank = make_bank(6, 2, 5)
    z, ids = torch.randn(3, 5), torch.tensor([0, 1, 2])
    args = (0, 5.0, 1.0, 0.3, 0.0, -100, True, True, False)
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        op(z[0], None, ids, *bank, *args)
    with pytest.raises(RuntimeError, match="the bank holds 5 classes but logits have 4"):
        op(torch.randn(3, 4), None, ids, *bank, *args)
    with pytest.raises(RuntimeError, match="sample ids must have shape"):
        op(z, None, ids[:2], *bank, *args)
    with pytest.raises(RuntimeError, match="epoch must be in"):
        op(z, None, ids, *bank, -2, *args[1:])
    with pytest.raises(RuntimeError, match="bank epochs must be a contiguous int32"):
        op(z, None, ids, bank[0], bank[1].t().contiguous().t(), *bank[2:], *args)
    with pytest.raises(RuntimeError, match="need_grad=False"):
        z2 = z.clone().requires_grad_()
        op(z2, None, ids, *bank, *args)[0].backward()


# ---------------------------------------------------------------------------------------------
# The record op (distributed banks)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_record_matches_reference(backend, device, bank_dtype):
    _skip(backend, device)
    N, S, C, epoch = 12, 3, 9, 5
    bank = make_bank(N, S, C, bank_dtype, device)
    random_history(bank, epoch)
    rows = torch.randn(7, C, device=device)
    ids = torch.tensor([11, 0, 4, 7, 4, 2, 9], device=device)  # 4 twice: neither row recorded
    ref = _clone(bank)
    reference.saf_bank_record(rows, ids, ref[0], ref[1], epoch)
    tb.trajectory_bank_record(rows, ids, *bank, epoch, backend=backend)
    assert torch.equal(bank[1], ref[1])
    torch.testing.assert_close(bank[0], ref[0], rtol=0, atol=0, equal_nan=True)
    assert int(bank[1][4, epoch % S]) != epoch and int(bank[3][0]) == 0
    assert int(bank[2].abs().sum()) == 0
    bad = torch.tensor([1, N], device=device)
    if backend in ("cpu", "torch"):
        with pytest.raises(IndexError, match=f"sample id {N} of row 1"):
            tb.trajectory_bank_record(rows[:2], bad, *bank, epoch, backend=backend)
    else:
        tb.trajectory_bank_record(rows[:2], bad, *bank, epoch, backend=backend)
        assert bank[3][:2].tolist() == [1, N]


# ---------------------------------------------------------------------------------------------
# opcheck, gradcheck, torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_opcheck(backend, device):
    _skip(backend, device)
    step = tb.fused_ops()[backend]
    record = tb.record_ops()[backend]
    for bank_dtype in (torch.float32, torch.bfloat16):
        bank = make_bank(20, 3, 33, bank_dtype, device)
        random_history(bank, 4)
        bank[0].nan_to_num_(0.0)  # opcheck compares repeated runs; keep NaN out of the comparison
        # The raw Triton op has no autograd formula of its own (a torch.autograd.Function wraps it).
        z = torch.randn(6, 33, device=device, requires_grad=backend != "triton")
        y = torch.randint(0, 33, (6,), device=device)
        ids = batch_ids(20, 6).to(device)
        torch.library.opcheck(step, (z, y, ids, *bank, 4, 2.0, 1.0, 0.3, 0.1, -100, True, True, True))
        torch.library.opcheck(step, (z.detach(), None, ids, *bank, 4, 5.0, 0.0, 1.0, 0.0, -100, False, True, False))
        torch.library.opcheck(record, (z.detach(), ids, *bank, 4))


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
def test_gradcheck_float64(backend, device):
    _skip(backend, device)
    bank = make_bank(8, 2, 7, torch.float32)
    random_history(bank, 3, p_valid=0.7)
    bank = [t.to(device) for t in bank]
    ids = torch.tensor([7, 0, 3, 5], device=device)
    y = torch.tensor([1, -100, 6, 0], device=device)
    z = torch.randn(4, 7, dtype=torch.float64, device=device, requires_grad=True)

    def f(a):  # record=False: gradcheck calls f many times on one bank
        return tb.trajectory_bank_step(a, y, ids, *bank, 3, 0.5, 2.0, 0.1, -100, True, False, backend=backend)[0]

    assert torch.autograd.gradcheck(f, (z,))


@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_torch_compile_fullgraph(backend, device):
    _skip(backend, device)
    torch._dynamo.reset()
    N, S, C, B, epoch = 16, 2, 10, 5, 3
    bank = make_bank(N, S, C, torch.float32)
    random_history(bank, epoch, p_valid=1.0)
    bank = [t.to(device) for t in bank]
    eager_bank = _clone(bank)
    ids = batch_ids(N, B).to(device)
    y = torch.randint(0, C, (B,), device=device)
    z = torch.randn(B, C, device=device, requires_grad=True)

    def step(z, bank):
        loss, counts = tb.trajectory_bank_step(z * 1.5, y, ids, *bank, epoch, 0.3, 5.0, 0.1, -100, backend=backend)
        return loss, counts

    out, counts = torch.compile(step, fullgraph=True)(z, bank)
    ref, ref_counts = step(z, eager_bank)
    assert_close(out, ref, torch.float32, "compiled loss")
    assert torch.equal(counts, ref_counts)
    (g,) = torch.autograd.grad(out, z)
    (rg,) = torch.autograd.grad(ref, z)
    assert_close(g, rg, torch.float32, "compiled grad")
    for a, b in zip(bank, eager_bank):  # the compiled step mutated the bank as eager did
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# No host synchronisation on the GPU-style path
# ---------------------------------------------------------------------------------------------


def test_triton_step_has_no_host_sync(monkeypatch):
    """The Triton path (the one GPUs run; here interpreted on CPU) and the bank/SAF wrappers call
    nothing that synchronises: .item(), .tolist(), bool(tensor), .nonzero(), .cpu(), .numpy().
    The interpreter's own internals may; only calls made from saf_kernels code are refused."""
    _skip("triton", "cpu")

    def guard(name, orig):
        def wrapper(*args, **kwargs):
            mod = sys._getframe(1).f_globals.get("__name__", "")
            if mod.startswith("saf_kernels"):
                raise AssertionError(f"host sync: {name} called from {mod}")
            return orig(*args, **kwargs)

        return wrapper

    saf = sk.SAF(20, 10, delay=1, start_epoch=1, dtype=torch.float32, backend="triton")
    x = torch.randn(4, 10, requires_grad=True)
    y = torch.randint(0, 10, (4,))
    for i in range(3):
        saf(x, y, torch.arange(4 * i, 4 * i + 4), 0)  # allocation (fills the state): once, outside the guard
    saf(x, y, torch.arange(8, 12), 1)  # so is the documented error check at an epoch's first step
    for name in ("item", "tolist", "__bool__", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "nonzero", guard("torch.nonzero", torch.nonzero))
    for i in range(2):
        loss = saf(x, y, torch.arange(4 * i, 4 * i + 4), 1)
        loss.backward()
    monkeypatch.undo()
    assert int(saf.num_with_target) == 4


# ---------------------------------------------------------------------------------------------
# GPU-only: the CUDA kernel against the CPU one, pinned host banks, CUDA graphs
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_pinned_host_bank_needs_the_cuda_kernels():
    _skip("triton", "cuda")
    host = sk.TrajectoryBank(8, 10, delay=2, pin_memory=True, backend="triton")
    with pytest.raises(sk.BackendUnavailable, match="pinned host memory needs the CUDA kernels"):
        host.step(torch.randn(2, 10, device="cuda"), None, torch.tensor([0, 1], device="cuda"), 0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda"])
def test_pinned_host_bank(backend):
    _skip(backend, "cuda")
    N, S, C, B = 64, 3, 1000, 16
    gpu = sk.TrajectoryBank(N, C, delay=S, dtype=torch.bfloat16, device="cuda", backend=backend)
    host = sk.TrajectoryBank(N, C, delay=S, dtype=torch.bfloat16, pin_memory=True, backend=backend)
    for epoch in range(2 * S):
        ids = torch.randperm(N, device="cuda")[:B]
        z = torch.randn(B, C, device="cuda")
        y = torch.randint(0, C, (B,), device="cuda")
        a = gpu.step(z, y, ids, epoch)
        b = host.step(z, y, ids, epoch)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert host.values.device.type == "cpu" and host.values.is_pinned()
    assert torch.equal(host.values, gpu.values.cpu()) and torch.equal(host.epochs, gpu.epochs.cpu())


@pytest.mark.cuda
def test_cuda_step_is_graph_capturable_and_sync_free():
    _skip("cuda", "cuda")
    bank = make_bank(128, 3, 100, torch.bfloat16, "cuda")
    z = torch.randn(32, 100, device="cuda", requires_grad=True)
    y = torch.randint(0, 100, (32,), device="cuda")
    ids = torch.randperm(128, device="cuda")[:32]
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = tb.trajectory_bank_step(z, y, ids, *bank, 5, backend="cuda")
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        tb.trajectory_bank_step(z.detach(), y, ids, *bank, 6, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, counts = tb.trajectory_bank_step(z.detach(), y, ids, *bank, 7, backend="cuda")
    g.replay()
    torch.cuda.synchronize()
    assert counts.tolist() == [32, 0] and torch.isfinite(out)


# ---------------------------------------------------------------------------------------------
# Fuller grid (SAF_FULL=1 or -m slow)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "device"), KERNEL_PAIRS)
def test_random_runs_match_reference(backend, device):
    """Random shapes, dtypes and histories, several epochs each, kernel and reference side by side."""
    _skip(backend, device)
    for trial in range(12):
        g = torch.Generator().manual_seed(trial)
        S = int(torch.randint(1, 5, (), generator=g))
        C = int(torch.randint(1, 3000, (), generator=g))
        N = int(torch.randint(2, 200, (), generator=g))
        bank_dtype = BANK_DTYPES[trial % 3]
        z_dtype = [torch.float32, torch.bfloat16, torch.float16][(trial // 3) % 3]
        bank = make_bank(N, S, C, bank_dtype, device)
        ref = _clone(bank)
        for epoch in range(2 * S + 2):
            B = int(torch.randint(1, N + 1, (), generator=g))
            ids = torch.randperm(N, generator=g)[:B].to(device)
            z = (torch.randn(B, C, generator=g, dtype=torch.float64) * 4).to(device=device, dtype=z_dtype)
            z.requires_grad_()
            y = torch.randint(0, C, (B,), generator=g).to(device)
            use_past = bool(epoch % 3)
            loss, counts = _run(backend, z, y, ids, bank, epoch, 0.3, 5.0, 0.1, -100, use_past)
            ref_loss, ref_g, ref_counts, ref_after = _reference(z, y, ids, ref, epoch, 0.3, 5.0, 0.1, -100, use_past)
            what = f"trial {trial} N={N} S={S} C={C} B={B} epoch={epoch} {bank_dtype} {z_dtype}"
            assert_close(loss, ref_loss, z_dtype, what)
            assert_close(torch.autograd.grad(loss, z)[0], ref_g, z_dtype, what + " grad")
            assert torch.equal(counts.cpu(), ref_counts.cpu()), what
            ref = [ref_after[0], ref_after[1], ref[2], ref[3]]
            assert torch.equal(bank[1], ref[1]) and torch.equal(bank[0], ref[0]), what
