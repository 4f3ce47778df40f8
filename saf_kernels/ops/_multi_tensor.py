"""The one wrapper path of the fused ops (``sam.py``, ``esam.py``, ``rsam.py``, ``gsam.py``,
``looksam.py``, ``msam.py``, ``ema.py``, ``philox.py``, ``trajectory_loss.py``, ``trajectory_bank.py``).

An op module states three things and calls this module for the rest:

1. its **schema**: :func:`register` takes the Triton op's schema string and the fake (meta)
   kernel, defines ``saf_kernels::<op>_triton`` (its body imports ``saf_kernels.triton.<module>``
   at the first call), registers the fake for the C++ op ``saf_kernels::<op>`` when the
   extension is built, and files the op of each backend for :func:`kernels`;
2. its **checks** of the arguments, built from the helpers here (:func:`tensor_lists`,
   :func:`per_tensor`, :func:`amp_scalars`, ...) and :mod:`saf_kernels._checks`;
3. the **call**: :func:`run` resolves the backend, makes the per-tensor checks
   (:func:`check_streams`) on the Triton and reference paths only, and calls the reference or the
   fused op.

The C++ ops check every tensor themselves (csrc/mt_plan.h), so the CPU and CUDA paths pay no
per-tensor Python cost; the Triton and reference paths run :func:`check_streams`, which raises
the same errors.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Union

import torch

from .. import _backend, _checks

Floats = Union[float, Sequence[float]]  # a number, or one per tensor
Bools = Union[bool, Sequence[bool]]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
STASH_MODES = {"copy": 0, "delta": 1}
SGD_NESTEROV, SGD_MAXIMIZE, SGD_FIRST_RUN = 2, 4, 8  # flags bits of the fused SGD steps (multi_tensor.h)


# --------------------------------------------------------------------------------------------
# Registration: the fake kernels and the Triton custom ops, and the op of each backend.
# --------------------------------------------------------------------------------------------

_KERNELS: dict[str, dict[str, object]] = {}


def norm_fake(params, *args):
    """Fake kernel of the ops that return a global norm: a 0-dim float32 (float64) tensor."""
    dt = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    return torch.empty((), dtype=dt, device=params[0].device)


def sumsq_fake(params, *args):
    """Fake kernel of ``sam_sumsq``: a 0-dim float64 tensor."""
    return torch.empty((), dtype=torch.float64, device=params[0].device)


def sums_fake(tensors, *args):
    """Fake kernel of ``gsam_sums``: 3 float64 values."""
    return torch.empty(3, dtype=torch.float64, device=tensors[0].device)


def stats_fake(params, *args):
    """Fake kernel of GSAM's ops: ``[cos, ||g||, ||g_p||]``."""
    dt = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    return torch.empty(3, dtype=dt, device=params[0].device)


def void_fake(*args):
    return None


def _triton_body(path: str) -> Callable:
    """Calls ``saf_kernels.triton.<path>`` ("module.function"), imported at the first call (the
    Triton modules import triton; importing saf_kernels must not)."""
    module, name = path.rsplit(".", 1)
    found: list[Callable] = []

    def body(*args):
        if not found:
            found.append(getattr(importlib.import_module(f"saf_kernels.triton.{module}"), name))
        return found[0](*args)

    return body


def register(op: str, triton_schema: str, fake: Callable, triton: str):
    """Registers the op ``saf_kernels::<op>`` of every backend and returns the Triton one.

    ``saf_kernels::<op stem>_triton`` is defined with ``triton_schema`` (its arguments and alias
    annotations; the mutated arguments are read from it) and runs ``saf_kernels.triton.<triton>``;
    ``fake`` is its fake kernel and, when the extension is built, that of the C++ op
    ``saf_kernels::<op>`` (its schema is in ``csrc/ops.cpp``). :func:`kernels` gives both.
    """
    qualname = f"saf_kernels::{op.rstrip('_')}_triton"
    schema = torch._C.parse_schema(qualname + triton_schema)
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    triton_op = torch.library.custom_op(qualname, _triton_body(triton), mutates_args=mutated, schema=triton_schema)
    triton_op.register_fake(fake)
    ops = _KERNELS[op] = {"triton": getattr(torch.ops.saf_kernels, qualname.split("::")[1])}
    if _backend.HAS_EXT:
        torch.library.register_fake(f"saf_kernels::{op}")(fake)
        ops["cpu"] = ops["cuda"] = getattr(torch.ops.saf_kernels, op)
    return triton_op


def kernels(op: str) -> dict[str, object]:
    """The fused op of each kernel backend available here for ``op`` (``cpu``/``cuda`` share the
    C++ op): ``{"triton": ..., "cpu": ..., "cuda": ...}``."""
    return _KERNELS[op]


