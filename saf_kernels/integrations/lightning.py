"""PyTorch Lightning integration: the two-pass optimizers under automatic optimisation, and SAF /
MESA as a callback.

Two-pass optimizers (SAM, ASAM, ESAM, R-SAM, GSAM) returned from ``configure_optimizers``::

    trainer = L.Trainer(callbacks=[SharpnessAwareCallback()], precision="16-mixed",
                        accumulate_grad_batches=4, gradient_clip_val=1.0, strategy="ddp")

:class:`SharpnessAwareCallback` runs each optimizer step as the method intends whatever the
trainer's options: the first pass over every micro-batch of the accumulation window, the ascent,
the second pass over every micro-batch again at the perturbed weights (Lightning alone would
re-run only the last one), gradient clipping and ``on_before_optimizer_step`` once, on the second
gradients (the ones the base optimizer applies), ``16-mixed`` through the stock ``GradScaler``
(an overflow in either pass skips the step and backs off the scale), and under DDP the first
pass without all-reduce unless the optimizer says ``sync_first_pass=True`` (m-sharpness, as the
papers' code). Without the callback, plain ``Trainer.fit`` works for fp32 / bf16 without
accumulation (``step(closure)`` follows torch's convention), ``16-mixed`` raises.

SAF and MESA: keep the :class:`saf_kernels.SAF` or :class:`saf_kernels.MESA` object on the
LightningModule and add :class:`SAFCallback`; it finds it, moves MESA's teacher beside the model,
updates the EMA after every optimizer step (not every micro-batch), and saves and restores the
bank or the teacher in Lightning's checkpoints.

``import saf_kernels`` never imports this module; it needs ``pip install lightning``.
"""

from __future__ import annotations

import warnings
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loops.optimization.automatic import ClosureResult
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.trainer import call
    from lightning.pytorch.utilities import GradClipAlgorithmType
except ImportError as e:  # pragma: no cover - the tests skip without Lightning
    raise ImportError(
        "saf_kernels.integrations.lightning needs PyTorch Lightning 2.x: pip install lightning "
        "(or pip install 'saf_kernels[lightning]')"
    ) from e

from ..optim.base import TwoPassOptimizer
from ..saf import MESA, SAF
from ._common import check_drivable, move_teacher, two_pass_optimizer, two_pass_step

__all__ = ["SAFCallback", "SharpnessAwareCallback"]


class _TwoPassPrecision:
    """Mixed into the class of the trainer's precision plugin while the callback is attached: the
    optimizer step of a two-pass optimizer goes to the callback; every other optimizer, and
    everything else the plugin does (autocast, loss scaling, its checkpoint), is unchanged."""

    _saf_callback: SharpnessAwareCallback

    def optimizer_step(self, optimizer, model, closure, **kwargs):
        opt = two_pass_optimizer(optimizer)
        if opt is None or not getattr(model, "automatic_optimization", True):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        return self._saf_callback._optimizer_step(self, opt, model, closure, **kwargs)

    def clip_gradients(self, optimizer, clip_val=0.0, gradient_clip_algorithm=GradClipAlgorithmType.NORM, **kwargs):
        if two_pass_optimizer(optimizer) is not None and getattr(self, "scaler", None) is not None:
            # MixedPrecision refuses to clip for optimizers that unscale inside step(); the
            # callback unscales the second gradients before it clips, so plain clipping is right.
            return Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)
        return super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm, **kwargs)


_PLUGIN_CLASSES: dict[type, type] = {}


def _two_pass_class(cls: type) -> type:
    if cls not in _PLUGIN_CLASSES:
        _PLUGIN_CLASSES[cls] = type(f"SharpnessAware{cls.__name__}", (_TwoPassPrecision, cls), {})
    return _PLUGIN_CLASSES[cls]


