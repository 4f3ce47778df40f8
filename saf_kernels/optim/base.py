"""The two-pass base shared by the sharpness-aware optimizers (SAM, ASAM; ESAM, R-SAM, GSAM build
on it): wraps a base optimizer given as a class, shares its ``param_groups`` and ``state``, and
runs

    first_step:  w -> w + e(g)  (a fused op; the weights needed for the restore are stashed)
    second_step: restore w, then the base optimizer's step with the gradient taken at w + e

with GradScaler support, BatchNorm statistics from the first pass only, the DDP first pass
with or without synchronisation, checkpoints that hold the base optimizer's state, and an
optional fused restore + SGD / AdamW (or Adam) step.

AMP flow (a plain loop, no closure)::

    scaler.scale(loss_fn(model(x), y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)   # reads the scale tensor; unscales in-kernel
    scaler.scale(loss_fn(model(x), y)).backward()
    scaler.step(opt)                                      # GradScaler hands grad_scale / found_inf over
    scaler.update()

``_step_supports_amp_scaling = True``, so ``GradScaler.step`` (torch >= 2.0) checks the second
gradients for inf itself (one read pass) and sets ``opt.grad_scale`` / ``opt.found_inf`` for the
duration of ``opt.step()``. The first pass's overflow is the fused norm being non-finite: the
perturbation is skipped on the device, the step is skipped, and the flag is added to the
scaler's found-inf record so that ``scaler.update()`` backs off the scale. No host
synchronisation happens in this machinery except one: on the unfused path, with AMP and a base
optimizer that cannot skip a step on the device (torch's for-loop / foreach SGD, Adam, ...),
whether to call its ``step()`` is decided on the host (one ``.item()``, as ``GradScaler`` itself
does for such optimizers). The fused restore + SGD / AdamW / Adam path (the default for those
bases) and torch's own fused base optimizers (``fused=True``) are sync-free.

Fast by default: the fused restore + base step runs whenever the base optimizer allows it
(``fused_step=None``); ``fused_step=False`` is the bit-exact opt-in (see :class:`TwoPassOptimizer`).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch import nn

from .. import _checks as C
from ..ops import _multi_tensor as mt
from ..ops import sam as sam_ops
from . import schedule, utils


class TwoPassOptimizer(torch.optim.Optimizer):
    """Base of the two-pass sharpness-aware optimizers; subclasses implement :meth:`_perturb`.

    Args:
        params: parameters or parameter groups (groups may set the subclass's options, e.g. ``rho``).
        base_optimizer: the optimizer *class* (e.g. ``torch.optim.SGD``), built here on the same
            parameter groups with ``**base_kwargs``. LR schedulers may be attached to this object
            or to ``.base_optimizer``: the groups are the same dicts.
        defaults: the subclass's per-group options.
        stash_mode: ``"copy"`` (default; the restore is bit exact, one extra copy of the weights)
            or ``"delta"`` (stash the perturbation in ``stash_dtype``, e.g. ``torch.bfloat16`` to
            halve that memory; the restore subtracts it and is not bit exact).
        fused_step: whether the second step runs the restore and the base step as one pass
            (``saf_kernels.ops.sam_restore_sgd_`` / ``sam_restore_adamw_``), the fast path.
            ``None`` (default): fused wherever the base optimizer allows it -- ``torch.optim.SGD``,
            ``torch.optim.AdamW``, ``torch.optim.Adam`` with ``weight_decay=0`` or decoupled decay,
            not amsgrad, not differentiable, float learning rates -- and the unfused path
            otherwise (e.g. RMSprop), silently. ``True``: fused, and an error at once (and at any
            later step) if the base optimizer does not allow it. ``False``: the bit-exact path
            (an exact restore, then the base optimizer's own ``step()``; ``rho=0`` gives exactly
            the base optimizer's weights).

            The trade-off: the fused update agrees with ``torch.optim`` to rounding (a few ulps
            per step: the kernel's arithmetic order differs from torch's), not bit for bit, and
            moves about half the memory (SAM + SGD momentum: 10 passes over the parameters
            against 18; on a 2-core CPU about 1.5-2x less optimizer time, see the README). The
            restore itself is exact on both paths. With AMP the fused path is also sync-free.
        model: optional; lets ``step(closure)`` apply :meth:`first_pass` / :meth:`second_pass`.
        sync_first_pass: DDP: average the first gradients across replicas (False: m-sharpness).
        bn_first_pass_only: BatchNorm running statistics come from the first pass only.
        backend: kernel backend of the fused ops (``"auto" | "cuda" | "triton" | "cpu" | "torch"``).
        every: a two-pass (SAM) step every ``every`` steps and the base optimizer's step alone on
            the others, as Composer's SAM ``interval`` (SAM on steps ``t`` with ``(t + 1) % every
            == 0``, counting from 0). ``every=1`` (default) is the method itself.
        policy: an :class:`saf_kernels.optim.AdaptivePolicy` (AE-SAM, Jiang et al., ICLR 2023)
            deciding each step whether to take the two-pass step; exclusive with ``every > 1``.
            The decision is made from the previous step's statistic, copied to the host
            asynchronously: no host synchronisation in the step.
        perturb_filter: ``param -> bool``; only the selected tensors are perturbed (SAM-ON:
            :func:`saf_kernels.optim.norm_layer_filter`; LoRA adapters: a name test). The others
            still get the base step with the second gradient. A filter that selects no
            parameter is rejected.

        ``every``, ``policy`` and ``perturb_filter`` are keyword arguments of every two-pass
        optimizer (SAM, ASAM, GSAM, LookSAM, ESAM, R-SAM: they are taken out of the base
        optimizer's keyword arguments here). With a schedule, a training loop asks
        :attr:`sam_step` whether this step takes two passes; ``step(closure)`` does it itself.
    """

    _step_supports_amp_scaling = True
    #: Whether the subclass's step follows this class's step logic (a schedule can apply).
    _schedulable = True
    #: Whether the subclass runs on sharded parameters (DTensors, FSDP2's ``fully_shard``): its
    #: global quantities reduced over the shards. The others refuse them at construction.
    _shardable = False

    def __init__(
        self,
        params,
        base_optimizer: type,
        defaults: dict[str, Any],
        base_kwargs: dict[str, Any],
        *,
        stash_mode: str = "copy",
        stash_dtype: torch.dtype | None = None,
        fused_step: bool | None = None,
        model: nn.Module | None = None,
        sync_first_pass: bool = False,
        bn_first_pass_only: bool = True,
        backend: str = "auto",
        every: int = 1,
        policy: Any = None,
        perturb_filter: Callable[[torch.Tensor], bool] | None = None,
    ):
        name = type(self).__name__
        base_kwargs = dict(base_kwargs)
        every = base_kwargs.pop("every", every)
        policy = base_kwargs.pop("policy", policy)
        perturb_filter = base_kwargs.pop("perturb_filter", perturb_filter)
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                f"{name}: base_optimizer must be an optimizer class such as torch.optim.SGD, got "
                f"{base_optimizer!r} (pass the class and its arguments, e.g. lr=0.1, as keywords)"
            )
        C.one_of(stash_mode, "stash_mode", name, ("copy", "delta"))
        C.dtype(stash_dtype, "stash_dtype", name, optional=True)
        if stash_dtype is not None and stash_mode != "delta":
            raise ValueError(f"{name}: stash_dtype applies to stash_mode='delta' only")
        if fused_step is not None:
            C.flag(fused_step, "fused_step", name)
        C.module(model, "model", name, optional=True)
        sync_first_pass = C.flag(sync_first_pass, "sync_first_pass", name)
        bn_first_pass_only = C.flag(bn_first_pass_only, "bn_first_pass_only", name)
        C.backend(backend, name)
        defaults = {k: self._check_option(k, v, k) for k, v in defaults.items()}
        self._own_defaults = dict(defaults)
        super().__init__(params, {**base_kwargs, **defaults})
        for i, g in enumerate(self.param_groups):
            self._check_group(g, i)
        if sharded_params(name, self.param_groups) and not self._shardable:
            refuse_sharded(name, self.param_groups)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # One set of groups and one state for both: schedulers, checkpoints and hooks see the
        # base optimizer's hyperparameters and moments through this object.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self.stash_mode = stash_mode
        self.stash_dtype = stash_dtype
        self.model = model
        self.sync_first_pass = sync_first_pass
        self.bn_first_pass_only = bn_first_pass_only
        self.backend = backend
        # None: fused where the base optimizer allows it; True: fused or an error; False: exact.
        self._fused_request = fused_step
        self.fused_step  # noqa: B018  (an explicit fused_step=True with an unsupported base raises now)
        self._stash: dict[torch.Tensor, torch.Tensor] = {}
        self._perturbed: list[torch.Tensor] | None = None
        self._first_found_inf: torch.Tensor | None = None
        self._grad_scaler = None
        self.last_grad_norm: torch.Tensor | None = None
        self.every, self.policy, self.perturb_filter = schedule.check_schedule(
            self, every, policy, perturb_filter, self._schedulable)
        self._filter_hits: dict[int, bool] = {}
        #: Completed steps (two-pass and single-pass), the schedule's clock.
        self.steps_done = 0

    # ----------------------------------------------------------------------------------------
    # To implement
    # ----------------------------------------------------------------------------------------

    def _perturb(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        stash: list[torch.Tensor],
        groups: list[dict],
        grad_scale: torch.Tensor | None,
    ) -> torch.Tensor:
        """Perturb ``params`` in place from ``grads`` (scaled by ``grad_scale`` if given), writing
        the stash; ``groups[i]`` is the param group of ``params[i]``. Returns the gradient norm
        (a device tensor; non-finite means nothing was perturbed)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------
    # Groups
    # ----------------------------------------------------------------------------------------

    #: The subclass's per-group options and their checks, ``name -> check(value, name, fn)``
    #: (:mod:`saf_kernels._checks`): applied to the constructor's value and to every group's.
    _options: dict[str, Callable[[Any, str, str], Any]] = {}

    def _check_option(self, key: str, value, label: str):
        check = self._options.get(key)
        return value if check is None else check(value, label, type(self).__name__)

    def _check_group(self, group: dict, index: int) -> None:
        for k in self._options:
            if k in group:
                group[k] = self._check_option(k, group[k], f"param_groups[{index}][{k!r}]")

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group to both this optimizer and the base optimizer (they share the list); its
        options (``rho``, ...) are checked as the constructor's."""
        if not hasattr(self, "base_optimizer"):
            super().add_param_group(param_group)
            return
        for k, v in self._own_defaults.items():
            param_group.setdefault(k, v)
        self._check_group(param_group, len(self.param_groups))
        self.base_optimizer.add_param_group(param_group)

    def _collect(self) -> tuple[list, list, list]:
        params, grads, groups = [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                params.append(p)
                grads.append(p.grad)
                groups.append(group)
        return params, grads, groups

    def _stash_for(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for p in params:
            s = self._stash.get(p)
            dtype = p.dtype if self.stash_dtype is None else self.stash_dtype
            if (
                s is None
                or s.shape != p.shape
                or s.dtype != dtype
                or s.device != p.device
                or s.stride() != p.stride()
            ):
                s = torch.empty_like(p, dtype=dtype)
                self._stash[p] = s
            out.append(s)
        return out

    # ----------------------------------------------------------------------------------------
    # The two steps
    # ----------------------------------------------------------------------------------------

    def begin_step(self) -> None:
        """Call before the first forward of a step (under gradient accumulation: before its first
        micro-batch). Nothing to do for SAM, ASAM, ESAM and GSAM; R-SAM adds its noise here. A
        second call in the same step does nothing, so a trainer integration may call it at every
        window start without knowing the method."""

    @property
    def perturbed(self) -> bool:
        """True between :meth:`first_step` and the second step: the weights are ``w + e`` now
        (e.g. to log only the first pass's loss in a ``training_step`` that runs twice)."""
        return self._perturbed is not None

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> torch.Tensor:
        """Perturbs the weights from the current gradients (the ascent step).

        Args:
            zero_grad: clear the gradients afterwards (``set_to_none``), ready for the second
                backward. Leave False to accumulate the second pass into fresh gradients yourself.
            grad_scaler: the ``torch.amp.GradScaler`` that scaled the loss, if any. Its scale is
                read from its device tensor (no synchronisation) and divided out inside the
                kernels; an overflow perturbs nothing and makes the whole step skip. Finish
                the step with ``grad_scaler.step(optimizer)``.

        Returns:
            The norm of the (unscaled) first gradients, a device tensor.
        """
        fn = f"{type(self).__name__}.first_step"
        C.flag(zero_grad, "zero_grad", fn)
        if grad_scaler is not None and not (hasattr(grad_scaler, "is_enabled")
                                            and hasattr(grad_scaler, "_get_scale_async")):
            raise TypeError(f"{fn}: grad_scaler must be a torch.amp.GradScaler or None, got {grad_scaler!r}")
        if self._perturbed is not None:
            raise RuntimeError(
                f"{type(self).__name__}.first_step() was called twice without second_step() "
                "(the weights are still perturbed)"
            )
        grad_scale = None
        self._grad_scaler = None
        if grad_scaler is not None and grad_scaler.is_enabled():
            grad_scale = grad_scaler._get_scale_async()
            if grad_scale is None:
                raise RuntimeError(
                    "grad_scaler has no scale yet: call grad_scaler.scale(loss).backward() first"
                )
            self._grad_scaler = grad_scaler
        if not self.sam_step:
            raise RuntimeError(
                f"{type(self).__name__}.first_step() on a step the schedule takes with one pass "
                f"(every={self.every}, policy={self.policy!r}, steps done {self.steps_done}): check "
                "opt.sam_step before the second pass, and finish this step with second_step() or step()"
            )
        params, grads, groups = self._selected(*self._collect())
        if not params:
            no_sharded_grads(type(self).__name__, self.param_groups)
        stash = self._stash_for(params)
        norm = self._perturb(params, grads, stash, groups, grad_scale)
        self._perturbed = params
        self._first_found_inf = None
        if grad_scale is not None:
            self._first_found_inf = (~torch.isfinite(norm)).to(torch.float32).reshape(())
        self.last_grad_norm = norm
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return norm

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restores the weights and applies the base optimizer's step with the current gradients
        (taken at the perturbed weights).

        Under AMP call ``grad_scaler.step(optimizer)`` instead (it calls :meth:`step`, which
        lands here with ``grad_scale`` / ``found_inf`` set).
        """
        if self._single_pass_now():
            self.single_pass_step(zero_grad)
            return
        params, grad_scale, found = self._begin_second_step(zero_grad)
        stash = [self._stash[p] for p in params]
        if self.fused_step:  # resolved now: the groups may have changed since the last step
            self._fused_second_step(params, stash, grad_scale, found)
        else:
            sam_ops.sam_restore_(params, stash, self.stash_mode, backend=self.backend)
            self._base_step(grad_scale, found)
        self._perturbed = None
        self._first_found_inf = None
        self._grad_scaler = None
        self._opt_called = True  # LR schedulers check this flag of the stepped optimizer
        self._end_step(self.last_grad_norm)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    # ----------------------------------------------------------------------------------------
    # Schedules and the parameter filter (every two-pass optimizer)
    # ----------------------------------------------------------------------------------------

    def _is_sam_step(self, t: int) -> bool:
        """Whether step ``t`` (0-based) of a fixed schedule takes two passes (Composer's rule)."""
        return (t + 1) % self.every == 0

    @property
    def sam_step(self) -> bool:
        """Whether the current step takes the two passes (perturb, second gradient); known on the
        host without synchronisation. Always True without a schedule."""
        if self.policy is not None:
            return self.policy.decide(self.steps_done)
        return self._is_sam_step(self.steps_done)

    def _single_pass_now(self) -> bool:
        return self._perturbed is None and not self.sam_step

    def _selected(self, params, grads, groups):
        """The tensors ``perturb_filter`` selects (all without one)."""
        if self.perturb_filter is None:
            return params, grads, groups
        keep = [schedule.selected(self, p) for p in params]
        return ([x for x, k in zip(params, keep) if k], [x for x, k in zip(grads, keep) if k],
                [x for x, k in zip(groups, keep) if k])

    def _end_step(self, grad_norm: torch.Tensor | None) -> None:
        """A step is complete: the schedule's clock moves on and the policy sees the first
        gradient's norm (a device tensor; its decision reaches the host asynchronously)."""
        if self.policy is not None and grad_norm is not None:
            self.policy.update(grad_norm, self.steps_done)
        self.steps_done += 1

    @torch.no_grad()
    def single_pass_step(self, zero_grad: bool = False) -> None:
        """The step the schedule takes with one pass: the base optimizer's step with the current
        gradients (:meth:`_single_pass_update`, LookSAM adds its reused component). Reached
        through :meth:`second_step` / :meth:`step` on such a step; under AMP through
        ``grad_scaler.step(optimizer)``."""
        C.flag(zero_grad, "zero_grad", f"{type(self).__name__}.second_step")
        grad_scale = getattr(self, "grad_scale", None)
        found = getattr(self, "found_inf", None)
        norm = self._single_pass_update(grad_scale, found)
        self._opt_called = True
        self._end_step(norm)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def _single_pass_update(self, grad_scale, found) -> torch.Tensor | None:
        """The base step on a one-pass step; returns the gradient norm when the policy needs it."""
        norm = None
        if self.policy is not None:
            norm = schedule.grad_norm(self._collect()[1], grad_scale)
        self._base_step(grad_scale, found)
        return norm

    def _begin_second_step(self, zero_grad) -> tuple[list[torch.Tensor], Any, Any]:
        """The checks every second step makes: its arguments, a step begun by first_step(), a
        GradScaler step where first_step() had one. Returns the perturbed params, the scale and
        the combined found-inf flag (both passes)."""
        C.flag(zero_grad, "zero_grad", f"{type(self).__name__}.second_step")
        params = self._perturbed
        if params is None:
            raise RuntimeError(f"{type(self).__name__}.second_step() without first_step()")
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if self._grad_scaler is not None and found_inf is None:
            raise RuntimeError(
                f"{type(self).__name__}: first_step() used a GradScaler; finish the step with "
                "grad_scaler.step(optimizer) so that the second gradients are unscaled and checked"
            )
        return params, grad_scale, self._combined_found_inf(found_inf)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One full step.

        With a closure (torch's convention: it clears the gradients if it wants to, computes the
        loss and calls ``backward()``; no ``GradScaler``): the closure is called for the first
        pass, the weights are perturbed, the closure is called again at the perturbed weights,
        then :meth:`second_step`. Returns the first loss. If the optimizer was given a ``model``,
        the first call runs inside :meth:`first_pass` and the second inside :meth:`second_pass`.

        Without a closure: finishes a step begun by :meth:`first_step` (this is how
        ``GradScaler.step(optimizer)`` drives the second step).
        """
        C.function(closure, "closure", f"{type(self).__name__}.step", " (computes the loss and calls backward())",
                   optional=True)
        if closure is None and self._single_pass_now():
            self.single_pass_step()
            return None
        if closure is not None and not self.sam_step:
            with torch.enable_grad():
                loss = closure()
            self.single_pass_step()
            return loss
        if closure is None:
            if self._perturbed is None:
                raise RuntimeError(
                    f"{type(self).__name__}.step() without a closure finishes a step begun by "
                    "first_step(); call first_step() first, or pass a closure that computes the "
                    "loss and its gradients. In a trainer that calls step() after its own backward: "
                    "Lightning: Trainer(callbacks=[saf_kernels.integrations.lightning.SharpnessAwareCallback()]); "
                    "Hugging Face: saf_kernels.integrations.hf.SharpnessAwareTrainer"
                )
            self.second_step()
            return None
        with torch.enable_grad(), self.first_pass(self.model):
            loss = closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad(), self.second_pass(self.model):
            closure()
        self.second_step()
        return loss

    # ----------------------------------------------------------------------------------------
    # Training-loop contexts
    # ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def first_pass(self, model: nn.Module | None = None) -> Iterator[None]:
        """Wrap the first forward + backward: under DDP, skips the gradient all-reduce unless
        ``sync_first_pass`` (see :func:`saf_kernels.optim.utils.first_pass`)."""
        with utils.first_pass(model if model is not None else self.model, sync=self.sync_first_pass):
            yield

    @contextlib.contextmanager
    def second_pass(self, model: nn.Module | None = None) -> Iterator[None]:
        """Wrap the second forward (+ backward): keeps BatchNorm's running statistics from the
        first pass (``bn_first_pass_only``; see :func:`saf_kernels.optim.utils.frozen_bn_stats`)."""
        model = model if model is not None else self.model
        if model is not None and self.bn_first_pass_only:
            with utils.frozen_bn_stats(model):
                yield
        else:
            yield

    # ----------------------------------------------------------------------------------------
    # AMP and the base step
    # ----------------------------------------------------------------------------------------

    def _combined_found_inf(self, found_inf: torch.Tensor | None) -> torch.Tensor | None:
        first = self._first_found_inf
        if first is None:
            return found_inf
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
            and not self.sync_first_pass
        ):
            # Unsynced first gradients overflow per replica; every replica must skip together.
            first = first.clone()
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MAX)
        self._report_first_pass_overflow(first)
        return first if found_inf is None else found_inf + first.to(found_inf.device)

    def _report_first_pass_overflow(self, first: torch.Tensor) -> None:
        # GradScaler.update() backs off the scale from the found-inf tensors it recorded for this
        # optimizer; the first pass's overflow must count too, or a scale that overflows only in
        # the first pass would never shrink (and every step would be skipped).
        scaler = self._grad_scaler
        record = getattr(scaler, "_per_optimizer_states", {}).get(id(self), {}).get("found_inf_per_device")
        if record:
            for t in record.values():
                t.add_(first.to(t.device))
        elif scaler is not None:
            warnings.warn(
                "saf_kernels: could not report a first-pass overflow to the GradScaler (unknown "
                "GradScaler internals); the step is still skipped",
                stacklevel=4,
            )

    def _base_step(self, grad_scale: torch.Tensor | None, found: torch.Tensor | None) -> None:
        base = self.base_optimizer
        if grad_scale is None and found is None:
            base.step()
            return
        if getattr(base, "_step_supports_amp_scaling", False):
            # torch's fused optimizers unscale and skip on the device.
            base.grad_scale, base.found_inf = grad_scale, found
            try:
                base.step()
            finally:
                del base.grad_scale, base.found_inf
            return
        if grad_scale is not None:
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        by_device.setdefault(p.grad.device, []).append(p.grad)
            inv = grad_scale.double().reciprocal().float()
            for dev, grads in by_device.items():
                torch._foreach_mul_(grads, inv.to(dev))
        # The one host synchronisation: a generic optimizer cannot skip a step on the device.
        if found is None or found.item() == 0:
            base.step()

    @property
    def fused_step(self) -> bool:
        """Whether the second step runs the fused restore + base step, decided from the base
        optimizer and its current groups: with ``fused_step=None`` (the default) True where they
        allow it; ``fused_step=True`` raises where they do not; ``fused_step=False`` never."""
        if self._fused_request is False:
            return False
        why = self._unfusable_reason()
        if why is None:
            return True
        if self._fused_request:
            raise ValueError(f"{type(self).__name__}: {why}")
        return False

    def _unfusable_reason(self) -> str | None:
        """Why the fused kernels cannot run this base optimizer's update, or None if they can."""
        base = self.base_optimizer
        if type(base) not in (torch.optim.SGD, torch.optim.AdamW, torch.optim.Adam):
            return (
                "fused_step=True supports torch.optim.SGD, torch.optim.AdamW and torch.optim.Adam base "
                f"optimizers, got {type(base).__name__}"
            )
        for g in self.param_groups:
            if g.get("differentiable") or g.get("amsgrad") or any(
                isinstance(g.get(k), torch.Tensor) for k in ("lr", "weight_decay", "momentum", "dampening")
            ) or any(isinstance(b, torch.Tensor) for b in g.get("betas", ())):
                return (
                    "fused_step=True does not support differentiable, amsgrad or tensor learning rates "
                    "(or other tensor hyperparameters)"
                )
            # Adam without weight decay (or with decoupled decay) is AdamW's update: same kernel.
            if type(base) is torch.optim.Adam and g["weight_decay"] != 0 and not g.get("decoupled_weight_decay"):
                return (
                    "fused_step=True with torch.optim.Adam needs weight_decay=0 or decoupled_weight_decay=True "
                    "(Adam's L2 decay enters the moments; the fused kernel decouples it as AdamW), got "
                    f"weight_decay={g['weight_decay']!r}"
                )
        return None

    def _fused_second_step(self, params, stash, grad_scale, found) -> None:
        perturbed = {id(p): s for p, s in zip(params, stash)}
        # Perturbed but without a second gradient: restore only (torch skips such params too).
        lost = [p for p in params if p.grad is None]
        if lost:
            sam_ops.sam_restore_(
                lost, [perturbed[id(p)] for p in lost], self.stash_mode, backend=self.backend
            )
        now, grads, gs = self._collect()
        # A gradient only in the second pass: nothing to restore, so the stash is the weight itself
        # (copy mode) or a zero perturbation (delta mode).
        st = []
        for p in now:
            s = perturbed.get(id(p))
            if s is None:
                s = (
                    p.clone()
                    if self.stash_mode == "copy"
                    else torch.zeros_like(p, dtype=self.stash_dtype or p.dtype)
                )
            st.append(s)
        if not now:
            return
        if type(self.base_optimizer) is torch.optim.SGD:
            self._fused_sgd(now, grads, st, gs, grad_scale, found)
        else:
            self._fused_adamw(now, grads, st, gs, grad_scale, found)

    def _momentum_buffers(self, params) -> tuple[list[torch.Tensor], list[bool]]:
        """SGD's momentum buffers of ``params`` (created as zeros where missing) and, per tensor,
        whether this is its first momentum step."""
        bufs, first = [], []
        for p in params:
            st = self.state[p]
            b = st.get("momentum_buffer")
            first.append(b is None)
            if b is None:
                # Zeros, not empty: a first step skipped by AMP leaves it as it is.
                b = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["momentum_buffer"] = b
            bufs.append(b)
        return bufs, first

    def _fused_sgd(self, params, grads, stash, gs, grad_scale, found) -> None:
        with_buf = [i for i, g in enumerate(gs) if g["momentum"] != 0]
        without = [i for i, g in enumerate(gs) if g["momentum"] == 0]
        for idx, has_buf in ((with_buf, True), (without, False)):
            if not idx:
                continue
            ps = [params[i] for i in idx]
            bufs, first = self._momentum_buffers(ps) if has_buf else ([], [])
            g_of = [gs[i] for i in idx]
            sam_ops.sam_restore_sgd_(
                ps,
                [grads[i] for i in idx],
                [stash[i] for i in idx],
                bufs,
                lr=[g["lr"] for g in g_of],
                weight_decay=[g["weight_decay"] for g in g_of],
                momentum=[g["momentum"] for g in g_of],
                dampening=[g["dampening"] for g in g_of],
                nesterov=[g["nesterov"] for g in g_of],
                maximize=[g.get("maximize", False) for g in g_of],
                first_run=first if has_buf else False,
                stash_mode=self.stash_mode,
                grad_scale=grad_scale,
                found_inf=found,
                backend=self.backend,
            )

    def _fused_adamw(self, params, grads, stash, gs, grad_scale, found) -> None:
        m, v, steps = [], [], []
        for p in params:
            st = self.state[p]
            if len(st) == 0 or "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step = st["step"]
            if not isinstance(step, torch.Tensor) or step.device != p.device or step.dtype != torch.float32:
                st["step"] = step = torch.as_tensor(step, dtype=torch.float32).to(p.device).reshape(())
            m.append(st["exp_avg"])
            v.append(st["exp_avg_sq"])
            steps.append(step)
        by_dev: dict[torch.device, list[torch.Tensor]] = {}
        for s in steps:
            by_dev.setdefault(s.device, []).append(s)
        for dev, ss in by_dev.items():
            if found is None:
                torch._foreach_add_(ss, 1.0)
            else:
                torch._foreach_add_(ss, (1.0 - found.clamp(max=1.0)).to(dev))
        sam_ops.sam_restore_adamw_(
            params,
            grads,
            stash,
            m,
            v,
            steps,
            lr=[g["lr"] for g in gs],
            beta1=[g["betas"][0] for g in gs],
            beta2=[g["betas"][1] for g in gs],
            eps=[g["eps"] for g in gs],
            weight_decay=[g["weight_decay"] for g in gs],
            maximize=[g.get("maximize", False) for g in gs],
            stash_mode=self.stash_mode,
            grad_scale=grad_scale,
            found_inf=found,
            backend=self.backend,
        )

    # ----------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and the shared groups (this optimizer's options such as
        ``rho`` are in the groups). Save between steps: a checkpoint taken between first_step and
        second_step would pair perturbed weights with it."""
        if self._perturbed is not None:
            warnings.warn(
                f"{type(self).__name__}.state_dict() between first_step() and second_step(): the model's "
                "weights are perturbed right now",
                stacklevel=2,
            )
        sd = super().state_dict()
        sd["saf_kernels"] = {
            "optimizer": type(self).__name__,
            "base_optimizer": type(self.base_optimizer).__name__,
            "steps_done": self.steps_done,
        }
        if self.policy is not None:
            sd["saf_kernels"]["policy"] = self.policy.state_dict()
        # Also in every group (copies made by the state_dict above): torch.distributed.checkpoint's
        # get_state_dict / get_optimizer_state_dict keep only "state" and "param_groups" (with
        # all of each group's keys), so a sharded checkpoint keeps the schedule's clock this way.
        # As bytes: DCP plans a load from a fresh optimizer's entry, whose policy has no
        # statistics tensor yet (a tensor where the template has none fails the load).
        packed = _pack(sd["saf_kernels"])
        for g in sd["param_groups"]:
            g["saf_kernels"] = packed
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads groups and the base optimizer's state (through the base optimizer, so that its
        own rules for casting state, e.g. Adam's ``step``, apply), keeping the two shared."""
        info = state_dict.get("saf_kernels")
        groups = state_dict.get("param_groups")
        if isinstance(groups, list) and any(isinstance(g, dict) and "saf_kernels" in g for g in groups):
            # (a checkpoint through torch.distributed.checkpoint: the info travelled in the groups)
            info = info or _unpack(next(g["saf_kernels"] for g in groups if "saf_kernels" in g))
            state_dict = {**state_dict, "param_groups": [{k: v for k, v in g.items() if k != "saf_kernels"}
                                                         for g in groups]}
        if info and info.get("base_optimizer") not in (None, type(self.base_optimizer).__name__):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the checkpoint's base optimizer is "
                f"{info['base_optimizer']}, this one's is {type(self.base_optimizer).__name__}"
            )
        sd = {k: v for k, v in state_dict.items() if k != "saf_kernels"}
        self.base_optimizer.load_state_dict(sd)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._stash.clear()
        self._perturbed = None
        info = info or {}
        self.steps_done = int(info.get("steps_done", 0))
        if self.policy is not None and info.get("policy") is not None:
            self.policy.load_state_dict(info["policy"])

    @torch.no_grad()
    def init_state(self) -> None:
        """Creates the base optimizer's state (momentum buffers, Adam's moments: zeros) as its first
        step would, without changing a weight: one base step with zero gradients and ``lr = 0``,
        then the tensors of the parameters' shape zeroed (the step counts stay at 1).

        ``torch.distributed.checkpoint.state_dict.set_state_dict`` needs the state of a fresh
        optimizer to load into and makes it by calling ``step()``, which a two-pass optimizer
        refuses outside a step begun by :meth:`first_step`; call this first (it does nothing when
        the state exists). Under FSDP2 the state is sharded like the parameters."""
        if self.state:
            return
        made, lrs = [], []
        for g in self.param_groups:
            lrs.append(g["lr"])
            g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
            for p in g["params"]:
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
                    made.append(p)
        try:
            self.base_optimizer.step()
        finally:
            for g, lr in zip(self.param_groups, lrs):
                g["lr"] = lr
            for p in made:
                p.grad = None
        for p, st in self.state.items():
            for v in st.values():  # e.g. SGD's buffer is weight_decay * w after that step
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == p.shape:
                    v.zero_()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_optimizer={self.base_optimizer!r})"


def sharded_params(name: str, param_groups: list[dict]) -> bool:
    """Whether the parameters are DTensors (FSDP2's ``fully_shard``); a mix of DTensors and plain
    tensors (e.g. ``fully_shard`` on some submodules but not on the root) is an error."""
    where = [(i, j, mt.is_dtensor(p))
             for i, g in enumerate(param_groups) for j, p in enumerate(g["params"])]
    kinds = {d for _, _, d in where}
    if len(kinds) > 1:
        i, j, d = next(w for w in where if w[2] != where[0][2])
        kind = {True: "a DTensor", False: "a plain tensor"}
        raise TypeError(
            f"{name}: param_groups[{i}]['params'][{j}] is {kind[d]} but param_groups[{where[0][0]}]['params']"
            f"[{where[0][1]}] is {kind[not d]}: shard every parameter (call fully_shard on the root module too) "
            "or none")
    return kinds == {True}


def refuse_sharded(name: str, param_groups: list[dict]) -> None:
    """Raises if a parameter is a DTensor (FSDP2's ``fully_shard``) for an optimizer whose global
    quantities are not reduced over the shards yet (the result would be silently per-shard)."""
    for i, g in enumerate(param_groups):
        for j, p in enumerate(g["params"]):
            if mt.is_dtensor(p):
                raise NotImplementedError(
                    f"{name}: param_groups[{i}]['params'][{j}] is a DTensor (a model sharded by FSDP2's "
                    f"fully_shard); {name} does not run on sharded parameters yet (SAM, ASAM, ESAM, R-SAM, GSAM "
                    "and LookSAM do; see the README's 'Sharded training (FSDP2)')")


def _pack(info: dict) -> bytes:
    """The optimizer's own checkpoint entry as bytes (``torch.save``; a host copy of the policy's
    statistics, once per checkpoint)."""
    buf = io.BytesIO()
    torch.save(info, buf)
    return buf.getvalue()


def _unpack(packed) -> dict:
    return torch.load(io.BytesIO(packed), weights_only=True) if isinstance(packed, (bytes, bytearray)) else packed


def no_sharded_grads(name: str, param_groups: list[dict]) -> None:
    """Raises if the parameters are sharded (FSDP2) and none has a gradient at ``first_step``: the
    first backward ran without gradient sync, the way a per-replica (m-sharpness) first pass would
    be asked for, which FSDP2 cannot give (the gradients then stay unsharded on the FSDP modules,
    not on the parameters)."""
    if any(mt.is_dtensor(p) for g in param_groups for p in g["params"]):
        raise RuntimeError(
            f"{name}.first_step(): no sharded parameter has a gradient. Under FSDP2 the first backward must "
            "reduce-scatter its gradients (set_requires_gradient_sync(True), the default, on its last "
            "micro-batch): a per-replica (m-sharpness) first pass is not supported under FSDP2, since each "
            "rank would need its own perturbed copy of the whole model while ranks share the sharded "
            "weights, and the unsynchronised gradients are full-size on every rank (see the README's "
            "'Sharded training (FSDP2)'). Use DDP for m-sharpness.")


def nonneg(value, name: str, fn: str) -> float:
    """A finite number >= 0 (``rho``, ``eta``, ``perturb_eps``, ...)."""
    return C.number(value, name, fn, lo=0)


def unit(value, name: str, fn: str) -> float:
    """A number in (0, 1] (ESAM's ``beta`` and ``gamma``)."""
    return C.number(value, name, fn, lo=0, hi=1, lo_open=True)