def run(op: str, fn: str, backend: str, device: torch.device, streams, reference_call: Callable, *args,
        same_dtype: Sequence[str] = (), scalar: Sequence[str] = (), more_checks: Callable | None = None):
    """The call of a multi-tensor op, once its arguments are checked: resolves ``backend`` for
    ``device``; the C++ op (which checks every tensor itself) gets ``args``; the Triton op and the
    reference run :func:`check_streams` on ``streams`` (unless None) and then ``more_checks()`` first, then the
    Triton op gets ``args`` and the reference runs ``reference_call()``."""
    impl = _backend.resolve(backend, device, op)
    if impl == "cpu" or impl == "cuda":
        return _KERNELS[op][impl](*args)
    if streams is not None:
        check_streams(fn, streams, scalar, same_dtype)
    if more_checks is not None:
        more_checks()
    if impl == "torch":
        return reference_call()
    return _KERNELS[op]["triton"](*args)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def as_list(x, name: str, fn: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor) or not isinstance(x, (list, tuple)):
        raise TypeError(f"{fn}: {name} must be a list or tuple of tensors, got {type(x).__name__}")
    return x if isinstance(x, list) else list(x)


def check_lengths(fn: str, **lists) -> int:
    names = list(lists)
    n = len(lists[names[0]])
    for k in names[1:]:
        if len(lists[k]) != n:
            raise ValueError(f"{fn}: {k} has {len(lists[k])} tensors but {names[0]} has {n}")
    return n


def tensor_lists(fn: str, **named) -> tuple:
    """Each argument as a list of tensors (:func:`as_list`, in order), then their lengths checked
    equal (:func:`check_lengths`): returns the lists and their common length ``n``. A list of
    ``DTensor`` s is refused here (the ops that run sharded call :func:`local_shards` first)."""
    lists = [as_list(v, k, fn) for k, v in named.items()]
    for k, lst in zip(named, lists):
        if lst and is_dtensor(lst[0]):
            raise NotImplementedError(
                f"{fn}: {k}[0] is a DTensor (a sharded parameter, e.g. under FSDP2's fully_shard); this op does "
                f"not run on sharded tensors yet (those that do: {', '.join(SHARDED_OPS)})")
    n = len(lists[0])
    for lst in lists:
        if len(lst) != n:
            check_lengths(fn, **dict(zip(named, lists)))  # raises, naming the list
    return (*lists, n)


# --------------------------------------------------------------------------------------------
# Sharded tensors (FSDP2): the ops run on the local shards
# --------------------------------------------------------------------------------------------