class SharpnessAwareCallback(Callback):
    """Runs the optimizer steps of the library's two-pass optimizers (SAM, ASAM, ESAM, R-SAM,
    GSAM) under Lightning's automatic optimisation.

    Usage: return the optimizer (and any LR scheduler) from ``configure_optimizers`` as usual and
    add the callback::

        def configure_optimizers(self):
            return SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

        trainer = L.Trainer(callbacks=[SharpnessAwareCallback()], precision="16-mixed",
                            accumulate_grad_batches=2, gradient_clip_val=1.0)

    One optimizer step, accumulation window ``b_1 .. b_k`` (k = ``accumulate_grad_batches``):

    1. ``begin_step()`` at ``b_1`` (R-SAM's noise), then Lightning's own forward + backward of
       ``b_1 .. b_{k-1}``; the callback runs ``b_k``'s first pass (no DDP all-reduce unless the
       optimizer has ``sync_first_pass=True``).
    2. ``first_step``: the ascent from the accumulated first gradients (unscaled in the kernels
       under ``16-mixed``; a non-finite norm perturbs nothing and skips the step).
    3. ``training_step`` + backward again for ``b_1 .. b_k`` at ``w + e`` (BatchNorm statistics
       kept from the first pass; DDP all-reduces once, after ``b_k``).
    4. Under ``16-mixed`` the scaler unscales the second gradients; then Lightning's
       ``on_before_optimizer_step`` hooks and gradient clipping (``gradient_clip_val``) run once,
       on these gradients; ``optimizer.step()`` (through ``scaler.step``) restores ``w`` and
       applies the base optimizer; ``scaler.update()`` backs off if either pass overflowed.

    So ``training_step`` runs twice per micro-batch: what it logs in the second run is measured
    at the perturbed weights (guard with ``if not self.optimizers().optimizer.perturbed:`` to log
    the first pass only). The step's returned loss (progress bar, ``on_train_batch_end``) is the
    first pass's. ESAM runs with ``gamma=1`` only (its data selection needs per-sample losses,
    which ``training_step`` does not return). Do not combine with :class:`saf_kernels.SAF` (its
    bank would record the perturbed logits too); MESA is fine.

    Other optimizers of the same trainer and manual optimisation are left alone. The callback
    swaps the class of the trainer's precision plugin for a subclass during ``fit`` (and puts it
    back at teardown): the plugin keeps its autocast, its ``GradScaler`` and its checkpoint state.
    """

    def __init__(self) -> None:
        self._window: list[tuple[Any, int]] = []
        self._plugin = None
        self._plugin_class: type | None = None

    # ---------------------------------------------------------------------------------------
    # Attaching to the trainer
    # ---------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        plugin = trainer.strategy.precision_plugin
        if not isinstance(plugin, _TwoPassPrecision):
            self._plugin, self._plugin_class = plugin, type(plugin)
            plugin.__class__ = _two_pass_class(type(plugin))
        plugin._saf_callback = self

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._plugin is not None:
            self._plugin.__class__ = self._plugin_class
            del self._plugin._saf_callback
            self._plugin = self._plugin_class = None
        self._window = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for opt in trainer.optimizers:
            inner = two_pass_optimizer(opt)
            if inner is not None:
                check_drivable(inner, "SharpnessAwareCallback")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._window:  # the first micro-batch of a step
            for opt in trainer.optimizers:
                inner = two_pass_optimizer(opt)
                if inner is not None:
                    inner.begin_step()
        self._window.append((batch, batch_idx))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window = []

    # ---------------------------------------------------------------------------------------
    # The step
    # ---------------------------------------------------------------------------------------

    def _replay(self, trainer: pl.Trainer, opt: TwoPassOptimizer, batch: Any, batch_idx: int) -> None:
        """``training_step`` + backward of an earlier micro-batch of the window, as Lightning's
        closure does it (loss divided by ``accumulate_grad_batches``, the strategy's backward)."""
        out = call._call_strategy_hook(trainer, "training_step", batch, batch_idx)
        result = ClosureResult.from_training_step_output(out, trainer.accumulate_grad_batches)
        if result.closure_loss is not None:
            call._call_strategy_hook(trainer, "backward", result.closure_loss, opt)

    def _optimizer_step(self, plugin, opt: TwoPassOptimizer, model: pl.LightningModule, closure, **kwargs):
        trainer = model.trainer
        window, self._window = self._window, []
        earlier = window[:-1]
        first_result = {}

        def last_first_pass():
            loss = closure()
            first_result["r"] = getattr(closure, "_result", None)
            return loss

        second = [lambda b=b, i=i: self._replay(trainer, opt, b, i) for b, i in earlier] + [closure]
        scaler = getattr(plugin, "scaler", None)
        loss = two_pass_step(opt, trainer.strategy.model, last_first_pass, second, grad_scaler=scaler)
        if first_result.get("r") is not None:
            closure._result = first_result["r"]  # report the first pass's loss, not the perturbed one
        if scaler is not None:
            scaler.unscale_(opt)
        plugin._after_closure(model, opt)  # on_before_optimizer_step hooks + clipping, once
        if scaler is not None:
            scaler.step(opt, **kwargs)
            scaler.update()
        else:
            opt.step(**kwargs)
        return loss


