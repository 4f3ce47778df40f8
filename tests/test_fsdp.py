"""SAM / ASAM and the EMA under FSDP2 (``fully_shard``): 2 gloo processes on CPU, against a
single-process unsharded run of the same global batch, in float64.

The model has a layer whose dim 0 (3) does not divide by the world size (uneven shards) and one
whose dim 0 (1) is smaller than it (rank 1 holds empty shards). The first pass is synchronised
(FSDP reduce-scatters the gradients as usual), so the sharded run must equal one process training
on the whole batch: the global gradient norm is the all-reduce of the shards' partial sums.

One spawn runs every case (a spawn costs seconds here). Also, in one process: the ``sumsq``
input of ``sam_perturb_`` (the split the sharded path uses) gives the plain call's result on every
CPU backend, and the sharded path's argument errors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from saf_kernels import reference
from saf_kernels.ops import _multi_tensor as mt
from saf_kernels.ops import ema as ema_ops
from saf_kernels.ops import sam as sam_ops
from saf_kernels.optim import ASAM, ESAM, GSAM, MSAM, RSAM, SAM, LookSAM

from .helpers import KERNEL_PAIRS, bits, gloo_group, save_rank, skip_unless_available, spawn_ranks
from .tolerances import TOL

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 8

# name -> (optimizer class, base optimizer, keyword arguments)
CASES = {
    "sam-sgd-fused": (SAM, torch.optim.SGD, dict(rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "sam-sgd-exact": (SAM, torch.optim.SGD, dict(rho=0.1, lr=0.1, momentum=0.9, fused_step=False)),
    "asam-adamw-fused": (ASAM, torch.optim.AdamW, dict(rho=0.5, eta=0.01, lr=1e-2, weight_decay=1e-2)),
    "sam-adaptive-torch": (SAM, torch.optim.SGD, dict(rho=0.1, adaptive=True, lr=0.1, backend="torch")),
}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # dim 0 of the weights: 5 (3 + 2 rows), 3 (2 + 1: uneven), 1 (1 + 0: an empty shard)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64),
            torch.randn(GLOBAL_BATCH, 1, generator=g, dtype=torch.float64))


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model


def _train(model, opt, rank=None, steps=range(STEPS)):
    """Two-pass steps through ``opt.step(closure)``; with ``rank``, on that rank's half."""
    for step in steps:
        x, y = _batch(step)
        if rank is not None:
            half = GLOBAL_BATCH // WORLD
            x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def _optimizer(model, name):
    cls, base, kw = CASES[name]
    return cls(model.parameters(), base, **kw)


def _ema_pair():
    """The teacher and the student of the EMA check, unsharded."""
    return _model(1), _model(2)


CKPT_CASE = "asam-adamw-fused"


