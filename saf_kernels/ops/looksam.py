"""LookSAM (Liu et al., CVPR 2022) ops: the orthogonal component ``g_v`` of SAM's gradient, kept
on SAM steps, and its reuse on the other steps.

Flow: public function -> :func:`saf_kernels.ops._multi_tensor.run` -> ``torch.ops.saf_kernels.<op>``
(``csrc/cpu/looksam.cpp``, ``csrc/cuda/looksam.cu``) or ``saf_kernels::<op>_triton``
(``saf_kernels/triton/looksam.py``) or :mod:`saf_kernels.reference`.

Passes over parameter memory: :func:`looksam_gv_` one reduction (reads ``g, g_s``: ``<g, g_s>``,
``|g|^2``, ``|g_s|^2``) and one write of ``g_v`` (reads ``g, g_s``, writes ``g_v``, summing
``|g_v|^2`` of the stored values in the same pass: no third pass); :func:`looksam_combine_` one
reduction (reads ``g``) and one update (reads ``g, g_v``, writes ``g``). CUDA: 4 launches for
:func:`looksam_gv_` (partials, finalize, write + partials, finalize) and 3 for
:func:`looksam_combine_` (partials, finalize, update), whatever the number of tensors; the C++
kernels reuse GSAM's partial sums, SAM's norm and GSAM's combine pass (plans in their slots).
No host synchronisation on CUDA; a coefficient that does not apply skips the write pass on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _checks, reference
from . import _multi_tensor as mt
from .gsam import _global_sums
from .sam import sam_sumsq

mt.register("looksam_gv_",
            "(Tensor(a0!)[] gv, Tensor(a1!) gv_norm, Tensor[] grads, Tensor[] old_grads, float eps, "
            "Tensor? sums=None) -> Tensor",
            mt.stats_fake, "looksam.looksam_gv")
mt.register("looksam_combine_",
            "(Tensor(a0!)[] grads, Tensor[] gv, Tensor gv_norm, float alpha, float eps, Tensor? sumsq=None) -> Tensor",
            mt.norm_fake, "looksam.looksam_combine")


def _check_norm(gv_norm, fn, dev):
    mt.check_scalar(gv_norm, "gv_norm", fn, dev)
    if gv_norm.dtype != torch.float32 and gv_norm.dtype != torch.float64:
        raise TypeError(f"{fn}: gv_norm must be float32 or float64, got {gv_norm.dtype}")


@torch.no_grad()
def looksam_gv_(
    gv: Sequence[torch.Tensor],
    gv_norm: torch.Tensor,
    grads: Sequence[torch.Tensor],
    old_grads: Sequence[torch.Tensor],
    eps: float = 1e-12,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """LookSAM's SAM-step bookkeeping in place: ``gv = g_s - (<g, g_s> / |g|^2) g`` (``g_s =
    grads``, the gradient at the perturbed weights; ``g = old_grads``, the first gradient) and
    ``gv_norm = |gv|``, norms and inner product global over the lists.

    Scaled gradients (AMP) need no unscaling: ``gv`` is only ever used as ``gv / |gv|``. A
    non-finite or undefined coefficient (overflow, ``|g| = 0``) leaves ``gv`` and ``gv_norm`` as
    they were. Returns ``[cos(g, g_s), |g|, |g_s|]`` on the device (``eps`` in the cosine).

    On lists of ``DTensor`` s sharded on dim 0 (FSDP2) the three sums are global
    (:func:`saf_kernels.ops.gsam_sums` of the local shards, one all-reduce of 3 values), ``gv``
    is written on the local shards, and ``gv_norm`` is global (one all-reduce of the local
    ``|gv|^2``); ``gv_norm`` is a plain one-element tensor, the same on every rank.
    """
    fn = "saf_kernels.looksam_gv_"
    gv, grads, old, group = mt.local_shards(fn, gv=gv, grads=grads, old_grads=old_grads)
    gv, grads, old, n = mt.tensor_lists(fn, gv=gv, grads=grads, old_grads=old)
    eps = mt.check_eps(eps, fn)
    if n == 0:
        return torch.zeros(3)
    dev = gv[0].device
    _check_norm(gv_norm, fn, dev)
    sums = prev = None
    if group is not None:
        sums, prev = _global_sums(fn, backend, dev, grads, old, group), gv_norm.clone()
    # (gv, grads and old_grads share one dtype per tensor: the Triton tables type all three alike)
    stats = mt.run("looksam_gv_", fn, backend, dev, [("gv", gv), ("grads", grads), ("old_grads", old)],
                   lambda: reference.looksam_gv_(gv, gv_norm, grads, old, eps, sums),
                   gv, gv_norm, grads, old, eps, sums, same_dtype=("gv", "grads", "old_grads"))
    if group is not None:
        # gv_norm holds this rank's |gv| where the coefficient applied (the same test on every
        # rank: it reads the global sums), else the previous global value.
        applied = reference.looksam_gv_applies(sums)
        sq = torch.where(applied, gv_norm.double().square(), torch.zeros((), dtype=torch.float64, device=dev))
        torch.distributed.all_reduce(sq, group=group)
        gv_norm.copy_(torch.where(applied, sq.sqrt(), prev.double()).to(gv_norm.dtype).reshape(gv_norm.shape))
    return stats



@torch.no_grad()
def looksam_combine_(
    grads: Sequence[torch.Tensor],
    gv: Sequence[torch.Tensor],
    gv_norm: torch.Tensor,
    alpha: float = 0.7,
    eps: float = 1e-8,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """LookSAM's update direction on a reuse step, in place: ``g += alpha * |g| / (|gv| + eps) * gv``
    (``|g|`` global over the list). Invariant to a common scale of ``g`` (AMP) and of ``gv``.
    A zero or non-finite ``gv_norm`` or a non-finite ``|g|`` leaves ``g`` as it is (an overflow
    is then skipped by the base step). Returns ``|g|`` (as given, i.e. scaled under AMP).

    On lists of ``DTensor`` s sharded on dim 0 (FSDP2) ``|g|`` is global
    (:func:`saf_kernels.ops.sam_sumsq` of the local gradients, one all-reduce of one value);
    ``gv_norm`` is the global one :func:`looksam_gv_` keeps."""
    fn = "saf_kernels.looksam_combine_"
    grads, gv, group = mt.local_shards(fn, grads=grads, gv=gv)
    grads, gv, n = mt.tensor_lists(fn, grads=grads, gv=gv)
    alpha = _checks.number(alpha, "alpha", fn)
    eps = mt.check_eps(eps, fn)
    if n == 0:
        return torch.zeros(())
    dev = grads[0].device
    _check_norm(gv_norm, fn, dev)
    # |g|^2 (the params stream is unread without ASAM's scaling).
    sumsq = mt.global_sums(group, lambda: sam_sumsq(grads, grads, backend=backend))
    return mt.run("looksam_combine_", fn, backend, dev, [("grads", grads), ("gv", gv)],
                  lambda: reference.looksam_combine_(grads, gv, gv_norm, alpha, eps, sumsq),
                  grads, gv, gv_norm, alpha, eps, sumsq, same_dtype=("grads", "gv"))
