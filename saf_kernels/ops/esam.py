"""ESAM (Du et al., ICLR 2022) on fused multi-tensor kernels: stochastic weight perturbation with a
mask that is generated inside the kernels and never stored, and sharpness-sensitive data selection.

Flow: public function -> :func:`saf_kernels._backend.resolve` -> ``torch.ops.saf_kernels.<op>``
(C++ CPU / CUDA kernels: ``csrc/cpu/esam.cpp``, ``csrc/cuda/esam.cu``) or
``saf_kernels::<op>_triton`` (``saf_kernels/triton/esam.py``) or :mod:`saf_kernels.reference`.

The mask: element ``i`` of tensor ``t`` is kept when the Philox word of its position
(``rng_offset[t] + i``, each tensor's first position padded to a multiple of 4) is below
``beta * 2^24`` in its top 24 bits (:mod:`saf_kernels.ops.philox`). Integer arithmetic only, so
**every backend draws the same mask** for the same ``(seed, offset)`` and list of tensors, and the
restore regenerates it. Launches on CUDA: :func:`esam_perturb_` 3 (norm partials, finalize,
perturbation), :func:`esam_restore_` 1; no host synchronisation.

Bytes per element as SAM (performance.md 4.3): perturb 5 passes (read g; read w, g, write w,
stash), restore 2 (copy) or 3 (delta). The mask costs no bytes: one Philox evaluation per 4
elements in each pass.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .. import reference
from . import _multi_tensor as mt
from ._multi_tensor import Bools, Floats
from .philox import check_offset, check_seed, shard_offset

ADAPTIVE = 2  # flags bit (csrc/include/saf/multi_tensor.h, esam::kAdaptive)

mt.register("esam_perturb_",
            "(Tensor(a0!)[] params, Tensor[] grads, Tensor(a2!)[] stash, float[] rho, float[] eta, float[] beta, "
            "SymInt[] flags, float eps, SymInt seed, SymInt offset, SymInt stash_mode, Tensor? grad_scale, "
            "Tensor? found_inf, Tensor? sumsq=None) -> Tensor",
            mt.norm_fake, "esam.esam_perturb")
mt.register("esam_sumsq",
            "(Tensor[] params, Tensor[] grads, float[] eta, float[] beta, SymInt[] flags, SymInt seed, "
            "SymInt offset) -> Tensor",
            mt.sumsq_fake, "esam.esam_sumsq")
mt.register("esam_restore_",
            "(Tensor(a0!)[] params, Tensor[] stash, float[] beta, SymInt seed, SymInt offset, SymInt stash_mode) -> ()",
            mt.void_fake, "esam.esam_restore")


def _beta_list(beta, n, fn):
    vals = mt.per_tensor_full(beta, n, "beta", fn)
    for i, b in enumerate(vals):
        if not 0.0 < b <= 1.0:
            raise ValueError(f"{fn}: beta[{i}] must be in (0, 1], got {b!r}")
    return vals


@torch.no_grad()
def esam_perturb_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], stash: Sequence[torch.Tensor],
                  rho: Floats, beta: Floats, seed: int, offset: int = 0, adaptive: Bools = False, eta: Floats = 0.0,
                  eps: float = 1e-7, *, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                  stash_mode: str = "copy", backend: str = "auto") -> torch.Tensor:
    """ESAM's stochastic weight perturbation, elementwise, in place.

    Every element is kept with probability ``beta`` (a Bernoulli mask drawn in the kernels from
    ``(seed, offset)`` and the element's position, never stored). With ``keep`` that mask and
    ``T = |w| + eta`` where adaptive (else 1)::

        norm = || keep * T * g ||_2            (global, over the kept gradients only)
        w   += keep * rho / beta * T^2 * g / (norm + eps)

    the official code's scale ``rho / (norm + eps) / beta`` (utils/Esam.py; its Algorithm 1 in
    the paper has ``1 - beta``, the maintainers say the code is right), applied per element
    instead of per tensor.

    Args:
        params, grads, stash, adaptive, eta, grad_scale, found_inf, stash_mode, backend: as
            :func:`saf_kernels.ops.sam_perturb_` (copy stash: exact restore; delta stash: the
            perturbation, lossy restore of the kept elements only).
        rho: radius >= 0; a number or one per tensor.
        beta: keep probability in (0, 1]; a number or one per tensor. ``beta = 1`` is SAM with
            ``eps``.
        seed: the Philox key (any integer in ``[-2**63, 2**64)``); use a new one every step.
        offset: counter offset >= 0 (e.g. to give data-parallel replicas different masks).
        eps: added to the norm (1e-7, as the official code).

    Sharded tensors (lists of ``DTensor`` s sharded on dim 0, FSDP2's ``fully_shard``): each rank
    draws the mask of its own shards, from the counter offset ``offset + rank * C`` (``C``: the
    Philox counters of the whole unsharded list, so the ranks' draws never overlap), not the
    unsharded list's mask (a shard does not start on a Philox counter boundary in general); it
    is the same Bernoulli(beta) per element. The norm is global: :func:`esam_sumsq` of the
    local shards, one ``all_reduce`` of that value on the mesh's group, then the finalize and
    the perturbation of the local shards. :func:`esam_restore_` on the same lists uses the same
    per-rank offset.

    Returns:
        The norm of the kept, unscaled gradients as a 0-dim float32 tensor (float64 with float64
        params), without a host synchronisation; non-finite: nothing was perturbed.
    """
    fn = "saf_kernels.esam_perturb_"
    whole = params
    params, grads, stash, group = mt.local_shards(fn, params=params, grads=grads, stash=stash)
    offset = shard_offset(whole, check_offset(offset, fn), group)
    params, grads, stash, n = mt.tensor_lists(fn, params=params, grads=grads, stash=stash)
    rho_l = mt.per_tensor_full(rho, n, "rho", fn, nonneg=True)
    beta_l = _beta_list(beta, n, fn)
    eta_l = mt.per_tensor_full(eta, n, "eta", fn, nonneg=True)
    flags = [ADAPTIVE if a else 0 for a in mt.per_tensor_full(adaptive, n, "adaptive", fn, kind=bool)]
    eps = mt.check_eps(eps, fn)
    seed = check_seed(seed, fn)
    mode = mt.stash_mode_code(stash_mode, fn)
    dev = mt.amp_scalars(fn, params, n, grad_scale=grad_scale, found_inf=found_inf)
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=dev)
    streams = [("params", params), ("grads", grads), ("stash", stash)]
    sumsq = mt.global_sums(group, lambda: _sumsq(fn, backend, dev, streams, params, grads, eta_l, beta_l, flags, seed,
                                                 offset))
    return mt.run(
        "esam_perturb_", fn, backend, dev, streams,
        lambda: reference.esam_perturb_(params, grads, stash, rho_l, [bool(f) for f in flags], eta_l, beta_l, seed,
                                        offset, eps, grad_scale, found_inf, stash_mode, sumsq),
        params, grads, stash, rho_l, eta_l, beta_l, flags, eps, seed, offset, mode, grad_scale, found_inf, sumsq,
        same_dtype=("grads",) + (("stash",) if mode == 0 else ()))


def _sumsq(fn, backend, dev, streams, params, grads, eta_l, beta_l, flags, seed, offset) -> torch.Tensor:
    return mt.run("esam_sumsq", fn, backend, dev, streams,
                  lambda: reference.esam_sumsq(params, grads, [bool(f) for f in flags], eta_l, beta_l, seed, offset),
                  params, grads, eta_l, beta_l, flags, seed, offset, same_dtype=("grads",))


@torch.no_grad()
def esam_sumsq(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], beta: Floats, seed: int,
               offset: int = 0, adaptive: Bools = False, eta: Floats = 0.0, *, backend: str = "auto") -> torch.Tensor:
    """The partial-sum stage of :func:`esam_perturb_` alone: ``sum((keep * T * g)^2)`` over the
    tensors (the mask drawn from ``(seed, offset)`` as there), a 0-dim float64 tensor on their
    device, in the gradients' (scaled) units. Sharded training sums it over the shards (one
    all-reduce); :func:`esam_perturb_` does this itself on lists of ``DTensor`` s. Plain tensors
    only (pass the local shards, with the rank's offset)."""
    fn = "saf_kernels.esam_sumsq"
    params, grads, n = mt.tensor_lists(fn, params=params, grads=grads)
    beta_l = _beta_list(beta, n, fn)
    eta_l = mt.per_tensor_full(eta, n, "eta", fn, nonneg=True)
    flags = [ADAPTIVE if a else 0 for a in mt.per_tensor_full(adaptive, n, "adaptive", fn, kind=bool)]
    seed = check_seed(seed, fn)
    offset = check_offset(offset, fn)
    if n == 0:
        return torch.zeros((), dtype=torch.float64)
    return _sumsq(fn, backend, params[0].device, [("params", params), ("grads", grads)], params, grads, eta_l,
                  beta_l, flags, seed, offset)


@torch.no_grad()
def esam_restore_(params: Sequence[torch.Tensor], stash: Sequence[torch.Tensor], beta: Floats, seed: int,
                  offset: int = 0, stash_mode: str = "copy", *, backend: str = "auto") -> None:
    """Puts back the weights :func:`esam_perturb_` started from, in place.

    ``stash_mode="copy"``: bit for bit (the mask is not needed). ``"delta"``: the mask is
    regenerated from the same ``beta``, ``seed``, ``offset`` and list, and the stashed
    perturbation is subtracted from the kept elements only: the dropped ones never change, the
    kept ones are back to within one rounding.
    """
    fn = "saf_kernels.esam_restore_"
    whole = params
    params, stash, group = mt.local_shards(fn, params=params, stash=stash)
    offset = shard_offset(whole, check_offset(offset, fn), group)
    params, stash, n = mt.tensor_lists(fn, params=params, stash=stash)
    beta_l = _beta_list(beta, n, fn)
    seed = check_seed(seed, fn)
    mode = mt.stash_mode_code(stash_mode, fn)
    if n == 0:
        return
    mt.run(
        "esam_restore_", fn, backend, params[0].device, [("params", params), ("stash", stash)],
        lambda: reference.esam_restore_(params, stash, beta_l, seed, offset, stash_mode),
        params, stash, beta_l, seed, offset, mode, same_dtype=("stash",) if mode == 0 else ())


def sds_count(gamma: float, batch: int) -> int:
    """How many samples sharpness-sensitive data selection keeps: ``ceil(gamma * batch)``, at
    least 1 (and at most ``batch``).

    ``ceil``, so that at least the fraction ``gamma`` is kept and a tiny batch still keeps one
    sample. The official code computes ``k = int(batch * gamma)`` (floor) and then keeps the
    samples strictly above the k-th largest value: ``k - 1`` samples when there are no ties, and
    a crash when ``k = 0``. ``gamma * batch`` is rounded to 9 decimals first so that e.g.
    ``0.3 * 10`` (3.0000000000000004 in floating point) keeps 3, not 4.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0.0 < gamma <= 1.0:
        raise ValueError(f"saf_kernels.sds_count: gamma must be in (0, 1], got {gamma!r}")
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral):
        raise ValueError(f"saf_kernels.sds_count: batch must be an int (a number of samples), got {batch!r}")
    if batch < 1:
        raise ValueError(f"saf_kernels.sds_count: the batch must hold at least one sample, got {batch}")
    return min(batch, max(1, math.ceil(round(gamma * batch, 9))))


def sds_select(loss_before: torch.Tensor, loss_after: torch.Tensor, gamma: float) -> torch.Tensor:
    """ESAM's sharpness-sensitive data selection: the indices (int64, on the losses' device, in
    ascending order) of the :func:`sds_count` samples whose loss grew the most from the clean to
    the perturbed weights (``loss_after - loss_before``).

    One ``torch.topk`` on the device: the number of samples is known on the host, so nothing
    synchronises (no boolean-mask indexing). Ties are broken by ``topk``. Index the batch with
    the result (``x[idx]``, a gather).
    """
    fn = "saf_kernels.sds_select"
    if loss_before.dim() != 1 or loss_after.shape != loss_before.shape:
        raise ValueError(f"{fn}: expected two per-sample loss vectors of the same shape [B], got "
                         f"{tuple(loss_before.shape)} and {tuple(loss_after.shape)}")
    k = sds_count(gamma, loss_before.numel())
    diff = loss_after.detach().float() - loss_before.detach().float()
    # A NaN difference would be "largest" for topk; rank it last instead, below -inf (which
    # nan_to_num maps to the lowest finite value).
    diff = torch.nan_to_num(diff, nan=-math.inf)
    idx = torch.topk(diff, k, sorted=False).indices
    return torch.sort(idx).values