def _resume(rank, out_dir, uninterrupted):
    """Train STEPS - 1 steps, save model + optimizer through torch.distributed.checkpoint (sharded
    state dicts), load them into a fresh sharded model and optimizer, take the last step: whether
    the weights equal the uninterrupted run's bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = f"{out_dir}/ckpt"
    model = _shard(_model())
    opt = _optimizer(model, CKPT_CASE)
    _train(model, opt, rank, range(STEPS - 1))
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    del model, opt
    model = _shard(_model(7))  # other weights: the load must replace them
    opt = _optimizer(model, CKPT_CASE)
    opt.init_state()  # the state to load into (set_state_dict would call step() to make it)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _train(model, opt, rank, range(STEPS - 1, STEPS))
    return all(torch.equal(bits(p.full_tensor()), bits(u)) for p, u in zip(model.parameters(), uninterrupted))


def _worker(rank, port, out_dir):
    with gloo_group(rank, WORLD, port):
        out = {}
        for name in CASES:
            model = _shard(_model())
            opt = _optimizer(model, name)
            _train(model, opt, rank)
            assert all(type(p).__name__ == "DTensor" for p in model.parameters())
            out[name] = [p.full_tensor() for p in model.parameters()]
            out[name + ":norm"] = opt.last_grad_norm.clone()
        out["resumed"] = _resume(rank, out_dir, out[CKPT_CASE])
        teacher, student = (_shard(m) for m in _ema_pair())
        ema_ops.ema_update_(list(teacher.parameters()), list(student.parameters()), 0.75)
        out["ema"] = [p.full_tensor() for p in teacher.parameters()]
        save_rank(out_dir, rank, out)


def _single(name):
    model = _model()
    opt = _optimizer(model, name)
    _train(model, opt)
    return [p.detach().clone() for p in model.parameters()], opt.last_grad_norm


@pytest.mark.distributed
def test_fsdp2_equals_single_process(tmp_path):
    ranks = spawn_ranks(_worker, WORLD, tmp_path)
    for name in CASES:
        want, norm = _single(name)
        for rank, out in enumerate(ranks):
            for i, (a, e) in enumerate(zip(out[name], want)):
                torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name} rank {rank} "
                                           f"param {i}: {m}")
            # the norm every rank saw is the global one, not its shard's
            torch.testing.assert_close(out[name + ":norm"].double(), norm.double(), rtol=1e-10, atol=0)
    assert all(out["resumed"] for out in ranks), "a run resumed from a torch.distributed.checkpoint differs"
    teacher, student = _ema_pair()
    want = [t.detach().clone() for t in teacher.parameters()]
    reference.ema_update_(want, [p.detach() for p in student.parameters()], 0.75)
    for out in ranks:
        for a, e in zip(out["ema"], want):
            assert torch.equal(bits(a), bits(e))


# --- one process: the split of sam_perturb_ (sam_sumsq, then sumsq=) and the argument errors ---


def _lists(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (0,), (130,), (1,), (2, 2, 5)]  # an empty tensor too (an empty local shard)
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    return params, grads


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_sumsq_split_equals_plain_call(backend, device, adaptive):
    skip_unless_available(backend, device, "sam_perturb_")
    params, grads = _lists(3)
    params = [p.to(device) for p in params]
    grads = [g.to(device) for g in grads]
    eta, rho = 0.01, 0.2
    flags = [adaptive] * len(params)
    s = sam_ops.sam_sumsq(params, grads, flags, eta, backend=backend)
    assert s.dtype == torch.float64 and s.shape == ()
    want = reference.sam_sumsq([p.double() for p in params], [g.double() for g in grads], flags,
                               [eta] * len(params))
    torch.testing.assert_close(s.cpu(), want.cpu(), rtol=TOL[torch.float32][0], atol=0)  # float32 accumulation

    plain = [p.clone() for p in params]
    split = [p.clone() for p in params]
    st1 = [torch.empty_like(p) for p in params]
    st2 = [torch.empty_like(p) for p in params]
    n1 = sam_ops.sam_perturb_(plain, grads, st1, rho, flags, eta, backend=backend)
    # the split as the sharded path runs it: the partial sum, (the all-reduce,) the finalize
    n2 = mt.kernels("sam_perturb_")[backend](split, grads, st2, [rho], [eta], [2 if adaptive else 0], 1e-12, 0,
                                            None, None, s)
    torch.testing.assert_close(n2, n1, rtol=1e-6, atol=0)
    for a, b, w in zip(split, plain, params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert a.numel() == 0 or not torch.equal(a, w)  # perturbed
    for a, w in zip(st2, params):
        assert torch.equal(a, w)  # the stash holds the weights


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_esam_sumsq_split_equals_plain_call(backend, device):
    """ESAM's split: esam_sumsq (the masked partial sum), then esam_perturb_(sumsq=)."""
    skip_unless_available(backend, device, "esam_perturb_")
    from saf_kernels.ops import esam as esam_ops

    params, grads = _lists(6)
    params = [p.to(device) for p in params]
    grads = [g.to(device) for g in grads]
    n, seed, offset, beta, eta = len(params), 1234, 8, [0.5] * len(params), [0.01] * len(params)
    flags = [2, 0, 2, 0, 2]  # adaptive on some tensors
    s = esam_ops.esam_sumsq(params, grads, beta, seed, offset, [f == 2 for f in flags], eta, backend=backend)
    want = reference.esam_sumsq([p.double() for p in params], [g.double() for g in grads], [f == 2 for f in flags],
                                eta, beta, seed, offset)
    torch.testing.assert_close(s.cpu(), want.cpu(), rtol=TOL[torch.float32][0], atol=0)
    full = reference.sam_sumsq([p.double() for p in params], [g.double() for g in grads], [f == 2 for f in flags],
                               eta)
    assert 0 < want < full  # the mask dropped some of the sum, not all
    _same_split("esam_perturb_", backend, lambda: ([p.clone() for p in params], grads,
                                                   [torch.empty_like(p) for p in params], [0.2] * n, eta, beta,
                                                   flags, 1e-7, seed, offset, 0, None, None), s)


