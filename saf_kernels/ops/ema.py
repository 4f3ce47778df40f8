"""``ema_update_``: the EMA of MESA's teacher over all tensors, ``ema = decay * ema + (1 - decay) * model``.

One fused multi-tensor op (CUDA: one launch for any number of tensors; Triton: one launch per
dtype pair; CPU: chunks over threads; reference) with no host synchronisation; ``decay`` may be a
float or a 0-dim tensor on the tensors' device (a schedule without recompiles or syncs).
Bytes per element: read ``ema`` and ``model``, write ``ema`` -- the floor of an EMA.
"""

from __future__ import annotations

import torch

from .. import _checks, reference
from . import _multi_tensor as mt

OP = "ema_update_"

mt.register(OP,
            "(Tensor(a0!)[] ema, Tensor[] model, float decay, Tensor? decay_tensor) -> ()",
            mt.void_fake, "ema.ema_update")


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
    else:
        _checks.number(decay, "decay", fn, lo=0, hi=1)


def _check_tensors(ema, model, fn):
    for i, e in enumerate(ema):
        if isinstance(e, torch.Tensor) and not e.is_floating_point():
            raise TypeError(
                f"{fn}: ema[{i}] has dtype {e.dtype}; only floating tensors are averaged "
                "(copy integer buffers such as num_batches_tracked instead)"
            )
    mt.check_streams(fn, [("ema", ema), ("model", model)])


@torch.no_grad()
def ema_update_(
    ema: list[torch.Tensor], model: list[torch.Tensor], decay: float | torch.Tensor, backend: str = "auto"
) -> None:
    """In place, for every pair: ``ema = decay * ema + (1 - decay) * model`` (arithmetic in float32,
    torch.lerp's formula, one rounding to ``ema``'s dtype).

    Args:
        ema: the averaged tensors (parameters and floating buffers of the teacher), updated in place.
            Under FSDP2 both lists may be DTensors sharded alike (``Shard(0)``): the local shards
            are updated, with no communication.
        model: the current tensors, same shapes, layouts and devices (dtypes may differ, e.g. a
            float32 EMA of bfloat16 weights).
        decay: in ``[0, 1]``; a float or a one-element tensor on the tensors' device (read by the
            kernel: a schedule costs no host synchronisation; its range is then not checked on CUDA).
        backend: ``"auto" | "cuda" | "triton" | "cpu" | "torch"``.
    """
    fn = "saf_kernels.ema_update_"
    if isinstance(ema, (list, tuple)) and isinstance(model, (list, tuple)):
        ema, model, _ = mt.local_shards(fn, ema=ema, model=model)  # DTensors (FSDP2): their local shards
    _check(ema, model, decay, fn)
    if not ema:
        return
    ema, model = list(ema), list(model)
    tensor = isinstance(decay, torch.Tensor)
    mt.run(
        OP, fn, backend, ema[0].device, None,
        lambda: reference.ema_update_(ema, model, decay),
        ema, model, 0.0 if tensor else float(decay), decay.reshape(()) if tensor else None,
        more_checks=lambda: _check_tensors(ema, model, fn))
