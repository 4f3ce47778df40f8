"""The sharded row group of the methods table (``python -m saf_kernels.bench --sharded``): one
training step of SGD, SAM (exact second step) and SAM with the fused restore + SGD step, under
DDP and under FSDP2 (``fully_shard`` on every layer with parameters and on the root), in
``WORLD`` processes (gloo on CPU, NCCL on CUDA with one GPU per rank), with the collectives each
step issues, counted.

Same model and global batch as the methods table (the small CNN, 128 x 1 x 28 x 28 on CPU;
ResNet-18 on GPU), split evenly over the ranks. Times are rank 0's median over interleaved
rounds (every configuration once per round; the collectives keep the ranks in step); "vs SGD" is
against SGD under the same wrapper. SAM under DDP runs as the optimizer's default
(``sync_first_pass=False``: the first backward inside ``no_sync()``, per-replica perturbations,
no all-reduce); under FSDP2 the first pass always reduce-scatters (the global-batch perturbation).

Counted per step on rank 0: every ``torch.distributed`` all-reduce, reduce-scatter and all-gather
the step calls through Python: FSDP2's own collectives, this library's norm all-reduce and, under
DDP, the gradient buckets (DDP's default all-reduce set as a communication hook, which calls
``torch.distributed.all_reduce``; the bytes are those of the buckets).
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections import defaultdict

import torch
import torch.nn.functional as F

TITLE = ("Sharded training: one step under DDP and FSDP2 ({world} ranks, {backend}, {model}, global batch {batch}; "
         "vs SGD = same wrapper's SGD; collectives per step on rank 0: count / input bytes)")
WORLD = 2
CONFIGS = [(w, m) for w in ("ddp", "fsdp2") for m in ("sgd", "sam", "sam_fused")]
# The collectives counted: torch.distributed's name (the first one present: torch 2.13 renamed
# reduce_scatter_tensor / all_gather_into_tensor, and FSDP2 calls the new names) and the
# (keyword, position) of the tensor each rank puts in. Calls through torch.distributed's
# namespace are counted (FSDP2's, DDP's comm hook's, this library's), not calls inside c10d.
_COUNTED = [(("all_reduce",), "tensor", 0), (("reduce_scatter_single", "reduce_scatter_tensor"), "input", 1),
            (("all_gather_single", "all_gather_into_tensor"), "input_tensor", 1)]


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


class _Counter:
    """Counts the collectives called through ``torch.distributed`` while active."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.count: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.active = False
        self._orig = {}
        for names, key, pos in _COUNTED:
            name = next(n for n in names if hasattr(dist, n))
            self._orig[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name.replace("_single", "").replace("_tensor", ""), key, pos,
                                           self._orig[name]))

    def _wrap(self, label, key, pos, fn):
        def counted(*args, **kwargs):
            if self.active:
                self.add(label, kwargs.get(key, args[pos] if len(args) > pos else None))
            return fn(*args, **kwargs)

        return counted

    def add(self, name: str, t) -> None:
        self.count[name] += 1
        self.bytes[name] += _nbytes(t) if isinstance(t, torch.Tensor) else 0

    @staticmethod
    def ddp_hook():
        """DDP's default all-reduce hook: its gradient buckets then go through
        ``torch.distributed.all_reduce`` in Python (counted) instead of the C++ reducer's call."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        return allreduce_hook

    def restore(self) -> None:
        for name, fn in self._orig.items():
            setattr(self.dist, name, fn)


def _build(wrapper: str, method: str, ctx, counter: _Counter):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ..optim import SAM

    model = ctx.model_fn()
    if wrapper == "ddp":
        net = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        net.register_comm_hook(None, counter.ddp_hook())
    else:
        for m in model.modules():
            if m is not model and any(True for _ in m.parameters(recurse=False)):
                fully_shard(m)
        net = fully_shard(model)
    params = net.parameters()
    if method == "sgd":
        opt = ctx.sgd(params)
    else:
        opt = SAM(params, torch.optim.SGD, rho=0.05, lr=ctx.lr, momentum=ctx.momentum, weight_decay=ctx.weight_decay,
                  fused_step=method == "sam_fused", model=net)

    def step(i: int) -> None:
        x, y, _ = ctx.batch(i)

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        if method == "sgd":
            closure()
            opt.step()
        else:
            opt.step(closure)

    return step


def _worker(rank: int, port: int, out_dir: str, quick: bool, device_type: str) -> None:
    import torch.distributed as dist

    from .methods import make_context
    from .timing import interleaved, synchronize

    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // WORLD))
    ctx = make_context(device, quick)
    share = ctx.batch_size // WORLD  # this rank's part of every global batch
    ctx.inputs = [x[rank * share:(rank + 1) * share] for x in ctx.inputs]
    ctx.labels = [y[rank * share:(rank + 1) * share] for y in ctx.labels]
    counter = _Counter()
    steps, comm = {}, {}
    for wrapper, method in CONFIGS:
        name = f"{wrapper}:{method}"
        steps[name] = _build(wrapper, method, ctx, counter)
        for i in range(2):  # warm-up (FSDP2's lazy init, DDP's first buckets)
            steps[name](i)
        synchronize(device)
        counter.count.clear()
        counter.bytes.clear()
        counter.active = True
        steps[name](2)
        synchronize(device)
        counter.active = False
        comm[name] = {"count": dict(counter.count), "bytes": dict(counter.bytes)}
    rounds, inner = (3, 2) if quick else (9, 3)
    samples = interleaved(steps, device, rounds, inner, 3)
    counter.restore()
    if rank == 0:
        torch.save({"samples": samples, "comm": comm, "batch": share * WORLD}, os.path.join(out_dir, "r.pt"))
    dist.barrier()
    # No destroy_process_group: torch 2.13's gloo teardown can deadlock a process (see
    # tests/helpers.spawn_ranks); the process ends here, its group with it.
    os._exit(0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(device: torch.device, quick: bool, progress) -> tuple[list[dict], dict]:
    """Rows (``kind="sharded"``) and the title's fields; spawns ``WORLD`` processes."""
    import torch.multiprocessing as mp

    from .methods import describe

    progress.add(1)
    if device.type == "cuda" and torch.cuda.device_count() < WORLD:
        return [{"kind": "sharded", "method": "all", "unavailable": f"needs {WORLD} GPUs"}], {}
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), out_dir, quick, device.type), nprocs=WORLD, join=True)
        res = torch.load(os.path.join(out_dir, "r.pt"), weights_only=False)
    progress("sharded")
    rows = []
    for (wrapper, method) in CONFIGS:
        name = f"{wrapper}:{method}"
        s = res["samples"][name]
        base = statistics.median(res["samples"][f"{wrapper}:sgd"])
        c = res["comm"][name]
        rows.append({"kind": "sharded", "wrapper": wrapper, "method": method, "median_s": statistics.median(s),
                     "ratio_to_sgd": statistics.median(s) / base, "samples": s,
                     "collectives_per_step": c["count"], "collective_bytes_per_step": c["bytes"]})
    info = describe(device, quick)
    fields = {"world": WORLD, "backend": "nccl" if device.type == "cuda" else "gloo", "model": info["model"],
              "batch": res["batch"]}
    return rows, fields


def _cell(row: dict, key: str) -> str:
    """``count / bytes`` per step of the collectives named ``key*``."""
    n = sum(v for k, v in row["collectives_per_step"].items() if k.startswith(key))
    nb = sum(v for k, v in row["collective_bytes_per_step"].items() if k.startswith(key))
    if not n:
        return "-"
    return f"{n} / {nb} B" if nb < 2**10 else f"{n} / {nb / 2**10:.1f} KiB"


def table(rows: list[dict]) -> str:
    from .report import _fmt_time, _table

    lines, notes = [], []
    for r in rows:
        if r.get("kind") != "sharded":
            continue
        if "unavailable" in r:
            notes.append(r["unavailable"])
            continue
        cells = [_cell(r, key) for key in ("all_reduce", "reduce_scatter", "all_gather")]
        lines.append([r["wrapper"], r["method"], _fmt_time(r["median_s"]), f"{r['ratio_to_sgd']:.3f}x", *cells])
    text = _table(["wrapper", "method", "step", "vs SGD", "all-reduce (n / bytes)", "reduce-scatter",
                   "all-gather"], lines)
    return text + ("\n\nNot measured: " + "; ".join(notes) if notes else "")