def _same_split(op, backend, make_args, partial):
    """``op`` (the kernel of ``backend``) on fresh ``make_args()``, without and with ``partial``
    (its partial sums, as the sharded path passes them): same result, same tensors after."""
    run = mt.kernels(op)[backend]
    a1, a2 = make_args(), make_args()
    torch.testing.assert_close(run(*a2, partial), run(*a1), rtol=1e-6, atol=0)
    for x, y in zip(a1, a2):
        if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            for u, v in zip(x, y):
                torch.testing.assert_close(v, u, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_gsam_rsam_sums_split_equals_plain_call(backend, device):
    """GSAM's split (gsam_sums, then sums=) in both ops, R-SAM's (rsam_sumsq, then sumsq=), LookSAM's two."""
    skip_unless_available(backend, device, "gsam_combine_")
    from saf_kernels.ops import gsam as gsam_ops
    from saf_kernels.ops import rsam as rsam_ops

    params, grads = _lists(7)
    _, old = _lists(8)
    params, grads, old = ([t.to(device) for t in x] for x in (params, grads, old))
    n = len(params)
    sums = gsam_ops.gsam_sums(grads, old, backend=backend)
    want = reference.gsam_sums([g.double() for g in grads], [o.double() for o in old])
    torch.testing.assert_close(sums.cpu(), want.cpu(), rtol=TOL[torch.float32][0], atol=0)
    fresh = lambda xs: [x.clone() for x in xs]  # noqa: E731
    _same_split("gsam_combine_", backend, lambda: (fresh(params), fresh(grads), old, fresh(params), 0.4, 1e-12, 0,
                                                   True, None, None, None), sums)
    _same_split("gsam_restore_sgd_", backend, lambda: (fresh(params), grads, old, fresh(params), fresh(grads),
                                                       [0.1] * n, [0.0] * n, [0.9] * n, [0.0] * n, [0] * n, 0.4,
                                                       1e-12, 0, None, None, None), sums)
    stash = [p - 0.01 * o for p, o in zip(params, old)]  # the clean weights: params are "noised"
    s = rsam_ops.rsam_sumsq(params, grads, stash, 2.0, backend=backend)
    want = reference.rsam_sumsq([t.double() for t in params], [g.double() for g in grads],
                                [t.double() for t in stash], 2.0)
    torch.testing.assert_close(s.cpu(), want.cpu(), rtol=TOL[torch.float32][0], atol=0)
    _same_split("rsam_perturb_", backend, lambda: (fresh(params), grads, stash, [0.1] * n, 2.0, 1e-12, None, None), s)
    # LookSAM: gv_ with GSAM's sums of (g_s = grads, g = old), combine_ with |g|^2
    norm = torch.ones((), device=device)
    _same_split("looksam_gv_", backend, lambda: ([torch.zeros_like(g) for g in grads], norm.clone(), grads, old,
                                                 1e-12), sums)
    gg = sam_ops.sam_sumsq(grads, grads, backend=backend)
    _same_split("looksam_combine_", backend, lambda: (fresh(grads), old, norm, 0.7, 1e-8), gg)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS + [pytest.param("torch", "cpu", id="torch-cpu")])
