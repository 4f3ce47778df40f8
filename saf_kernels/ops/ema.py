"""``ema_update_``: the EMA of MESA's teacher over all tensors, ``ema = decay * ema + (1 - decay) * model``.

One fused multi-tensor op (CUDA: one launch for any number of tensors; Triton: one launch per
dtype pair; CPU: chunks over threads; reference) with no host synchronisation; ``decay`` may be a
float or a 0-dim tensor on the tensors' device (a schedule without recompiles or syncs).
Bytes per element: read ``ema`` and ``model``, write ``ema`` -- the floor of an EMA.
"""

from __future__ import annotations

import numbers

import torch

from .. import _backend, reference
from ._multi_tensor import check_streams

OP = "ema_update_"


def _fake(ema, model, decay, decay_tensor):
    return None


if _backend.HAS_EXT:
    torch.library.register_fake("saf_kernels::ema_update_")(_fake)


@torch.library.custom_op("saf_kernels::ema_update_triton", mutates_args=("ema",))
def _ema_update_triton(
    ema: list[torch.Tensor], model: list[torch.Tensor], decay: float, decay_tensor: torch.Tensor | None
) -> None:
    from ..triton.ema import ema_update

    ema_update(ema, model, decay, decay_tensor)


_ema_update_triton.register_fake(_fake)


def fused_ops() -> dict[str, object]:
    """The fused op of each kernel backend (``cpu``/``cuda`` share the C++ op)."""
    ops = {"triton": torch.ops.saf_kernels.ema_update_triton}
    if _backend.HAS_EXT:
        ops["cpu"] = ops["cuda"] = torch.ops.saf_kernels.ema_update_
    return ops


def _check(ema, model, decay, fn):
    if not isinstance(ema, (list, tuple)) or not isinstance(model, (list, tuple)):
        raise TypeError(f"{fn}: ema and model must be lists of tensors")
    if len(ema) != len(model):
        raise ValueError(f"{fn}: ema has {len(ema)} tensors but model has {len(model)}")
    if isinstance(decay, torch.Tensor):
        if decay.numel() != 1 or not decay.is_floating_point():
            raise ValueError(f"{fn}: decay must be a float or a one-element floating tensor")
        if ema and decay.device != ema[0].device:
            raise ValueError(f"{fn}: decay is on {decay.device} but ema[0] is on {ema[0].device}")
    elif isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not (0.0 <= decay <= 1.0):
        raise ValueError(f"{fn}: decay must be in [0, 1], got {decay!r}")


def _check_tensors(ema, model, fn):
    for i, e in enumerate(ema):
        if isinstance(e, torch.Tensor) and not e.is_floating_point():
            raise TypeError(
                f"{fn}: ema[{i}] has dtype {e.dtype}; only floating tensors are averaged "
                "(copy integer buffers such as num_batches_tracked instead)"
            )
    check_streams(fn, [("ema", list(ema)), ("model", list(model))])


@torch.no_grad()
def ema_update_(
    ema: list[torch.Tensor], model: list[torch.Tensor], decay: float | torch.Tensor, backend: str = "auto"
) -> None:
    """In place, for every pair: ``ema = decay * ema + (1 - decay) * model`` (arithmetic in float32,
    torch.lerp's formula, one rounding to ``ema``'s dtype).

    Args:
        ema: the averaged tensors (parameters and floating buffers of the teacher), updated in place.
        model: the current tensors, same shapes, layouts and devices (dtypes may differ, e.g. a
            float32 EMA of bfloat16 weights).
        decay: in ``[0, 1]``; a float or a one-element tensor on the tensors' device (read by the
            kernel: a schedule costs no host synchronisation; its range is then not checked on CUDA).
        backend: ``"auto" | "cuda" | "triton" | "cpu" | "torch"``.
    """
    fn = "saf_kernels.ema_update_"
    _check(ema, model, decay, fn)
    if not ema:
        return
    impl = _backend.resolve(backend, ema[0].device, OP)
    if impl in ("triton", "torch"):
        _check_tensors(ema, model, fn)
    if impl == "torch":
        reference.ema_update_(list(ema), list(model), decay)
        return
    ema, model = list(ema), list(model)
    if isinstance(decay, torch.Tensor):
        fused_ops()[impl](ema, model, 0.0, decay.reshape(()))
    else:
        fused_ops()[impl](ema, model, float(decay), None)