#: The ops that take lists of DTensors (FSDP2's sharded parameters, gradients and states).
SHARDED_OPS = ("sam_perturb_", "sam_restore_", "sam_restore_sgd_", "sam_restore_adamw_", "ema_update_",
               "esam_perturb_", "esam_restore_", "gsam_combine_", "gsam_restore_sgd_",
               "rsam_noise_", "rsam_perturb_", "looksam_gv_", "looksam_combine_")
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``DTensor``; a plain tensor is answered by its type alone (the per-call
    fast path of every op)."""
    if type(t) in _PLAIN or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def global_sums(group, local) -> torch.Tensor | None:
    """Sharded training's global sums (a norm's sum of squares, GSAM's dot products): ``local()``,
    this rank's partial-sum stage over its shards (a float64 tensor on the device), then ONE
    ``all_reduce`` (SUM) of it on ``group``, queued on the device's stream with no host
    synchronisation; the op's finalize reads the result. None for plain tensors (``group`` None):
    the op reduces its own partials."""
    if group is None:
        return None
    sums = local()
    torch.distributed.all_reduce(sums, group=group)
    return sums


def local_shards(fn: str, **named) -> tuple:
    """The lists of an op that runs on sharded tensors, each as a list (:func:`as_list`), and the
    process group of their shards: ``(*lists, group)``.

    Plain tensors come back as they are, with ``group`` None. ``DTensor`` s, as FSDP2's
    ``fully_shard`` makes them (one mesh dimension, ``Shard(0)``: each rank holds a slice of dim 0,
    possibly uneven or empty), come back as their local shards (``to_local()``: views of the
    DTensors' storage, so an op in place on them updates the DTensors) with the mesh's process
    group, over which the op all-reduces its global quantities. Every tensor of every list must
    then be such a DTensor on the same mesh; a mix, another placement or another mesh is an error
    naming the argument (on plain lists only the first tensor of each list is looked at). The
    elementwise ops need nothing more: the math of each element is local.
    """
    lists = [as_list(v, k, fn) for k, v in named.items()]
    first = next((lst[0] for lst in lists if lst), None)
    if first is None or not is_dtensor(first):
        # Plain: only each list's first tensor is looked at (a scan of every tensor would cost
        # ~40 ns each, a tenth of a small model's call); a DTensor further on is refused by
        # the dispatcher, and the optimizers check their parameters once at construction.
        for k, lst in zip(named, lists):
            if lst and is_dtensor(lst[0]):
                raise TypeError(f"{fn}: {k}[0] is a DTensor but the first tensor is not; pass all DTensors "
                                "(sharded alike) or all plain tensors")
        return (*lists, None)
    from torch.distributed.tensor import DTensor, Shard

    mesh = first.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"{fn}: DTensors on a {mesh.ndim}-D device mesh (e.g. HSDP) are not supported yet; "
                                  "use fully_shard on a 1-D mesh")
    out = []
    for k, lst in zip(named, lists):
        local = []
        for i, t in enumerate(lst):
            if not isinstance(t, DTensor):
                raise TypeError(f"{fn}: {k}[{i}] is a plain tensor but the others are DTensors; pass all "
                                "DTensors (sharded alike) or all plain tensors")
            if t.device_mesh != mesh:
                raise ValueError(f"{fn}: {k}[{i}] is on the device mesh {t.device_mesh}, the others on {mesh}")
            if tuple(t.placements) != (Shard(0),):
                raise ValueError(f"{fn}: {k}[{i}] has placements {tuple(t.placements)}; the sharded ops take "
                                 "tensors sharded on dim 0, (Shard(dim=0),), as fully_shard makes them")
            local.append(t.to_local())
        out.append(local)
    return (*out, mesh.get_group())


def device_of(lst, *scalars) -> torch.device:
    """The tensors' device: the first tensor's, else the first scalar tensor's, else the CPU."""
    if lst:
        return lst[0].device
    for s in scalars:
        if isinstance(s, torch.Tensor):
            return s.device
    return torch.device("cpu")


def amp_scalars(fn: str, params: list, n: int, **scalars) -> torch.device:
    """Checks the one-element tensors (``grad_scale``, ``found_inf``; :func:`check_scalar`), on
    the params' device when there are params; returns that device (:func:`device_of`)."""
    dev = params[0].device if params else device_of(params, *scalars.values())
    for name, t in scalars.items():
        if t is not None:
            check_scalar(t, name, fn, dev if n else None)
    return dev


def per_tensor(value, n: int, name: str, fn: str, *, kind=float, nonneg: bool = False) -> list:
    """The per-tensor values of a number (returned as a one-element list: the ops broadcast it)
    or of a sequence of length n, checked; the error names the offending value."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a number or a sequence of numbers, not a tensor")
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{fn}: {name} has {len(value)} values for {n} tensors")
        vals = list(value)
    else:
        vals = [value]
    if kind is bool:
        if not all(isinstance(v, bool) for v in vals):  # 1 is a number, not a yes
            i = next(i for i, v in enumerate(vals) if not isinstance(v, bool))
            raise TypeError(f"{fn}: {name}[{i}] must be a bool, got {vals[i]!r}")
        return [bool(v) for v in vals]
    try:
        out = [float(v) for v in vals]
        ok = not any(isinstance(v, bool) for v in vals) and all(map(math.isfinite, out))
    except (TypeError, ValueError):
        ok = False
    if not ok or (nonneg and out and min(out) < 0):
        for i, v in enumerate(vals):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{fn}: {name}[{i}] must be a finite number, got {v!r}")
            if nonneg and v < 0:
                raise ValueError(f"{fn}: {name}[{i}] must be >= 0, got {v!r}")
    return out


def full(values: list, n: int) -> list:
    """A per-tensor list at full length (the reference paths zip over it)."""
    return values * n if len(values) == 1 and n != 1 else values


def per_tensor_full(value, n: int, name: str, fn: str, **kw) -> list:
    """:func:`per_tensor` at full length, for ops whose kernels index one value per tensor."""
    return full(per_tensor(value, n, name, fn, **kw), n)


def sgd_options(fn: str, n: int, bufs: list, lr, weight_decay, momentum, dampening, nesterov, maximize,
                first_run) -> tuple[list, ...]:
    """The SGD hyperparameters of the fused restore + SGD ops (sam_restore_sgd_,
    gsam_restore_sgd_), per tensor (:func:`per_tensor`), checked as ``torch.optim.SGD`` checks
    them: lr, weight_decay and momentum >= 0, nesterov only with momentum > 0 and dampening 0,
    and momentum buffers whenever a momentum is non-zero (empty lists need none)."""
    lr_l = per_tensor(lr, n, "lr", fn, nonneg=True)
    wd_l = per_tensor(weight_decay, n, "weight_decay", fn, nonneg=True)
    mom_l = per_tensor(momentum, n, "momentum", fn, nonneg=True)
    damp_l = per_tensor(dampening, n, "dampening", fn)
    nest = per_tensor(nesterov, n, "nesterov", fn, kind=bool)
    maxi = per_tensor(maximize, n, "maximize", fn, kind=bool)
    first = per_tensor(first_run, n, "first_run", fn, kind=bool)
    if any(nest):
        for i, (a, m, d) in enumerate(zip(full(nest, n), full(mom_l, n), full(damp_l, n))):
            if a and (m <= 0 or d != 0):
                raise ValueError(f"{fn}: nesterov[{i}]=True needs momentum > 0 and dampening 0 (as torch.optim.SGD), "
                                 f"got momentum={m!r}, dampening={d!r}")
    if n and not bufs and any(m != 0 for m in mom_l):
        raise ValueError(f"{fn}: momentum != 0 needs momentum_buffers")
    return lr_l, wd_l, mom_l, damp_l, nest, maxi, first


def stash_mode_code(stash_mode: str, fn: str) -> int:
    if stash_mode not in STASH_MODES:
        raise ValueError(
            f"{fn}: stash_mode must be 'copy' (exact restore) or 'delta' (lossy), got {stash_mode!r}"
        )
    return STASH_MODES[stash_mode]


def sgd_flags(nesterov: list, maximize: list, first_run: list, n: int) -> list:
    """The flags of the fused SGD steps from :func:`sgd_options`' bools: one value when each
    is one value, else one per tensor."""
    if len(nesterov) == len(maximize) == len(first_run) == 1:
        return [SGD_NESTEROV * nesterov[0] + SGD_MAXIMIZE * maximize[0] + SGD_FIRST_RUN * first_run[0]]
    return [SGD_NESTEROV * a + SGD_MAXIMIZE * b + SGD_FIRST_RUN * c
            for a, b, c in zip(full(nesterov, n), full(maximize, n), full(first_run, n))]


def check_eps(eps, fn: str) -> float:
    """``eps`` added to a norm: a finite number >= 0."""
    return _checks.number(eps, "eps", fn, lo=0)


def check_scalar(t, name: str, fn: str, device: torch.device | None) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor or None, got {type(t).__name__}")
    if t.numel() != 1 or not t.is_floating_point():
        raise ValueError(
            f"{fn}: {name} must be a one-element floating tensor, got shape {tuple(t.shape)} {t.dtype}"
        )
    if device is not None and t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device} but the tensors are on {device}")


def check_streams(
    fn: str,
    streams: Sequence[tuple[str, list[torch.Tensor]]],
    scalar: Sequence[str] = (),
    same_dtype: Sequence[str] = (),
) -> None:
    """Per-tensor checks of the Triton and reference paths (the C++ ops make the same ones)."""
    first_name, first = streams[0]
    dev = first[0].device if first else None
    for name, lst in streams:
        for i, t in enumerate(lst):
            where = f"{fn}: {name}[{i}]"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where} is {type(t).__name__}, not a tensor")
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"{where} has dtype {t.dtype}; expected float32, float16, bfloat16 or float64"
                )
            if t.device != dev:
                raise ValueError(f"{where} is on {t.device} but {first_name}[0] is on {dev}")
            if t.is_sparse:
                raise ValueError(f"{where} is sparse; only dense tensors are supported")
            p = first[i]
            if name in scalar:
                if t.numel() != 1:
                    raise ValueError(f"{where} must have one element, got shape {list(t.shape)}")
                continue
            if t.shape != p.shape:
                raise ValueError(
                    f"{where} has shape {list(t.shape)} but {first_name}[{i}] has shape {list(p.shape)}"
                )
            if t.numel() > 1 and _layout(t) != _layout(p):
                raise ValueError(
                    f"{where} has strides {list(t.stride())} but {first_name}[{i}] has strides "
                    f"{list(p.stride())} (the lists must share one memory layout)"
                )
            if t.numel() > 1 and not _dense(t):
                raise ValueError(
                    f"{where} is not dense (strides {list(t.stride())}); pass a contiguous tensor"
                )
            if name in same_dtype and t.dtype != p.dtype:
                raise TypeError(f"{where} has dtype {t.dtype} but {first_name}[{i}] has dtype {p.dtype}")


def _layout(t: torch.Tensor) -> list[int]:
    """The strides that order the elements: a dimension of size 1 has no say (a ``[1, 7]`` view
    with strides ``(1, 1)`` lies in memory as a contiguous one, whose strides are ``(7, 1)``)."""
    return [s for s, n in zip(t.stride(), t.shape) if n != 1]


def _dense(t: torch.Tensor) -> bool:
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return True
    # Non-overlapping and dense in some order of the dimensions.
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True