def test_sumsq_nonfinite_perturbs_nothing(backend, device):
    """A non-finite global sum (another shard overflowed) perturbs nothing here either."""
    skip_unless_available(backend, device, "sam_perturb_")
    params, grads = _lists(4)
    params = [p.to(device) for p in params]
    grads = [g.to(device) for g in grads]
    w = [p.clone() for p in params]
    stash = [torch.empty_like(p) for p in params]
    op = reference.sam_perturb_ if backend == "torch" else mt.kernels("sam_perturb_")[backend]
    sumsq = torch.tensor(float("inf"), dtype=torch.float64, device=device)
    if backend == "torch":
        norm = op(params, grads, stash, [0.1] * 5, [False] * 5, [0.0] * 5, 1e-12, None, None, "copy", sumsq)
    else:
        norm = op(params, grads, stash, [0.1], [0.0], [0], 1e-12, 0, None, None, sumsq)
    assert not torch.isfinite(norm)
    for a, b in zip(params, w):
        assert torch.equal(a, b)


def test_sharded_argument_errors():
    """Mixed DTensor / plain lists, other placements and the optimizers that do not run sharded."""
    pytest.importorskip("torch.distributed.tensor")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from .helpers import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)])
        g = distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)])
        with pytest.raises(TypeError, match=r"stash\[0\] is a plain tensor"):
            sam_ops.sam_perturb_([w], [g], [torch.empty(4, 3)], 0.1)
        with pytest.raises(TypeError, match=r"stash\[0\] is a DTensor but the first tensor is not"):
            sam_ops.sam_restore_([torch.empty(4, 3)], [g])
        q = nn.Parameter(torch.randn(3))
        with pytest.raises(TypeError, match=r"\['params'\]\[1\] is a plain tensor but .* is a DTensor: .*on the root"):
            SAM([nn.Parameter(w), q], torch.optim.SGD, lr=0.1)
        r = distribute_tensor(torch.randn(4, 3), mesh, [Replicate()])
        with pytest.raises(ValueError, match=r"model\[0\] has placements"):
            ema_ops.ema_update_([w], [r], 0.5)
        # a world of one: the sharded call equals the plain one
        stash = distribute_tensor(torch.empty(4, 3), mesh, [Shard(0)])
        w0 = w.to_local().clone()
        norm = sam_ops.sam_perturb_([w], [g], [stash], 0.1)
        plain = [w0.clone()]
        want = sam_ops.sam_perturb_(plain, [g.to_local()], [torch.empty(4, 3)], 0.1)
        assert torch.equal(norm, want) and torch.equal(w.to_local(), plain[0])
        p = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        with pytest.raises(NotImplementedError, match="does not run on sharded parameters"):
            MSAM([p], lr=0.1)
        with pytest.raises(NotImplementedError, match="swp='tensor' does not run on sharded parameters"):
            ESAM([p], torch.optim.SGD, lr=0.1, swp="tensor")
        with pytest.raises(NotImplementedError, match="does not run on sharded tensors yet"):
            from saf_kernels.ops import msam as msam_ops
            msam_ops.msam_sgd_([w], [g], [stash], torch.ones(()), lr=0.1, rho_prev=0.0, rho=0.1)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_opcheck_split(backend):
    skip_unless_available(backend, "cpu", "sam_perturb_")
    ops = {k: mt.kernels(k)[backend] for k in ("sam_sumsq", "sam_perturb_")}
    params, grads = _lists(5)
    stash = [torch.empty_like(p) for p in params]
    torch.library.opcheck(ops["sam_sumsq"], (params, grads, [0.01], [2]))
    s = torch.tensor(3.0, dtype=torch.float64)
    torch.library.opcheck(ops["sam_perturb_"], (params, grads, stash, [0.1], [0.0], [0], 1e-12, 0, None, None, s))


