"""LookSAM (Liu et al., CVPR 2022) ops: the orthogonal component ``g_v`` of SAM's gradient, kept
on SAM steps, and its reuse on the other steps.

Flow: public function -> :func:`saf_kernels._backend.resolve` -> ``saf_kernels::<op>_triton``
(``saf_kernels/triton/looksam.py``) or :mod:`saf_kernels.reference` (no C++ kernel yet: ``auto``
on CPU runs the reference, on CUDA the Triton kernels).

Passes over parameter memory: :func:`looksam_gv_` one reduction (reads ``g, g_s``: ``<g, g_s>``,
``|g|^2``, ``|g_s|^2``) and one write of ``g_v`` (``|g_v|`` from the three sums: no third
pass); :func:`looksam_combine_` one reduction (reads ``g``) and one update (reads ``g, g_v``,
writes ``g``). No host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _backend, _checks, reference
from ._multi_tensor import as_list, check_eps, check_lengths, check_scalar, check_streams


def _stats_fake(gv, *args):
    dt = torch.float64 if any(v.dtype == torch.float64 for v in gv) else torch.float32
    return torch.empty(3, dtype=dt, device=gv[0].device)


def _norm_fake(grads, *args):
    dt = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    return torch.empty((), dtype=dt, device=grads[0].device)


@torch.library.custom_op("saf_kernels::looksam_gv_triton", mutates_args=("gv", "gv_norm"))
def _looksam_gv_triton(gv: list[torch.Tensor], gv_norm: torch.Tensor, grads: list[torch.Tensor],
                       old_grads: list[torch.Tensor], eps: float) -> torch.Tensor:
    from ..triton.looksam import looksam_gv

    return looksam_gv(gv, gv_norm, grads, old_grads, eps)


_looksam_gv_triton.register_fake(_stats_fake)


@torch.library.custom_op("saf_kernels::looksam_combine_triton", mutates_args=("grads",))
def _looksam_combine_triton(grads: list[torch.Tensor], gv: list[torch.Tensor], gv_norm: torch.Tensor, alpha: float,
                            eps: float) -> torch.Tensor:
    from ..triton.looksam import looksam_combine

    return looksam_combine(grads, gv, gv_norm, alpha, eps)


_looksam_combine_triton.register_fake(_norm_fake)


def _check_norm(gv_norm, fn, dev):
    check_scalar(gv_norm, "gv_norm", fn, dev)
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
    """
    fn = "saf_kernels.looksam_gv_"
    gv, grads, old = as_list(gv, "gv", fn), as_list(grads, "grads", fn), as_list(old_grads, "old_grads", fn)
    n = check_lengths(fn, gv=gv, grads=grads, old_grads=old)
    eps = check_eps(eps, fn)
    if n == 0:
        return torch.zeros(3)
    dev = gv[0].device
    _check_norm(gv_norm, fn, dev)
    impl = _backend.resolve(backend, dev, "looksam_gv_")
    check_streams(fn, [("gv", gv), ("grads", grads), ("old_grads", old)], same_dtype=("gv", "grads", "old_grads"))
    # (gv, grads and old_grads share one dtype per tensor: the Triton tables type all three alike)
    if impl == "triton":
        return torch.ops.saf_kernels.looksam_gv_triton(gv, gv_norm, grads, old, eps)
    return reference.looksam_gv_(gv, gv_norm, grads, old, eps)


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
    is then skipped by the base step). Returns ``|g|`` (as given, i.e. scaled under AMP)."""
    fn = "saf_kernels.looksam_combine_"
    grads, gv = as_list(grads, "grads", fn), as_list(gv, "gv", fn)
    n = check_lengths(fn, grads=grads, gv=gv)
    alpha = _checks.number(alpha, "alpha", fn)
    eps = check_eps(eps, fn)
    if n == 0:
        return torch.zeros(())
    dev = grads[0].device
    _check_norm(gv_norm, fn, dev)
    impl = _backend.resolve(backend, dev, "looksam_combine_")
    check_streams(fn, [("grads", grads), ("gv", gv)], same_dtype=("grads", "gv"))
    if impl == "triton":
        return torch.ops.saf_kernels.looksam_combine_triton(grads, gv, gv_norm, alpha, eps)
    return reference.looksam_combine_(grads, gv, gv_norm, alpha, eps)
