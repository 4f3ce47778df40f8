"""Language-model scale SAF / MESA loss: the output layer, cross-entropy and the trajectory KL fused
so that the ``[N, V]`` logits never exist at once.

Flow: :func:`fused_linear_trajectory_loss` -> :func:`saf_kernels._backend.resolve` (the row kernel) ->
the custom op ``saf_kernels::fused_linear_trajectory_loss`` (this module), which walks over chunks of
rows: the chunk's logits (and its target's) by ``torch`` matmuls (cuBLAS / MKL), then the library's
fused row op ``trajectory_loss`` (C++ CPU / CUDA or Triton; :mod:`saf_kernels.ops.trajectory_loss`)
for the chunk's loss and logit gradient in one pass, then the chunk's share of the gradients of
``hidden``, ``weight`` and ``bias``. The gradients are thus computed in the forward and saved; the
backward only scales them by the incoming gradient (as Liger-Kernel's fused linear losses do).
``backend="torch"`` runs :func:`saf_kernels.reference.fused_linear_trajectory_loss` (materialised).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _backend, _checks, reference
from . import _multi_tensor as mt
from .trajectory_loss import _REDUCTION_CODE, fused_ops
from .trajectory_loss import OP as ROW_OP

FN = "saf_kernels.fused_linear_trajectory_loss"
_SUM = _REDUCTION_CODE["sum"]
CPU_CHUNK_BYTES = 32 * 2**20  # one chunk x V float32 tensor, CPU (chunk_size=None)
CUDA_CHUNK_BYTES = (64 * 2**20, 512 * 2**20)  # its clamp on CUDA: free memory / 16 within these


def auto_chunk_size(n: int, v: int, device: torch.device) -> int:
    """Rows per chunk when ``chunk_size=None``: the largest count whose ``chunk x V`` float32
    tensor fits the budget -- 32 MiB on CPU; on CUDA a sixteenth of the free memory
    (``torch.cuda.mem_get_info``) clamped to [64 MiB, 512 MiB] -- at least 1 and at most ``N``.
    A chunk holds about three such tensors (logits, target logits, their gradient)."""
    budget = CPU_CHUNK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(max(free // 16, CUDA_CHUNK_BYTES[0]), CUDA_CHUNK_BYTES[1])
    return max(1, min(n, budget // (4 * max(v, 1))))


# --------------------------------------------------------------------------------------------
# The custom op: forward and gradients, chunk by chunk
# --------------------------------------------------------------------------------------------

_SCHEMA = ("(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? target_hidden, "
           "Tensor? target_weight, Tensor? target_bias, Tensor? target_logits, Tensor? topk_idx, "
           "Tensor? topk_logit, Tensor? topk_lse, Tensor? topk_valid, float lam, float temperature, "
           "float label_smoothing, SymInt ignore_index, SymInt chunk_size, str backend, bool need_grad) "
           "-> (Tensor, Tensor, Tensor, Tensor)")


def _acc_dtype(hidden):
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _chunk_target(s, e, z, target_hidden, target_weight, target_bias, target_logits, topk, temperature):
    if target_logits is not None:
        return target_logits[s:e]
    if target_hidden is not None:
        return F.linear(target_hidden[s:e], target_weight, target_bias)
    idx, logit, lse, valid = topk
    t = reference.topk_target_logits(idx[s:e], logit[s:e], lse[s:e], z.shape[1], temperature)
    if valid is not None:  # rows without a record: the logits themselves, so KL and its gradient are 0
        t = torch.where(valid[s:e, None], t, z.to(t.dtype))
    return t


def _forward(hidden, weight, bias, labels, target_hidden, target_weight, target_bias, target_logits, topk_idx,
             topk_logit, topk_lse, topk_valid, lam, temperature, label_smoothing, ignore_index, chunk_size, backend,
             need_grad):
    row_op = fused_ops()[backend]
    n = hidden.shape[0]
    acc = _acc_dtype(hidden)
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    g_hidden, g_weight, g_bias = _empty_grads(hidden, weight, bias, need_grad, acc)
    topk = (topk_idx, topk_logit, topk_lse, topk_valid)
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        h = hidden[s:e]
        z = F.linear(h, weight, bias)
        t = _chunk_target(s, e, z, target_hidden, target_weight, target_bias, target_logits, topk, temperature)
        loss_c, dz = row_op(z, t, labels[s:e], temperature, 1.0, lam, label_smoothing, ignore_index, _SUM, need_grad)
        loss += loss_c
        if need_grad:
            torch.mm(dz, weight, out=g_hidden[s:e])
            if g_weight.dtype == dz.dtype:
                g_weight.addmm_(dz.t(), h)
            else:  # bf16 / fp16: the chunk's product (fp32 inside the GEMM) added to the fp32 sum
                g_weight.add_(torch.mm(dz.t(), h))
            if g_bias is not None:
                g_bias.add_(dz.sum(0, dtype=acc))
    # Mean over the rows not ignored, counted on the device (no host synchronisation); none -> 0.
    count = (labels != ignore_index).sum().clamp(min=1).to(acc)
    loss = loss / count
    if not need_grad:
        return loss, hidden.new_empty((0,)), weight.new_empty((0,)), hidden.new_empty((0,))
    # In place: at LM scale the float32 weight gradient is gigabytes (128256 x 4096: 2 GiB).
    g_hidden.div_(count)
    g_weight = g_weight.div_(count).to(weight.dtype)
    g_bias = g_bias.div_(count).to(bias.dtype) if g_bias is not None else hidden.new_empty((0,))
    return loss, g_hidden, g_weight, g_bias


def _empty_grads(hidden, weight, bias, need_grad, acc):
    if not need_grad:
        return None, None, None
    g_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if bias is not None else None
    return torch.empty_like(hidden), torch.zeros(weight.shape, dtype=acc, device=weight.device), g_bias


def _fake(hidden, weight, bias, labels, *args):
    need_grad = args[-1]
    loss = hidden.new_empty((), dtype=_acc_dtype(hidden))
    if not need_grad:
        return loss, hidden.new_empty((0,)), weight.new_empty((0,)), hidden.new_empty((0,))
    g_bias = torch.empty_like(bias) if bias is not None else hidden.new_empty((0,))
    return loss, torch.empty_like(hidden), torch.empty_like(weight), g_bias


def _setup_context(ctx, inputs, output):
    _, g_hidden, g_weight, g_bias = output
    ctx.mark_non_differentiable(g_hidden, g_weight, g_bias)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(g_hidden, g_weight, g_bias)
    ctx.has_bias = inputs[2] is not None
    ctx.need_grad = inputs[-1]


def _backward(ctx, grad_loss, *_grads_of_grads):
    if grad_loss is None:
        return (None,) * 19
    if not ctx.need_grad:
        raise RuntimeError(f"{FN} was run with need_grad=False; the public function sets it whenever hidden, "
                           "weight or bias require grad")
    g_hidden, g_weight, g_bias = ctx.saved_tensors
    scale = grad_loss.to(torch.float64 if g_hidden.dtype == torch.float64 else torch.float32)
    out = tuple(torch.mul(g, scale).to(g.dtype) for g in (g_hidden, g_weight))
    return out + ((torch.mul(g_bias, scale).to(g_bias.dtype) if ctx.has_bias else None), None) + (None,) * 15


_op = torch.library.custom_op("saf_kernels::fused_linear_trajectory_loss", _forward, mutates_args=(),
                              schema=_SCHEMA)
_op.register_fake(_fake)
_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Input checks (metadata only: no host synchronisation)
# --------------------------------------------------------------------------------------------


def _tensor(t, name, *, float_=True, dims=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{FN}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if float_ and t.dtype not in mt.FLOAT_DTYPES:
        raise TypeError(f"{FN}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{FN}: {name} must be {dims}-D, got shape {tuple(t.shape)}")
    return t


def _same_device(dev, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != dev:
            raise ValueError(f"{FN}: {name} is on {t.device} but hidden is on {dev}")


def _check_linear(hidden, weight, bias, hname, wname, bname):
    _tensor(hidden, hname)
    _tensor(weight, wname, dims=2)
    if hidden.dim() < 2:
        raise ValueError(f"{FN}: {hname} must be [..., H] with at least 2 dims, got shape {tuple(hidden.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{FN}: {wname} must be [V, {hidden.shape[-1]}] for {hname} {tuple(hidden.shape)}, got "
                         f"{tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{FN}: {wname} dtype {weight.dtype} differs from {hname} dtype {hidden.dtype}")
    if bias is not None:
        _tensor(bias, bname, dims=1)
        if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype:
            raise ValueError(f"{FN}: {bname} must be [{weight.shape[0]}] in {weight.dtype}, got "
                             f"{tuple(bias.shape)} {bias.dtype}")


def _check_topk(target_topk, lead, v):
    if not isinstance(target_topk, (tuple, list)) or len(target_topk) not in (3, 4):
        raise TypeError(f"{FN}: target_topk must be a tuple (idx, logit, lse) or (idx, logit, lse, valid), got "
                        f"{type(target_topk).__name__}"
                        + (f" of length {len(target_topk)}" if isinstance(target_topk, (tuple, list)) else ""))
    idx, logit, lse = target_topk[:3]
    valid = target_topk[3] if len(target_topk) == 4 else None
    _tensor(idx, "target_topk idx", float_=False)
    _tensor(logit, "target_topk logit")
    _tensor(lse, "target_topk lse")
    if idx.dtype != torch.int64:
        raise TypeError(f"{FN}: target_topk idx must be int64, got {idx.dtype}")
    if idx.dim() != len(lead) + 1 or tuple(idx.shape[:-1]) != lead or logit.shape != idx.shape:
        raise ValueError(f"{FN}: target_topk idx and logit must both be [*{list(lead)}, k], got "
                         f"{tuple(idx.shape)} and {tuple(logit.shape)}")
    if not 1 <= idx.shape[-1] <= v:
        raise ValueError(f"{FN}: target_topk must keep k in [1, {v}] classes per row, got k={idx.shape[-1]}")
    if tuple(lse.shape) != lead:
        raise ValueError(f"{FN}: target_topk lse must be {list(lead)}, got {tuple(lse.shape)}")
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != lead:
            raise ValueError(f"{FN}: target_topk valid must be a bool tensor of shape {list(lead)}, got "
                             f"{valid if not isinstance(valid, torch.Tensor) else (tuple(valid.shape), valid.dtype)}")
    return idx, logit, lse, valid


def _autocast(*tensors):
    """The matmul inputs in the autocast dtype when autocast is on for their device (as
    ``F.linear`` under autocast); the row op accumulates in float32 whatever they are."""
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t is not None and t.is_floating_point() else t for t in tensors)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def fused_linear_trajectory_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 target_hidden: torch.Tensor | None = None, target_weight: torch.Tensor | None = None,
                                 bias: torch.Tensor | None = None, target_bias: torch.Tensor | None = None, *,
                                 target_logits: torch.Tensor | None = None, target_topk: tuple | None = None,
                                 lam: float = 0.8, temperature: float = 5.0, label_smoothing: float = 0.0,
                                 ignore_index: int = -100, chunk_size: int | None = None,
                                 backend: str = "auto") -> torch.Tensor:
    """SAF / MESA loss of a language model's output layer without the ``[N, V]`` logits.

    ``CE(z, labels; label_smoothing) + lam * T^2 * KL(softmax(t / T) || softmax(z / T))`` with
    ``z = hidden @ weight.T + bias``, both terms averaged over the rows whose label is not
    ``ignore_index`` (every row ignored: loss 0, zero gradients). Gradients flow to ``hidden``,
    ``weight`` and ``bias``, never to the target. Rows are taken ``chunk_size`` at a time, so at most
    ``chunk_size x V`` logits (with their target and gradient) exist at once; each chunk's loss and
    logit gradient come from the fused row kernel in one pass, its matmuls from torch, and the
    weight (bias) gradient is summed in float32 (float64 for float64 inputs). The gradients are
    computed in the forward and kept until the backward, which only scales them (memory:
    ``N*H + V*H (+ V)`` for them, instead of eager's several ``N x V`` tensors).

    Exactly one target form:

    - ``target_hidden [..., H']`` with ``target_weight [V, H']`` (and ``target_bias``): an EMA
      teacher's last hidden state and output layer (MESA); its logits are made chunk by chunk too.
    - ``target_logits [..., V]``, any float dtype: logits the caller already has.
    - ``target_topk = (idx [..., k] int64, logit [..., k], lse [...])`` or with a fourth element
      ``valid [...]`` bool: a sparse record (e.g. :class:`saf_kernels.TopKTrajectoryBank`). Each
      chunk's dense target is rebuilt: kept classes get their logits, the ``V - k`` others each get
      ``lse + log(rest / (V - k))`` where ``rest = 1 - sum exp(logit - lse)`` (clamped at 0; when it
      is 0 they get ``lse - 200 T``, a probability that underflows to 0, never a NaN). The KL is
      thus exact on the kept classes and treats the rest of the mass as uniform over the others
      (exactly so at ``T = 1``; a temperature flattens that uniform share as it flattens the rest).
      Rows whose ``valid`` is False take the chunk's own logits as target: their KL and its
      gradient are 0, and they still count in the mean (their cross-entropy does).

    Args:
        hidden: ``[..., H]`` final hidden states (float32, bfloat16, float16 or float64).
        weight: ``[V, H]`` output layer (lm_head) in ``hidden``'s dtype; ``bias``: ``[V]`` or None.
        labels: class indices ``hidden.shape[:-1]`` (int64 / int32) in ``[0, V)`` or ``ignore_index``.
        lam, temperature: weight of the KL term and ``T > 0`` (MESA paper: 0.8 and 5).
        label_smoothing: in ``[0, 1]``, of the cross-entropy.
        chunk_size: rows per chunk; None chooses the largest count whose ``chunk x V`` float32
            tensor fits 32 MiB on CPU, or on CUDA a sixteenth of the free memory clamped to
            [64 MiB, 512 MiB] (see :func:`auto_chunk_size`).
        backend: the row kernel: ``"auto" | "cuda" | "triton" | "cpu"``, or ``"torch"``: the
            materialised plain-PyTorch reference (full logits; a fallback, not memory-saving).

    Under autocast the matmuls run in the autocast dtype (bf16 / fp16) and the row kernel
    accumulates in float32. The loss is a 0-dim tensor in float32 (float64 for float64 inputs).
    Registered as ``torch.ops.saf_kernels.fused_linear_trajectory_loss`` (fake kernel, autograd):
    works under ``torch.compile`` and ``opcheck``.
    """
    _check_linear(hidden, weight, bias, "hidden", "weight", "bias")
    lead = tuple(hidden.shape[:-1])
    v = weight.shape[0]
    _tensor(labels, "labels", float_=False)
    if labels.dtype not in (torch.int64, torch.int32) or tuple(labels.shape) != lead:
        raise ValueError(f"{FN}: labels must be int64 or int32 class indices of shape {list(lead)}, got "
                         f"{tuple(labels.shape)} {labels.dtype}")
    forms = [name for name, given in (("target_hidden/target_weight", target_hidden is not None
                                       or target_weight is not None), ("target_logits", target_logits is not None),
                                      ("target_topk", target_topk is not None)) if given]
    if len(forms) != 1:
        raise ValueError(f"{FN}: give exactly one target: target_hidden with target_weight, target_logits or "
                         f"target_topk; got {forms or 'none'}")
    if target_bias is not None and target_hidden is None:
        raise ValueError(f"{FN}: target_bias goes with target_hidden and target_weight")
    topk = (None,) * 4
    if target_hidden is not None or target_weight is not None:
        if target_hidden is None or target_weight is None:
            raise ValueError(f"{FN}: target_hidden and target_weight go together; got only "
                             f"{'target_hidden' if target_weight is None else 'target_weight'}")
        _check_linear(target_hidden, target_weight, target_bias, "target_hidden", "target_weight", "target_bias")
        if tuple(target_hidden.shape[:-1]) != lead or target_weight.shape[0] != v:
            raise ValueError(f"{FN}: target_hidden must be [*{list(lead)}, H'] and target_weight [{v}, H'], got "
                             f"{tuple(target_hidden.shape)} and {tuple(target_weight.shape)}")
    elif target_logits is not None:
        _tensor(target_logits, "target_logits")
        if tuple(target_logits.shape) != lead + (v,):
            raise ValueError(f"{FN}: target_logits must be {list(lead + (v,))}, got {tuple(target_logits.shape)}")
    else:
        topk = _check_topk(target_topk, lead, v)
    _same_device(hidden.device, weight=weight, bias=bias, labels=labels, target_hidden=target_hidden,
                 target_weight=target_weight, target_bias=target_bias, target_logits=target_logits,
                 **{f"target_topk {k}": t for k, t in zip(("idx", "logit", "lse", "valid"), topk)})
    lam = _checks.number(lam, "lam", FN)
    temperature = _checks.number(temperature, "temperature", FN, lo=0, lo_open=True)
    label_smoothing = _checks.number(label_smoothing, "label_smoothing", FN, lo=0.0, hi=1.0)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{FN}: ignore_index must be an int, got {ignore_index!r}")
    n = math.prod(lead)
    if chunk_size is not None:
        chunk_size = _checks.integer(chunk_size, "chunk_size", FN, lo=1)
    impl = _backend.resolve(backend, hidden.device, ROW_OP)
    if impl == "torch":
        return reference.fused_linear_trajectory_loss(
            hidden, weight, labels, target_hidden, target_weight, bias, target_bias, target_logits=target_logits,
            target_topk=target_topk, lam=lam, temperature=temperature, label_smoothing=label_smoothing,
            ignore_index=ignore_index)
    if chunk_size is None:
        chunk_size = auto_chunk_size(n, v, hidden.device)
    hidden, weight, bias, target_hidden, target_weight, target_bias = _autocast(
        hidden, weight, bias, target_hidden, target_weight, target_bias)
    flat = (lambda t, *tail: None if t is None else t.reshape(n, *tail))
    h_t = target_hidden.shape[-1] if target_hidden is not None else 0
    k = topk[0].shape[-1] if topk[0] is not None else 0
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, *_ = torch.ops.saf_kernels.fused_linear_trajectory_loss(
        flat(hidden, hidden.shape[-1]), weight, bias, flat(labels),
        None if target_hidden is None else flat(target_hidden.detach(), h_t),
        None if target_weight is None else target_weight.detach(),
        None if target_bias is None else target_bias.detach(),
        None if target_logits is None else flat(target_logits.detach(), v),
        flat(topk[0], k), None if topk[1] is None else flat(topk[1].detach(), k),
        None if topk[2] is None else flat(topk[2].detach()), flat(topk[3]),
        lam, temperature, label_smoothing, int(ignore_index), chunk_size, impl, need_grad)
    return loss