def test_sam_sumsq_bad_arguments():
    p, g = [torch.randn(3)], [torch.randn(3)]
    with pytest.raises(TypeError, match="saf_kernels.sam_sumsq: grads must be a list"):
        sam_ops.sam_sumsq(p, g[0])
    with pytest.raises(ValueError, match="grads has 2 tensors but params has 1"):
        sam_ops.sam_sumsq(p, g * 2)
    with pytest.raises(ValueError, match=r"eta\[0\] must be >= 0, got -1"):
        sam_ops.sam_sumsq(p, g, eta=-1)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \[4\] but params\[0\] has shape \[3\]"):
        sam_ops.sam_sumsq(p, [torch.randn(4)], backend="torch")
    assert sam_ops.sam_sumsq([], []).item() == 0.0


@pytest.mark.parametrize("base,key", [(torch.optim.SGD, "momentum_buffer"), (torch.optim.AdamW, "exp_avg")])
def test_init_state_changes_no_weight(base, key):
    """init_state(): the state set_state_dict loads into, the weights untouched, grads as they were."""
    model = _model()
    w = [p.detach().clone() for p in model.parameters()]
    kw = dict(momentum=0.9, weight_decay=0.1) if base is torch.optim.SGD else dict(weight_decay=0.1)
    opt = SAM(model.parameters(), base, rho=0.1, lr=0.5, **kw)
    opt.init_state()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.count_nonzero(opt.state[p][key]) == 0 for p in model.parameters())
    assert opt.param_groups[0]["lr"] == 0.5
    state = opt.state
    opt.init_state()  # the state exists: nothing happens
    assert opt.state is state


# --- ESAM, R-SAM, GSAM, LookSAM, MSAM under FSDP2: one spawn runs them all, each against a
# single-process run of the whole batch (ESAM's: with the per-rank mask draws) ---

ESAM_KW = dict(rho=0.1, beta=0.5, gamma=1.0, seed=11)


def _mse_per_sample(model, x, y):
    return ((model(x) - y) ** 2).mean(dim=1)


def _half(batch, rank):
    half = GLOBAL_BATCH // WORLD
    return tuple(t[rank * half:(rank + 1) * half] for t in batch)


def _rows_of(t, rank):
    """Rank ``rank``'s shard of ``t`` as FSDP2 cuts it (torch.chunk on dim 0; empty past the last chunk)."""
    parts = torch.chunk(t, WORLD, dim=0)
    return parts[rank] if rank < len(parts) else t[t.shape[0]:]


def _esam_sharded(model, rank):
    from saf_kernels.optim.esam import per_sample_closure

    opt = ESAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **ESAM_KW)
    for step in range(STEPS):
        x, y = _half(_batch(step), rank)
        opt.step(per_sample_closure(model, x, y, lambda o, t: ((o - t) ** 2).mean(dim=1)))