class SAFCallback(Callback):
    """SAF or MESA inside a Lightning fit.

    Keep the :class:`saf_kernels.SAF` or :class:`saf_kernels.MESA` object on the LightningModule
    (or give it here) and compute the loss with it in ``training_step``, passing
    ``self.current_epoch`` (0-based; Lightning restores it on resume)::

        class Lit(L.LightningModule):
            def __init__(self, num_samples):
                super().__init__()
                self.net = Net()
                self.saf = SAF(num_samples, num_classes=10)      # or: self.mesa = MESA(self.net)
            def training_step(self, batch, batch_idx):
                x, y, ids = batch                                 # IndexedDataset: the sample ids
                return self.saf(self.net(x), y, ids, self.current_epoch)
                # MESA: return self.mesa(self.net(x), y, x, self.current_epoch)

        trainer = L.Trainer(callbacks=[SAFCallback()])
        trainer.fit(Lit(len(train)), DataLoader(IndexedDataset(train), batch_size=128, shuffle=True))

    What it does:

    - **sample ids**: the bank is indexed by dataset index (:class:`saf_kernels.IndexedDataset`);
      under DDP Lightning's ``DistributedSampler`` keeps the dataset's indices, and the bank keeps a
      full replica per rank (each step's rows are all-gathered), so any rank finds a sample's past.
    - **epochs**: the loss takes ``self.current_epoch``; after a resume the bank's epoch tags line up.
    - **EMA update** (MESA): ``mesa.update()`` after every optimizer step, so once per
      accumulation window, not per micro-batch; the teacher is moved to the module's device at
      the start of the fit (MESA copies the model when it is built, before Lightning moves it).
    - **checkpoints**: the bank (SAF) or the teacher (MESA) is saved in Lightning's checkpoint
      under this callback's state and loaded on ``fit(ckpt_path=...)``; training then continues
      as if never interrupted.

    Args:
        method: the SAF or MESA object; None finds the only one among the module's attributes.
    """

    def __init__(self, method: SAF | MESA | None = None) -> None:
        if method is not None and not isinstance(method, (SAF, MESA)):
            raise TypeError(f"SAFCallback: method must be a saf_kernels.SAF or saf_kernels.MESA, got "
                            f"{type(method).__name__}")
        self.method = method
        self._pending: dict | None = None
        self._last_step: int | None = None

    @property
    def state_key(self) -> str:
        return "SAFCallback"

    def _resolve(self, pl_module: pl.LightningModule) -> SAF | MESA:
        if self.method is None:
            found = {name: v for name, v in vars(pl_module).items() if isinstance(v, (SAF, MESA))}
            if len(found) != 1:
                raise ValueError(
                    "SAFCallback: give the SAF or MESA object (SAFCallback(method)) or keep exactly one on the "
                    f"LightningModule; found {sorted(found) or 'none'}"
                )
            self.method = next(iter(found.values()))
        if self._pending is not None:
            self.method.load_state_dict(self._pending)
            self._pending = None
        return self.method

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._resolve(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        method = self._resolve(pl_module)
        if isinstance(method, MESA):
            move_teacher(method, pl_module.device)
        elif any(two_pass_optimizer(o) is not None for o in trainer.optimizers):
            warnings.warn(
                "SAFCallback: SAF with a two-pass optimizer runs training_step twice per batch, so the bank "
                "records the perturbed logits and the second pass finds no past entry; use SAF alone or MESA",
                stacklevel=2,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step  # restored from a checkpoint by now (not yet at on_fit_start)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if isinstance(self.method, MESA) and trainer.global_step != self._last_step:
            self.method.update()  # an optimizer step happened in this batch
        self._last_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        if self.method is None:
            return {} if self._pending is None else dict(self._pending)
        return self.method.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.method is None:
            self._pending = dict(state_dict)
        else:
            self.method.load_state_dict(state_dict)

