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

mt.register("looksam_gv_",
            "(Tensor(a0!)[] gv, Tensor(a1!) gv_norm, Tensor[] grads, Tensor[] old_grads, float eps) -> Tensor",
            mt.stats_fake, "looksam.looksam_gv")
mt.register("looksam_combine_",
            "(Tensor(a0!)[] grads, Tensor[] gv, Tensor gv_norm, float alpha, float eps) -> Tensor",
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
    """
    fn = "saf_kernels.looksam_gv_"
    gv, grads, old, n = mt.tensor_lists(fn, gv=gv, grads=grads, old_grads=old_grads)
    eps = mt.check_eps(eps, fn)
    if n == 0:
        return torch.zeros(3)
    dev = gv[0].device
    _check_norm(gv_norm, fn, dev)
    # (gv, grads and old_grads share one dtype per tensor: the Triton tables type all three alike)
    return mt.run("looksam_gv_", fn, backend, dev, [("gv", gv), ("grads", grads), ("old_grads", old)],
                  lambda: reference.looksam_gv_(gv, gv_norm, grads, old, eps),
                  gv, gv_norm, grads, old, eps, same_dtype=("gv", "grads", "old_grads"))


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
    grads, gv, n = mt.tensor_lists(fn, grads=grads, gv=gv)
    alpha = _checks.number(alpha, "alpha", fn)
    eps = mt.check_eps(eps, fn)
    if n == 0:
        return torch.zeros(())
    dev = grads[0].device
    _check_norm(gv_norm, fn, dev)
    return mt.run("looksam_combine_", fn, backend, dev, [("grads", grads), ("gv", gv)],
                  lambda: reference.looksam_combine_(grads, gv, gv_norm, alpha, eps),
                  grads, gv, gv_norm, alpha, eps, same_dtype=("grads", "gv"))