def _esam_single(model):
    """Plain ESAM steps on the whole batch with the masks the ranks draw: rank r draws its shards'
    masks from the counter offset r * (the whole list's Philox counters)."""
    from saf_kernels.optim import _rng

    from .optim_models import esam_reference_step

    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    beta = ESAM_KW["beta"]
    for step in range(STEPS):
        key = _rng.step_key(ESAM_KW["seed"], step)

        def keep(live):
            counters = sum((p.numel() + 3) // 4 for p in live)
            per_rank = [reference.esam_keep_masks([_rows_of(p, r) for p in live], [beta] * len(live), key,
                                                  r * counters) for r in range(WORLD)]
            return [torch.cat([m[i] for m in per_rank]) for i in range(len(live))]

        esam_reference_step(model, sgd, *_batch(step), ESAM_KW["rho"], beta, ESAM_KW["gamma"], keep,
                            per_sample=_mse_per_sample)


RSAM_KW = dict(rho=0.1, noise_std=0.05, seed=5, lr=0.1, momentum=0.9)


class _RSAMPerShardNoise(RSAM):
    """R-SAM in one process with the noise the ranks draw, from the reference functions: rank r's
    rows of the 2+-dim tensors from the counter offset r * (the whole list's counters); its slice
    of a 1-D tensor scaled by the tensor's global norm, z from the counters after its rows."""

    @torch.no_grad()
    def noise_step(self):
        from saf_kernels.optim import _rng

        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        std, key = float(self.noise_std(self._step)), _rng.step_key(self._seed, self._step)
        stash = self._stash_for(params)
        for s, p in zip(stash, params):
            s.copy_(p)
        counters = sum((p.numel() + 3) // 4 for p in params)
        for r in range(WORLD):
            rows = [_rows_of(p, r) for p in params if p.dim() >= 2]
            for v, d in zip(rows, reference.rsam_noise(rows, [std] * len(rows), key, r * counters)):
                reference.flat_memory(v).add_(d)
            ctr = r * counters + sum((v.numel() + 3) // 4 for v in rows)
            for p, s in zip(params, stash):
                if p.dim() < 2:
                    v = _rows_of(p, r)
                    z = reference.philox_normal(torch.arange(v.numel()), key, ctr)
                    v.add_(std * (s.norm() + 1e-16) * z)
                    ctr += (v.numel() + 3) // 4
        self._noised = params


def _plain(cls, base, **kw):
    """The two runs of an optimizer whose single-process run is itself on the whole batch."""
    def sharded(model, rank):
        _train(model, cls(model.parameters(), base, **kw), rank)

    def single(model):
        _train(model, cls(model.parameters(), base, **kw))

    return sharded, single


# name -> (the sharded run on a fully_shard-ed _model(), the single-process run on an unsharded one)
SLICE2 = {
    "esam": (_esam_sharded, _esam_single),
    "gsam-sgd-fused": _plain(GSAM, torch.optim.SGD, rho=0.1, alpha=0.4, lr=0.1, momentum=0.9),
    "gsam-adamw": _plain(GSAM, torch.optim.AdamW, rho=0.1, alpha=0.4, lr=1e-2),
    "rsam": (_plain(RSAM, torch.optim.SGD, **RSAM_KW)[0], _plain(_RSAMPerShardNoise, torch.optim.SGD, **RSAM_KW)[1]),
    # k=2 over 3 steps: a SAM step (g_v), a reuse step, a SAM step
    "looksam": _plain(LookSAM, torch.optim.SGD, rho=0.1, k=2, alpha=0.7, lr=0.1, momentum=0.9),
}
# the noise: the ops' float32 normals against the reference's float64 ones from the same uniforms
RTOL = {"rsam": 1e-6}


def _worker_slice2(rank, port, out_dir):
    with gloo_group(rank, WORLD, port):
        out = {}
        for name, (sharded, _) in SLICE2.items():
            model = _shard(_model())
            sharded(model, rank)
            out[name] = [p.full_tensor() for p in model.parameters()]
        save_rank(out_dir, rank, out)


@pytest.mark.distributed
def test_fsdp2_more_methods_equal_single_process(tmp_path):
    ranks = spawn_ranks(_worker_slice2, WORLD, tmp_path)
    for name, (_, single) in SLICE2.items():
        model = _model()
        single(model)
        for rank, out in enumerate(ranks):
            for i, (a, e) in enumerate(zip(out[name], model.parameters())):
                torch.testing.assert_close(a, e.detach(), rtol=RTOL.get(name, 1e-10), atol=1e-12,
                                           msg=lambda m: f"{name} rank {rank} param {i}: {m}")
