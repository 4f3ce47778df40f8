"""Hugging Face Transformers integration: :class:`SharpnessAwareTrainer`, a ``transformers.Trainer``
that runs the two passes of the library's sharpness-aware optimizers, and optionally MESA.

The stock ``Trainer`` calls ``optimizer.step()`` after its own backward, which a two-pass
optimizer cannot turn into a step (it needs a second forward + backward at the perturbed
weights). This trainer runs that second pass inside ``training_step`` at the last micro-batch of
each accumulation window, over every micro-batch of the window; the ``Trainer`` then clips the
second gradients and calls ``optimizer.step()``, which (through Accelerate's ``GradScaler`` under
``fp16``) restores the weights and applies the base optimizer.

``import saf_kernels`` never imports this module; it needs ``pip install transformers accelerate``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    from transformers import Trainer, TrainerCallback
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
except ImportError as e:  # pragma: no cover - the tests skip without Transformers
    raise ImportError(
        "saf_kernels.integrations.hf needs Hugging Face Transformers and Accelerate: pip install transformers "
        "accelerate (or pip install 'saf_kernels[hf]')"
    ) from e

from .. import _checks, optim
from ..optim.base import TwoPassOptimizer
from ..saf import MESA
from ._common import check_drivable, move_teacher, teacher_autocast, two_pass_optimizer, two_pass_step

__all__ = ["MESA_NAME", "SAM_METHODS", "SharpnessAwareTrainer"]

#: ``sam=`` names and the optimizer classes they build (around the class ``args.optim`` names).
SAM_METHODS: dict[str, type[TwoPassOptimizer]] = {
    "sam": optim.SAM,
    "asam": optim.ASAM,
    "esam": optim.ESAM,
    "rsam": optim.RSAM,
    "gsam": optim.GSAM,
}

#: The file beside ``optimizer.pt`` in a checkpoint folder that holds MESA's teacher.
MESA_NAME = "mesa_teacher.pt"


class _MESAUpdate(TrainerCallback):
    """Moves the teacher beside the model when training starts; the EMA after every optimizer step."""

    def __init__(self, trainer: SharpnessAwareTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = self.trainer.model
        first = next(iter(model.parameters()), None)
        if first is not None:
            move_teacher(self.trainer.mesa, first.device)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.mesa.update()


class SharpnessAwareTrainer(Trainer):
    """A ``transformers.Trainer`` for SAM, ASAM, ESAM, R-SAM and GSAM, and for MESA.

    Give the optimizer, or let it be built from ``TrainingArguments``::

        opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=5e-5, weight_decay=0.01)
        trainer = SharpnessAwareTrainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))

        trainer = SharpnessAwareTrainer(model=model, args=args, train_dataset=ds, sam="asam", sam_rho=0.5)

    One optimizer step over an accumulation window of micro-batches ``b_1 .. b_k``
    (``gradient_accumulation_steps``): ``begin_step()`` (R-SAM's noise) before ``b_1``; the
    Trainer's own forward + backward of ``b_1 .. b_{k-1}``; at ``b_k`` its first pass (under DDP
    without all-reduce unless ``sync_first_pass=True``: m-sharpness), ``first_step`` (the ascent;
    under ``fp16`` the GradScaler's scale is divided out in the kernels), then the second pass over
    ``b_1 .. b_k`` at ``w + e`` (the Trainer's ``training_step`` again: same loss scaling, autocast
    and DDP all-reduce once at the end; BatchNorm statistics from the first pass). The Trainer then
    clips the second gradients (``max_grad_norm``, the ones the base optimizer applies) and calls
    ``optimizer.step()``: restore and base step, skipped on the device if either pass overflowed
    (``fp16``; the scaler backs off). The logged loss is the first pass's. Checkpoints hold the
    base optimizer's state (and R-SAM / ESAM seeds and step counts), so ``train(resume_from_checkpoint=...)``
    continues as if never interrupted. ESAM runs with ``gamma=1`` (data selection needs
    per-sample losses, which ``compute_loss`` does not give).

    Args:
        sam: which method to build when ``optimizers=(None, ...)``: ``"sam"``, ``"asam"``,
            ``"esam"``, ``"rsam"``, ``"gsam"`` (the default ``"default"`` means ``"sam"``, or
            nothing when ``optimizers`` gives one), an optimizer class of
            :mod:`saf_kernels.optim`, or None for no two-pass optimizer (a plain Trainer, e.g.
            with ``mesa`` alone). Built around the class and arguments ``args.optim`` gives
            (``adamw_torch``: ``torch.optim.AdamW`` with ``args.learning_rate``, betas, eps), with
            the Trainer's parameter groups (no weight decay on biases and norms). Must be left
            unset when ``optimizers`` holds an optimizer.
        sam_rho: the radius (default: the class's own, e.g. SAM 0.05, ASAM 0.5).
        sam_kwargs: more keyword arguments for the class (``adaptive``, ``alpha``,
            ``rho_scheduler``, ``fused_step``, ...).
        mesa: a :class:`saf_kernels.MESA` of the model: the loss becomes cross-entropy plus
            ``lam * T^2 * KL(teacher || model)`` on the logits (``outputs.logits``; causal LMs
            shifted by one token as the Trainer does; labels ``-100`` ignored), from
            ``mesa.start_epoch`` (0-based, ``int(state.epoch)``); the teacher's EMA is updated
            after every optimizer step and saved in checkpoints (:data:`MESA_NAME`). Evaluation
            losses stay the model's own.
        Everything else: as ``transformers.Trainer``.
    """

    def __init__(self, *args, sam: str | type | None = "default", sam_rho: float | None = None,
                 sam_kwargs: dict[str, Any] | None = None, mesa: MESA | None = None, **kwargs):
        fn = "SharpnessAwareTrainer"
        if mesa is not None and not isinstance(mesa, MESA):
            raise TypeError(f"{fn}: mesa must be a saf_kernels.MESA, got {type(mesa).__name__}")
        if sam_rho is not None:
            _checks.number(sam_rho, "sam_rho", fn, lo=0)
        if sam_kwargs is not None and not isinstance(sam_kwargs, dict):
            raise TypeError(f"{fn}: sam_kwargs must be a dict or None, got {type(sam_kwargs).__name__}")
        if isinstance(sam, str) and sam != "default" and sam not in SAM_METHODS:
            raise ValueError(f"{fn}: sam must be one of {sorted(SAM_METHODS)}, an optimizer class of "
                             f"saf_kernels.optim or None, got {sam!r}")
        super().__init__(*args, **kwargs)
        given = self.optimizer
        if given is not None:
            if sam != "default" or sam_rho is not None or sam_kwargs:
                raise ValueError("SharpnessAwareTrainer: sam, sam_rho and sam_kwargs build the optimizer; leave them "
                                 "unset when optimizers=(optimizer, scheduler) gives one")
            sam = None
        elif sam == "default":
            sam = "sam"
        if isinstance(sam, str):  # a known name: checked above
            sam = SAM_METHODS[sam]
        if sam is not None and not (isinstance(sam, type) and issubclass(sam, TwoPassOptimizer)):
            raise TypeError(f"SharpnessAwareTrainer: sam must name a method or be a saf_kernels.optim class, got "
                            f"{sam!r}")
        self.sam_class = sam
        self.sam_rho = sam_rho
        self.sam_kwargs = dict(sam_kwargs or {})
        if sam is optim.ESAM:
            self.sam_kwargs.setdefault("gamma", 1.0)
        if given is not None:
            inner = two_pass_optimizer(given)
            if inner is not None:
                check_drivable(inner, "SharpnessAwareTrainer")
        self.mesa = mesa
        if mesa is not None:
            self.loss_is_scaled_for_ga = False  # compute_loss gives the micro-batch's mean
            self.add_callback(_MESAUpdate(self))
        self._window: list[tuple[dict, Any]] = []

    # ---------------------------------------------------------------------------------------
    # The optimizer
    # ---------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """The two-pass optimizer around the class ``args.optim`` names (see the class docstring)."""
        if self.optimizer is not None or self.sam_class is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        base_cls, base_kwargs = (self.optimizer_cls_and_kwargs if self.optimizer_cls_and_kwargs is not None
                                 else self.get_optimizer_cls_and_kwargs(self.args, opt_model))
        base_kwargs = dict(base_kwargs)
        if (not (isinstance(base_cls, type) and issubclass(base_cls, torch.optim.Optimizer))
                or {"params", "model", "optimizer_dict"} & base_kwargs.keys()):
            raise ValueError(f"SharpnessAwareTrainer: args.optim={self.args.optim!r} does not give a "
                             "torch.optim.Optimizer class to wrap; use e.g. adamw_torch or sgd, or pass optimizers=")
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        extra = dict(self.sam_kwargs)
        if self.sam_rho is not None:
            extra["rho"] = self.sam_rho
        self.optimizer = self.sam_class([g for g in groups if g["params"]], base_cls, **extra, **base_kwargs)
        check_drivable(self.optimizer, "SharpnessAwareTrainer")
        return self.optimizer

    # ---------------------------------------------------------------------------------------
    # The step
    # ---------------------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        self._window = []  # nothing left over from an interrupted run
        return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step for one micro-batch; at the last one of an accumulation window also
        the ascent and the second pass over the whole window (see the class docstring)."""
        opt = two_pass_optimizer(self.optimizer)
        if opt is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if not self._window:
            opt.begin_step()
        self._window.append((dict(inputs), num_items_in_batch))
        if not self.accelerator.sync_gradients:
            return super().training_step(model, inputs, num_items_in_batch)
        window, self._window = self._window, []
        return two_pass_step(
            opt,
            model,
            lambda: super(SharpnessAwareTrainer, self).training_step(model, inputs, num_items_in_batch),
            [lambda mb=mb, n=n: super(SharpnessAwareTrainer, self).training_step(model, mb, n) for mb, n in window],
            grad_scaler=self.accelerator.scaler,
            no_sync=lambda m: self.accelerator.no_sync(m),
        )

    # ---------------------------------------------------------------------------------------
    # MESA
    # ---------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """With ``mesa``: the fused cross-entropy + trajectory loss against the EMA teacher's
        logits (training only); otherwise the Trainer's loss."""
        if self.mesa is None or not model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        features = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**features)
        logits = _logits(outputs)
        epoch = int(self.state.epoch or 0)
        teacher = None
        if epoch >= self.mesa.start_epoch:
            with torch.no_grad(), teacher_autocast(self.mesa, logits.device):
                teacher = _logits(self.mesa.teacher(**features))
        if self._is_causal_lm(model):  # predict token t + 1 from t, as the Trainer's label smoother
            logits, labels = logits[..., :-1, :], labels[..., 1:]
            teacher = None if teacher is None else teacher[..., :-1, :]
        C = logits.shape[-1]
        # Class indices [..] -> [N]; probability targets [.., C] (mixup / cutmix) -> [N, C], as they come.
        labels = labels.reshape(-1) if labels.dim() == logits.dim() - 1 else labels.reshape(-1, C)
        loss = self.mesa(logits.reshape(-1, C), labels, None, epoch,
                         teacher_logits=None if teacher is None else teacher.reshape(-1, C))
        return (loss, outputs) if return_outputs else loss

    def _is_causal_lm(self, model) -> bool:
        return self.accelerator.unwrap_model(model)._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()

    # ---------------------------------------------------------------------------------------
    # Checkpoints: MESA's teacher beside the optimizer's state
    # ---------------------------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.mesa is not None and self.args.should_save:
            torch.save(self.mesa.state_dict(), os.path.join(output_dir, MESA_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.mesa is not None and checkpoint is not None:
            path = os.path.join(checkpoint, MESA_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"SharpnessAwareTrainer: the checkpoint {checkpoint} has no {MESA_NAME} "
                                        "(MESA's teacher); it was not saved by a trainer with mesa=")
            self.mesa.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def _logits(outputs) -> torch.Tensor:
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError("SharpnessAwareTrainer(mesa=...): the model's output has no `logits`")
    return logits

