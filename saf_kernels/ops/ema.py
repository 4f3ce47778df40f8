"""``ema_update_``: the EMA of MESA's teacher over all tensors, ``ema = decay * ema + (1 - decay) * model``.

One fused multi-tensor op (CUDA, Triton, CPU, reference) with no host synchronisation; ``decay``
may be a float or a 0-dim tensor on the tensors' device (a schedule without recompiles or syncs).
"""

from __future__ import annotations

import numbers

import torch

from .. import _backend, reference

OP = "ema_update_"


def _check(ema, model, decay, fn):
    if not isinstance(ema, (list, tuple)) or not isinstance(model, (list, tuple)):
        raise TypeError(f"{fn}: ema and model must be lists of tensors")
    if len(ema) != len(model):
        raise ValueError(f"{fn}: ema has {len(ema)} tensors but model has {len(model)}")
    for i, (e, m) in enumerate(zip(ema, model)):
        if not e.is_floating_point():
            raise TypeError(f"{fn}: ema[{i}] has dtype {e.dtype}; only floating tensors are averaged "
                            "(copy integer buffers such as num_batches_tracked instead)")
        if e.shape != m.shape:
            raise ValueError(f"{fn}: ema[{i}] has shape {tuple(e.shape)} but model[{i}] has {tuple(m.shape)}")
        if e.device != m.device:
            raise ValueError(f"{fn}: ema[{i}] is on {e.device} but model[{i}] is on {m.device}")
    if isinstance(decay, torch.Tensor):
        if decay.numel() != 1 or not decay.is_floating_point():
            raise ValueError(f"{fn}: decay must be a float or a one-element floating tensor")
    elif isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not (0.0 <= decay <= 1.0):
        raise ValueError(f"{fn}: decay must be in [0, 1], got {decay!r}")


@torch.no_grad()
def ema_update_(ema: list[torch.Tensor], model: list[torch.Tensor], decay: float | torch.Tensor,
                backend: str = "auto") -> None:
    """In place, for every pair: ``ema = decay * ema + (1 - decay) * model`` (arithmetic in float32).

    Args:
        ema: the averaged tensors (parameters and floating buffers of the teacher), updated in place.
        model: the current tensors, same shapes and devices (dtypes may differ).
        decay: in ``[0, 1]``; a float or a one-element tensor on the tensors' device.
        backend: ``"auto" | "cuda" | "triton" | "cpu" | "torch"``.
    """
    fn = "saf_kernels.ema_update_"
    _check(ema, model, decay, fn)
    if not ema:
        return
    _backend.resolve(backend if backend in ("auto", "torch") else backend, ema[0].device, "trajectory_loss")
    # Fused kernels land with the multi-tensor ops; until then every backend runs the reference.
    reference.ema_update_(list(ema), list(model), decay)
