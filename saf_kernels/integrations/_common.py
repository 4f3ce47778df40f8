"""What the trainer integrations share: finding the two-pass optimizer inside a trainer's wrapper,
checking that a trainer can drive it, the two passes of one step, and the MESA teacher's logits.

A trainer hands over one optimizer step as: the first pass's gradients already accumulated over
the window's micro-batches but the last, then "finish". :func:`two_pass_step` finishes it: the
last micro-batch's first pass, the ascent (:meth:`TwoPassOptimizer.first_step`), and the second
pass over *every* micro-batch of the window at the perturbed weights, leaving the second
gradients in ``.grad`` for the trainer to clip and to hand to the optimizer's ``step()`` (which
restores the weights and applies the base optimizer, through the GradScaler if there is one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import torch

from ..optim.base import TwoPassOptimizer
from ..optim.esam import ESAM
from ..optim.utils import is_ddp


def two_pass_optimizer(optimizer: Any) -> TwoPassOptimizer | None:
    """The :class:`TwoPassOptimizer` inside a trainer's optimizer wrapper (Lightning's
    ``LightningOptimizer``, which also passes ``isinstance`` checks, Accelerate's
    ``AcceleratedOptimizer``, ...), or None."""
    for _ in range(8):
        inner = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, TwoPassOptimizer) else None


def check_drivable(opt: TwoPassOptimizer, where: str) -> None:
    """Raise if ``where`` (a trainer) cannot run ``opt`` as the method intends."""
    if isinstance(opt, ESAM) and opt.gamma < 1.0:
        raise ValueError(
            f"{where}: ESAM(gamma={opt.gamma}) selects samples by their per-sample losses (SDS), which a trainer's "
            "training step does not return; use gamma=1 (stochastic weight perturbation alone), or the "
            "per-sample API ESAM.step(per_sample_closure(...)) in your own loop"
        )


def _no_sync(model: torch.nn.Module | None) -> contextlib.AbstractContextManager:
    return model.no_sync() if model is not None and is_ddp(model) else contextlib.nullcontext()


def two_pass_step(
    opt: TwoPassOptimizer,
    model: torch.nn.Module | None,
    last_first_pass: Callable[[], Any],
    second_pass: Sequence[Callable[[], Any]],
    grad_scaler: Any = None,
    no_sync: Callable[[torch.nn.Module | None], contextlib.AbstractContextManager] = _no_sync,
) -> Any:
    """Runs one step's passes up to the second gradients (see the module docstring).

    Args:
        opt: the optimizer.
        model: the module the trainer runs forward on (a DDP wrapper under DDP): the first pass
            runs inside ``opt.first_pass(model)`` (no all-reduce unless ``sync_first_pass``), the
            second inside ``opt.second_pass(model)`` (BatchNorm statistics from the first pass).
        last_first_pass: forward + backward of the window's last micro-batch at ``w``; its return
            value is returned.
        second_pass: forward + backward of each micro-batch of the window at ``w + e``, in order;
            all but the last run under ``no_sync(model)``, as the trainer's own accumulation does.
        grad_scaler: the ``GradScaler`` that scales the losses, if any.

    Returns:
        What ``last_first_pass`` returned.
    """
    opt.begin_step()
    with torch.enable_grad(), opt.first_pass(model):
        result = last_first_pass()
    opt.first_step(zero_grad=True, grad_scaler=grad_scaler)
    with torch.enable_grad(), opt.second_pass(model):
        for i, run in enumerate(second_pass):
            with no_sync(model) if i < len(second_pass) - 1 else contextlib.nullcontext():
                run()
    return result


@contextlib.contextmanager
def teacher_autocast(mesa, device: torch.device) -> Iterator[None]:
    """MESA's ``teacher_autocast`` (if set) around a teacher forward."""
    if mesa.teacher_autocast is None:
        yield
    else:
        with torch.autocast(device.type, dtype=mesa.teacher_autocast):
            yield


def move_teacher(mesa, device: torch.device) -> None:
    """Put MESA's teacher beside the model (a trainer moves the model after MESA copied it)."""
    first = next(iter(mesa.teacher.parameters()), None)
    if first is not None and first.device != device:
        mesa.teacher.to(device)
        mesa.refresh()
