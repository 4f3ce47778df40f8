"""Momentum-SAM (Becker, Altrock, Risse, arXiv 2401.12033) fused steps: the perturbation follows
the momentum buffer, so a step costs one forward/backward; the weights live at the perturbed
point between steps, as in the authors' code (MarlonBecker/MSAM).

Flow: public function -> :func:`saf_kernels.ops._multi_tensor.run` -> ``torch.ops.saf_kernels.<op>``
(``csrc/cpu/msam.cpp``, ``csrc/cuda/msam.cu``) or ``saf_kernels::<op>_triton``
(``saf_kernels/triton/msam.py``) or :mod:`saf_kernels.reference`.

Passes over parameter memory (the rule allows no fewer: the new perturbation needs the global
norm of the *updated* buffer): one pass un-perturbs, updates the buffer (moments), takes the
step and sums ``|buf|^2`` (reads ``w, g, buf`` (+ ``v``), writes ``w, buf`` (+ ``v``)); a second
pass re-perturbs (reads ``w, buf``, writes ``w``). SGD: 8 accesses per element against plain
SGD's 5; AdamW: 10 against 7. CUDA: 3 launches whatever the number of tensors (pass 1 with its
partial sums, a one-block finalize writing ``inv_norm``, pass 2). The global norm's inverse stays
on the device (``inv_norm``): no host synchronisation on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

from .. import reference
from . import _multi_tensor as mt
from ._multi_tensor import check_eps, check_scalar, full, per_tensor

Floats = Union[float, Sequence[float]]

mt.register("msam_sgd_",
            "(Tensor(a0!)[] params, Tensor[] grads, Tensor(a2!)[] momentum_buffers, Tensor(a3!) inv_norm, "
            "float[] lr, float[] weight_decay, float[] momentum, float[] rho_prev, float[] rho, float eps) -> Tensor",
            mt.norm_fake, "msam.msam_sgd")
mt.register("msam_adamw_",
            "(Tensor(a0!)[] params, Tensor[] grads, Tensor(a2!)[] exp_avg, Tensor(a3!)[] exp_avg_sq, Tensor[] steps, "
            "Tensor(a5!) inv_norm, float[] lr, float[] beta1, float[] beta2, float[] eps, float[] weight_decay, "
            "float[] rho_prev, float[] rho, float norm_eps) -> Tensor",
            mt.norm_fake, "msam.msam_adamw")


def _floats(fn, n, **values) -> list[list[float]]:
    """Per-tensor lists at full length of the named values, each a finite number >= 0."""
    return [full(per_tensor(v, n, k, fn, nonneg=True), n) for k, v in values.items()]


def _common(fn, params, inv_norm, rho_prev, rho, n):
    dev = params[0].device
    check_scalar(inv_norm, "inv_norm", fn, dev)
    rp, r = _floats(fn, n, rho_prev=rho_prev, rho=rho)
    return dev, rp, r


@torch.no_grad()
def msam_sgd_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    inv_norm: torch.Tensor,
    *,
    lr: Floats,
    weight_decay: Floats = 0.0,
    momentum: Floats = 0.9,
    rho_prev: Floats,
    rho: Floats,
    eps: float = 1e-12,
    backend: str = "auto",
) -> torch.Tensor:
    """One Momentum-SAM step with SGD (the authors' rule, see :func:`saf_kernels.reference.msam_sgd_`)::

        d = g + wd * w;  w += rho_prev * inv_norm * buf;  buf = momentum * buf + d;  w -= lr * buf
        inv_norm = 1 / (|buf| + eps);  w -= rho * inv_norm * buf

    ``params`` hold the perturbed weights on entry and on exit; ``inv_norm`` (one element, on the
    device) carries the previous step's ``1 / (|buf| + eps)`` in and this step's out; ``rho_prev``
    is the ``rho`` the weights were perturbed with. Buffers start at zero. With ``rho = 0`` and
    ``rho_prev = 0`` this is ``torch.optim.SGD(momentum, weight_decay)``. Returns ``|buf|``.
    """
    fn = "saf_kernels.msam_sgd_"
    params, grads, bufs, n = mt.tensor_lists(fn, params=params, grads=grads, momentum_buffers=momentum_buffers)
    lr_l, wd_l, mom_l = _floats(fn, n, lr=lr, weight_decay=weight_decay, momentum=momentum)
    eps = check_eps(eps, fn)
    if n == 0:
        return torch.zeros(())
    dev, rp, r = _common(fn, params, inv_norm, rho_prev, rho, n)
    return mt.run("msam_sgd_", fn, backend, dev, [("params", params), ("grads", grads), ("momentum_buffers", bufs)],
                  lambda: reference.msam_sgd_(params, grads, bufs, inv_norm, lr_l, wd_l, mom_l, rp, r, eps),
                  params, grads, bufs, inv_norm, lr_l, wd_l, mom_l, rp, r, eps,
                  same_dtype=("grads", "momentum_buffers"))


@torch.no_grad()
def msam_adamw_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avg: Sequence[torch.Tensor],
    exp_avg_sq: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    inv_norm: torch.Tensor,
    *,
    lr: Floats,
    beta1: Floats = 0.9,
    beta2: Floats = 0.999,
    eps: Floats = 1e-8,
    weight_decay: Floats = 1e-2,
    rho_prev: Floats,
    rho: Floats,
    norm_eps: float = 1e-12,
    backend: str = "auto",
) -> torch.Tensor:
    """One Momentum-SAM step with AdamW, the authors' ``adamW_msam`` (see
    :func:`saf_kernels.reference.msam_adamw_`): the perturbation ``-rho * m / |m|`` follows the
    first moment; the decoupled decay multiplies the weights *after* the Adam step (the authors'
    order; ``torch.optim.AdamW`` decays first: the two differ by ``lr * wd`` times the Adam step).
    ``steps`` are float32 one-element tensors already counting this step. Returns ``|m|``."""
    fn = "saf_kernels.msam_adamw_"
    params, grads, m, v, steps, n = mt.tensor_lists(fn, params=params, grads=grads, exp_avg=exp_avg,
                                                    exp_avg_sq=exp_avg_sq, steps=steps)
    lr_l, b1, b2, eps_l, wd_l = _floats(fn, n, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    for name, vals in (("beta1", b1), ("beta2", b2)):
        for i, x in enumerate(vals):
            if not x < 1.0:
                raise ValueError(f"{fn}: {name}[{i}] must be in [0, 1), got {x!r}")
    norm_eps = check_eps(norm_eps, fn)
    if n == 0:
        return torch.zeros(())
    dev, rp, r = _common(fn, params, inv_norm, rho_prev, rho, n)
    return mt.run("msam_adamw_", fn, backend, dev,
                  [("params", params), ("grads", grads), ("exp_avg", m), ("exp_avg_sq", v), ("steps", steps)],
                  lambda: reference.msam_adamw_(params, grads, m, v, steps, inv_norm, lr_l, b1, b2, eps_l, wd_l, rp, r,
                                                norm_eps),
                  params, grads, m, v, steps, inv_norm, lr_l, b1, b2, eps_l, wd_l, rp, r, norm_eps,
                  scalar=("steps",), same_dtype=("grads", "exp_avg", "exp_avg_sq"))
