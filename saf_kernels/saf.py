"""SAF and MESA as drop-in training components.

- :class:`TrajectoryBank`: every sample's logits from ``delay`` epochs ago, kept by global sample
  id on the GPU (or in pinned host memory), read, scored and overwritten by one fused kernel per
  step, with no host synchronisation, and kept identical on every rank under DDP.
- :class:`SAF`: ``loss = saf(logits, targets, sample_ids, epoch)``: cross-entropy plus, from
  ``start_epoch`` on, ``lam * T^2 * KL(softmax(past/T) || softmax(logits/T))`` against the bank.
- :class:`MESA`: the same loss against an EMA teacher of the model (``mesa.update()`` after each
  optimizer step is one fused multi-tensor op).
- :class:`IndexedDataset`: a dataset wrapper that yields each item's index, the sample id SAF needs.

Algorithm and the official code's behaviour: ``shared/reference/algorithms.md`` section 1. Where
this implementation deliberately differs from the official code:

- Epochs are 0-based and the trajectory term applies from ``epoch >= start_epoch``. The official
  code tests ``epoch > kl_start_epoch``, so its first epoch with the term is ``kl_start_epoch + 1``;
  pass ``start_epoch=kl_start_epoch + 1`` to reproduce it exactly.
- A sample without an entry from exactly ``delay`` epochs ago (not seen then, warm-up, a skipped
  epoch) contributes no trajectory term, and the term averages over the rows that have one. The
  official code reads zeros (a uniform target) for such samples, and under DDP for most samples,
  since its bank is per process.
- Stable log-softmax (the official ``softmax().log()`` gives ``inf`` on underflow).
- ``delay`` slots per sample instead of ``delay + 1``: a sample's past row is read and its slot
  overwritten in the same kernel.
"""

from __future__ import annotations

import copy
import numbers

import torch

from .ops import _multi_tensor as mt
from .ops import ema as _ema
from .ops import trajectory_bank as _tb
from .ops.trajectory_loss import saf_loss as _saf_loss

__all__ = ["MESA", "SAF", "IndexedDataset", "TopKTrajectoryBank", "TrajectoryBank"]

_ERR_OUT_OF_RANGE, _ERR_DUPLICATE = 1, 2
_INT64_MIN = -(2**63)


def _check_int(name: str, value, lo: int, fn: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {value!r}")
    return int(value)


def _check_bank_dtype(dtype, fn: str) -> torch.dtype:
    if dtype not in _tb.BANK_DTYPES:
        raise TypeError(f"{fn}: dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
    return dtype


def _synchronize(device: torch.device) -> None:
    """Wait for all work on ``device`` (every stream), if it is a CUDA device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_ignore_index(value, fn: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: ignore_index must be an int, got {value!r}")
    return int(value)


class TrajectoryBank:
    """Per-sample logits of past epochs, by global sample id, for SAF.

    Storage: ``values [num_samples, delay, num_classes]`` in ``dtype`` and ``epochs
    [num_samples, delay]`` int32 tags (-1: empty), plus ``claims [num_samples]`` int32 (duplicate
    detection on the GPU) and a 64-byte ``state`` (error flags). At epoch ``e`` sample ``x`` uses
    slot ``e % delay``, which holds the row written at epoch ``e - delay`` iff its tag is
    ``e - delay``; :meth:`step` reads it, then overwrites it with the current logits and tag ``e``.

    Memory: ``num_samples * (delay * (num_classes * itemsize + 4) + 4)`` bytes (:attr:`nbytes`).
    CIFAR-100 (50,000 x 100 classes, delay 3): 30.6 MB in bfloat16, 60.6 MB in float32. ImageNet
    (1,281,167 x 1000, delay 3): 7.70 GB in bfloat16, 15.39 GB in float32 (the official code keeps
    ``delay + 1`` float32 slots: 20.5 GB, hard-coded to 15M x 4 x 1000 = 240 GB of host RAM).

    Where it lives: on the logits' device by default (allocated at the first step if ``device``
    is None). With ``pin_memory=True`` values and tags live in pinned host memory and the CUDA
    kernels reach them over PCIe (unified virtual addressing), with the same API. Cost of that,
    *by arithmetic, not measured*: a step moves ``2 * B * C * itemsize`` bytes (the past rows in,
    the current rows out) plus ``8 * B`` bytes of tags. ImageNet-style B=256, C=1000, bfloat16: 1 MB
    per step, ~40 us at the ~25 GB/s a PCIe 4.0 x16 link sustains (~20 us on PCIe 5.0) against
    ~0.3 us from HBM at 3 TB/s. That is 0.04% of a ~100 ms ResNet-50 step, so the crossover is
    memory, not time: keep the bank on the GPU while it fits beside the model and activations, and
    move it to pinned memory when it does not (ImageNet in float32 on a 40 GB GPU). Pinned memory
    only pays off in time when ``2 * B * C * itemsize / BW_pcie`` nears 1% of the step, i.e. steps
    under ~4 ms for that batch (a ResNet-18 on CIFAR, whose bank is 31 MB and belongs on the GPU).
    The pinned path runs on the CUDA kernels; it has not been run on a GPU in CI.

    Bad sample ids: on the CPU (and the ``torch`` backend) an id outside ``[0, num_samples)`` raises
    ``IndexError`` and an id twice in one batch raises ``ValueError``, before the bank is touched.
    The CUDA and Triton kernels cannot raise without a host synchronisation: they skip those rows
    (no past row read, nothing recorded; the cross-entropy still counts) and set a flag on the
    device that :meth:`check_errors` turns into the same exceptions. The bank checks it where a
    synchronisation is cheap: at the first step of each new epoch and in :meth:`state_dict`; with
    ``check_every_step=True`` after every step (one host sync per step).

    An id seen twice in one *epoch* (in different batches) is not an error: the second time finds
    its slot already tagged with the current epoch, so it has no trajectory term, and its logits
    replace the first ones (``DistributedSampler`` pads an epoch with a few repeats).

    Distributed (``torch.distributed`` initialised, world size > 1, ``process_group="auto"``): each
    rank keeps a full replica. After the fused step (which then does not record), the ranks
    all-gather the batch's rows in the bank dtype with their ids (one collective of
    ``B * (C * itemsize + 8)`` bytes per rank) and every rank records all of them, so the replicas
    stay identical and a sample's past row is found whichever rank sees it next. Cost per step and
    rank: ``(world - 1) * B * (C * itemsize + 8)`` bytes received; ImageNet ResNet-50 on 8 ranks
    (B=256, C=1000, bf16): 3.6 MB, against ~180 MB for DDP's gradient all-reduce (2%). Memory: a full
    replica per rank (a sharded bank would need an all-to-all with data-dependent sizes, i.e. a
    host sync, every step). Every rank must call :meth:`step` with the same batch size, as
    ``DistributedSampler`` arranges. Ids held by two ranks in the same step are recorded by none.

    Args:
        num_samples: N, the number of distinct sample ids (the dataset's length).
        num_classes: C.
        delay: E~, how many epochs back the target is (paper: 3). Also the number of slots.
        dtype: storage dtype: ``torch.bfloat16`` (default), ``torch.float16`` or ``torch.float32``.
        device: where the bank lives; None: the logits' device at the first step.
        pin_memory: keep values and tags in pinned host memory (for CUDA logits).
        process_group: ``"auto"`` (the default group when torch.distributed is initialised with
            more than one rank), a process group, or None (never synchronise).
        check_every_step: raise bad-id errors after every step (a host sync per step).
        backend: ``"auto" | "cuda" | "triton" | "cpu" | "torch"``.
    """

    def __init__(self, num_samples: int, num_classes: int, delay: int = 3, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, pin_memory: bool = False, process_group="auto",
                 check_every_step: bool = False, backend: str = "auto"):
        fn = "saf_kernels.TrajectoryBank"
        self.num_samples = _check_int("num_samples", num_samples, 1, fn)
        self.num_classes = _check_int("num_classes", num_classes, 1, fn)
        self.delay = _check_int("delay", delay, 1, fn)
        self.dtype = _check_bank_dtype(dtype, fn)
        self.pin_memory = bool(pin_memory)
        self.process_group = process_group
        self.check_every_step = bool(check_every_step)
        self.backend = backend
        self.values: torch.Tensor | None = None
        self.epochs: torch.Tensor | None = None
        self._claims: torch.Tensor | None = None
        self._state: torch.Tensor | None = None
        self._last_epoch: int | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_counts: torch.Tensor | None = None
        if device is not None:
            self._allocate(torch.device(device))

    # ---------------------------------------------------------------------------------------
    # Storage
    # ---------------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes the bank holds: ``N * (delay * (C * itemsize + 4) + 4)`` (+ 64 bytes of state)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_samples * (self.delay * (self.num_classes * itemsize + 4) + 4) + 8 * _tb.STATE_SIZE

    @property
    def device(self) -> torch.device | None:
        """The device of the logits this bank serves (None until allocated)."""
        return None if self._state is None else self._state.device

    def _allocate(self, device: torch.device) -> None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        host = self.pin_memory
        if host and device.type != "cuda":
            raise ValueError(f"saf_kernels.TrajectoryBank: pin_memory=True serves CUDA logits, not {device}")
        where = dict(device="cpu", pin_memory=True) if host else dict(device=device)
        N, S, C = self.num_samples, self.delay, self.num_classes
        self.values = torch.zeros((N, S, C), dtype=self.dtype, **where)
        self.epochs = torch.full((N, S), -1, dtype=torch.int32, **where)
        self._claims = torch.zeros(N, dtype=torch.int32, device=device)
        self._state = self._fresh_state(device)

    @staticmethod
    def _fresh_state(device) -> torch.Tensor:
        state = torch.zeros(_tb.STATE_SIZE, dtype=torch.int64, device=device)
        state[1] = state[2] = _INT64_MIN
        state[3] = -1
        return state

    def _ensure(self, device: torch.device) -> None:
        if self._state is None:
            self._allocate(device)
            if self._pending is not None:  # a checkpoint loaded before the device was known
                values, epochs = self._pending
                self.values.copy_(values)
                self.epochs.copy_(epochs)
                self._pending = None
        elif self._state.device != device:
            raise ValueError(f"saf_kernels.TrajectoryBank: the bank serves logits on {self._state.device}, got logits "
                             f"on {device}; move it with bank.to({str(device)!r})")

    def to(self, device: torch.device | str) -> TrajectoryBank:
        """Move the bank to serve logits on ``device`` (values stay pinned on the host if pinned)."""
        device = torch.device(device)
        if self._state is None:
            self._allocate(device)
            return self
        if not self.pin_memory:
            self.values = self.values.to(device)
            self.epochs = self.epochs.to(device)
        self._claims = self._claims.to(device)
        self._state = self._state.to(device)
        return self

    def _wait_for_device(self) -> None:
        """Before the host writes a pinned bank: wait for the device work still reading or writing
        it (the steps' kernels reach pinned memory over PCIe, on whatever stream they ran). One
        host sync; only reset and load_state_dict need it, never the step."""
        if self.pin_memory and self._state is not None:
            _synchronize(self._state.device)

    def reset(self) -> None:
        """Forget every entry (all tags empty) and clear the error flags."""
        if self._state is None:
            return
        self._wait_for_device()
        self.epochs.fill_(-1)
        self.values.zero_()
        self._claims.zero_()
        self._state.copy_(self._fresh_state(self._state.device))
        self._last_epoch = None

    @property
    def _tensors(self):
        return self.values, self.epochs, self._claims, self._state

    # ---------------------------------------------------------------------------------------
    # The step
    # ---------------------------------------------------------------------------------------

    def _group(self):
        if self.process_group is None:
            return None
        import torch.distributed as dist

        if self.process_group == "auto":
            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
                return None
            return dist.group.WORLD
        return self.process_group if dist.get_world_size(self.process_group) > 1 else None

    def step(self, logits: torch.Tensor, targets: torch.Tensor | None, sample_ids: torch.Tensor, epoch: int,
             lam: float = 0.3, temperature: float = 5.0, label_smoothing: float = 0.0, ignore_index: int = -100,
             use_past: bool = True) -> torch.Tensor:
        """The fused step: ``CE + lam * T^2 * KL(past || logits)`` and its gradient, then record.

        ``targets``: class indices ``[B]``, probability targets ``[B, C]`` (mixup / cutmix, label
        smoothing folded in), or None (no CE term). ``loss = sum(CE) / n + lam * T^2 * sum(KL) / m``:
        n rows that count for the CE (labels not ``ignore_index``; every row with probability
        targets or without targets), m of them with an entry from exactly ``delay`` epochs ago
        (none if ``use_past`` is False). The counts ``[n, m]`` stay on the device in
        :attr:`last_counts`. The current logits are recorded in every case.

        Returns the scalar loss in ``logits.dtype``; ``backward()`` reaches ``logits`` only.
        """
        self._ensure(logits.device)
        if self._last_epoch is not None and epoch != self._last_epoch:
            self.check_errors()  # one host sync per epoch
        self._last_epoch = epoch
        group = self._group()
        loss, counts = _tb.trajectory_bank_step(
            logits, targets, sample_ids, *self._tensors, epoch, lam, temperature, label_smoothing, ignore_index,
            use_past, record=group is None, backend=self.backend,
        )
        if group is not None:
            self._gather_and_record(logits, sample_ids, epoch, group)
        self.last_counts = counts
        if self.check_every_step:
            self.check_errors()
        return loss

    @property
    def num_with_target(self) -> torch.Tensor | None:
        """Rows of the last step that had a past entry (m), as a device tensor (no sync)."""
        return None if self.last_counts is None else self.last_counts[1]

    def record(self, rows: torch.Tensor, sample_ids: torch.Tensor, epoch: int) -> None:
        """Write ``rows`` into the samples' slots for ``epoch`` without computing a loss."""
        self._ensure(rows.device)
        _tb.trajectory_bank_record(rows, sample_ids, *self._tensors, epoch, backend=self.backend)

    def _gather_and_record(self, logits: torch.Tensor, ids: torch.Tensor, epoch: int, group) -> None:
        import torch.distributed as dist

        world = dist.get_world_size(group)
        B, C = logits.shape
        rows = logits.detach().to(self.dtype).contiguous()
        width = C * rows.element_size()
        # One collective: the rows' bytes and the ids side by side (no arithmetic happens on them, so
        # bfloat16 travels as bytes even on backends without bfloat16 support).
        payload = torch.empty((B, width + 8), dtype=torch.uint8, device=logits.device)
        payload[:, :width].copy_(rows.view(torch.uint8))
        payload[:, width:].copy_(ids.to(torch.int64).reshape(B, 1).view(torch.uint8))
        gathered = torch.empty((world * B, width + 8), dtype=torch.uint8, device=logits.device)
        # all_gather_single is the name from torch 2.13 on (the old one warns there).
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(gathered, payload, group=group)
        all_rows = gathered[:, :width].contiguous().view(self.dtype)
        all_ids = gathered[:, width:].contiguous().view(torch.int64).reshape(-1)
        _tb.trajectory_bank_record(all_rows, all_ids, *self._tensors, epoch, backend=self.backend)

    # ---------------------------------------------------------------------------------------
    # Errors and checkpoints
    # ---------------------------------------------------------------------------------------

    def check_errors(self) -> None:
        """Raise the error a GPU step flagged (and clear it): ``IndexError`` for an id out of range,
        ``ValueError`` for an id twice in a batch. A host synchronisation; cheap."""
        if self._state is None:
            return
        flags, bad, dup, epoch = self._state[:4].tolist()
        if not flags:
            return
        self._state.copy_(self._fresh_state(self._state.device))
        where = f" in a step of epoch {epoch}" if epoch >= 0 else ""
        if flags & _ERR_OUT_OF_RANGE:
            raise IndexError(f"saf_kernels.TrajectoryBank: sample id {bad} is outside the bank's range "
                             f"[0, {self.num_samples}){where} (the largest bad id seen); those rows were neither "
                             "read nor recorded")
        raise ValueError(f"saf_kernels.TrajectoryBank: sample id {dup} appeared twice in one batch{where} (the largest "
                         "such id); those rows were neither read nor recorded")

    def state_dict(self) -> dict:
        """Values, tags and shape; :meth:`load_state_dict` of it resumes exactly. Checks errors first."""
        self.check_errors()
        if self._pending is not None:
            values, epochs = self._pending
            return {"num_samples": self.num_samples, "num_classes": self.num_classes, "delay": self.delay,
                    "dtype": str(self.dtype).replace("torch.", ""), "values": values, "epochs": epochs}
        return {
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "delay": self.delay,
            "dtype": str(self.dtype).replace("torch.", ""),
            "values": self.values,
            "epochs": self.epochs,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict` of a bank of the same shape and dtype (onto this bank's device)."""
        fn = "saf_kernels.TrajectoryBank.load_state_dict"
        for key in ("num_samples", "num_classes", "delay", "dtype"):
            mine = getattr(self, key) if key != "dtype" else str(self.dtype).replace("torch.", "")
            if state_dict.get(key) != mine:
                raise ValueError(f"{fn}: {key} is {state_dict.get(key)!r} in the checkpoint but {mine!r} here")
        if state_dict.get("values") is None:  # saved before the first step
            self.reset()
            self._pending = None
            return
        N, S, C = self.num_samples, self.delay, self.num_classes
        if tuple(state_dict["values"].shape) != (N, S, C) or tuple(state_dict["epochs"].shape) != (N, S):
            raise ValueError(f"{fn}: the checkpoint's tensors have shapes {tuple(state_dict['values'].shape)} and "
                             f"{tuple(state_dict['epochs'].shape)}, expected ({N}, {S}, {C}) and ({N}, {S})")
        self._last_epoch = None
        if self._state is None:
            # No device yet: the bank is allocated on the logits' device at the first step, where
            # the checkpoint is copied in (wherever torch.load mapped it).
            self._pending = (state_dict["values"], state_dict["epochs"])
            return
        self._wait_for_device()
        self.values.copy_(state_dict["values"])
        self.epochs.copy_(state_dict["epochs"])
        self._claims.zero_()
        self._state.copy_(self._fresh_state(self._state.device))
        self._last_epoch = None

    def __repr__(self) -> str:
        where = "pinned host" if self.pin_memory else (str(self.device) if self.device else "unallocated")
        return (f"TrajectoryBank(num_samples={self.num_samples}, num_classes={self.num_classes}, delay={self.delay}, "
                f"dtype={self.dtype}, {where}, {self.nbytes / 2**20:.1f} MiB)")


class SAF:
    """Sharpness-Aware training for Free: ``loss = saf(logits, targets, sample_ids, epoch)``.

    ``CE(logits, targets) + lam * T^2 * KL(softmax(past / T) || softmax(logits / T))``, where
    ``past`` are the sample's logits recorded ``delay`` epochs earlier (:class:`TrajectoryBank`).
    Logits are recorded every epoch; the trajectory term applies from ``epoch >= start_epoch``
    (0-based epochs; the official code's ``epoch > kl_start_epoch`` starts one epoch later). Samples
    without an entry from exactly ``delay`` epochs ago get no trajectory term, and the term averages
    over the rows that have one (``saf.num_with_target``, a device tensor). One fused kernel per step,
    no host synchronisation; ``loss.backward()`` costs one scale of the gradient the forward wrote.

    Defaults are the paper's (Du et al., NeurIPS 2022, sec. 4.1): ``lam=0.3``, ``T=5``, ``delay=3``,
    ``start_epoch=5``. The sample ids are the dataset indices (:class:`IndexedDataset`).

    Example::

        saf = SAF(len(train_set), num_classes=100)
        loader = DataLoader(IndexedDataset(train_set), batch_size=128, shuffle=True)
        for epoch in range(epochs):
            for x, y, idx in loader:
                loss = saf(model(x), y, idx, epoch)
                opt.zero_grad(); loss.backward(); opt.step()

    Args:
        num_samples, num_classes, delay, dtype, device, pin_memory, process_group, check_every_step,
            backend: as :class:`TrajectoryBank`.
        lam: weight of the trajectory term (paper 0.3; the official SAF script's default is 0.16).
        temperature: T (paper 5).
        start_epoch: first (0-based) epoch with the trajectory term.
        label_smoothing, ignore_index: for the cross-entropy term only (as the official code).
    """

    def __init__(self, num_samples: int, num_classes: int, lam: float = 0.3, temperature: float = 5.0, delay: int = 3,
                 start_epoch: int = 5, label_smoothing: float = 0.0, ignore_index: int = -100,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 pin_memory: bool = False, process_group="auto", check_every_step: bool = False, backend: str = "auto"):
        fn = "saf_kernels.SAF"
        self.lam = _tb._check_real("lam", lam, fn)
        self.temperature = _tb._check_real("temperature", temperature, fn, positive=True)
        self.start_epoch = _check_int("start_epoch", start_epoch, 0, fn)
        self.label_smoothing = _tb._check_real("label_smoothing", label_smoothing, fn, lo=0.0, hi=1.0)
        self.ignore_index = _check_ignore_index(ignore_index, fn)
        self.bank = TrajectoryBank(num_samples, num_classes, delay, dtype, device, pin_memory, process_group,
                                   check_every_step, backend)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor | None, sample_ids: torch.Tensor,
                 epoch: int) -> torch.Tensor:
        """The loss for this batch. ``targets``: class indices ``[B]``, or probability targets
        ``[B, C]`` (mixup / cutmix with any label smoothing folded in; then ``label_smoothing``
        must be 0), or None (the trajectory term only). Records ``logits`` for ``epoch + delay``."""
        return self.bank.step(logits, targets, sample_ids, epoch, self.lam, self.temperature, self.label_smoothing,
                              self.ignore_index, use_past=epoch >= self.start_epoch)

    @property
    def num_with_target(self) -> torch.Tensor | None:
        """How many rows of the last batch had a trajectory target (a device tensor; no sync)."""
        return self.bank.num_with_target

    def state_dict(self) -> dict:
        """The bank's state (:meth:`TrajectoryBank.state_dict`); save it with the model's."""
        return {"bank": self.bank.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from :meth:`state_dict`: later losses equal those of an uninterrupted run."""
        self.bank.load_state_dict(state_dict["bank"])


def _kind(t: torch.Tensor) -> str:
    return "a DTensor" if mt.is_dtensor(t) else "a plain tensor"


def _fsdp2_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds FSDP2 (``fully_shard``) parameters: DTensors."""
    return any(mt.is_dtensor(p) for p in model.parameters())


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DistributedDataParallel / DataParallel keep the model in .module; torch.compile in ._orig_mod.
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


class MESA:
    """Memory-Efficient Sharpness-Aware training: the SAF loss against an EMA teacher.

    ``loss = mesa(logits, targets, inputs, epoch)`` is ``CE + lam * T^2 * KL(softmax(teacher(inputs)/T)
    || softmax(logits/T))`` from ``epoch >= start_epoch`` on (0-based), plain CE before (the teacher
    is not run then). Call :meth:`update` after every ``optimizer.step()``: ``teacher = decay *
    teacher + (1 - decay) * model`` over all parameters and floating buffers, one fused multi-tensor
    op (:func:`saf_kernels.ops.ema_update_`), no host sync; integer buffers (``num_batches_tracked``)
    are copied.

    The teacher is a deep copy of the model in ``eval()`` mode (its BatchNorm uses the averaged
    running statistics), never trained, run under ``no_grad``; as timm's ``ModelEmaV2`` in the
    official code. Create MESA after moving the model to its device (the copy lands there too);
    call :meth:`refresh` if the model's tensors are replaced later. Under DDP pass the wrapped or
    unwrapped model: the teacher copies the inner module and every rank keeps its own (identical
    parameters; BatchNorm statistics per rank, as the official code).

    Update order: the paper's Algorithm 1 forms ``v_t = beta v_{t-1} + (1 - beta) theta_t`` and then
    the loss with ``theta_t``; updating after the optimizer step, as here and in the official code,
    gives the teacher of step ``t + 1`` exactly that ``v_{t+1}`` (from ``theta_{t+1}``) before its
    loss. The two differ only at the first step, whose teacher is the initial model (the paper's
    would be ``beta theta_0 + (1 - beta) theta_0 = theta_0`` as well if ``v_{-1} = theta_0``).

    Defaults are the paper's: ``lam=0.8``, ``T=5``, ``decay=0.9998`` (timm's default, used by the
    official script), ``start_epoch=5``. Memory: one copy of the model's parameters and buffers.

    Cost: the teacher's forward is MESA's whole overhead (the loss is one fused kernel and the EMA
    one multi-tensor op); it is about a third of a training step on a GPU and half of one on a CPU.
    ``teacher_autocast=torch.bfloat16`` (or float16) runs it under autocast, as the official code
    does when training with AMP: faster, with the target rounded to that precision before it is
    softened by ``T``. The teacher's weights stay in the model's dtype.

    ``teacher``: a module of the model's architecture to use as the teacher instead of a deep copy
    (its weights are overwritten with the model's at construction; its dtype and device are kept
    as they are). Needed under FSDP2: a ``fully_shard``-ed model cannot be deep-copied, so build
    the same architecture again, ``fully_shard`` it exactly as the model (same submodules, same
    mesh) and pass it::

        model = shard(make_model())
        mesa = MESA(model, teacher=shard(make_model()))

    The teacher's parameters are then DTensors sharded like the model's: its memory is
    ``1/world`` of a replica per rank, :meth:`update` is one ``ema_update_`` on the local shards
    (no communication; buffers, which FSDP2 does not shard, in a second call), and its forward
    all-gathers its parameters as FSDP does (under ``no_grad``, resharded after use).
    """

    def __init__(self, model: torch.nn.Module, lam: float = 0.8, temperature: float = 5.0, decay: float = 0.9998,
                 start_epoch: int = 5, label_smoothing: float = 0.0, ignore_index: int = -100, backend: str = "auto",
                 teacher_autocast: torch.dtype | None = None, teacher: torch.nn.Module | None = None):
        fn = "saf_kernels.MESA"
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
        if teacher is not None and not isinstance(teacher, torch.nn.Module):
            raise TypeError(f"{fn}: teacher must be a torch.nn.Module or None, got {type(teacher).__name__}")
        self.lam = _tb._check_real("lam", lam, fn)
        self.temperature = _tb._check_real("temperature", temperature, fn, positive=True)
        self.decay = _tb._check_real("decay", decay, fn, lo=0.0, hi=1.0)
        self.start_epoch = _check_int("start_epoch", start_epoch, 0, fn)
        self.label_smoothing = _tb._check_real("label_smoothing", label_smoothing, fn, lo=0.0, hi=1.0)
        self.ignore_index = _check_ignore_index(ignore_index, fn)
        self.backend = backend
        if teacher_autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"{fn}: teacher_autocast must be None, torch.bfloat16 or torch.float16, got "
                             f"{teacher_autocast!r}")
        self.teacher_autocast = teacher_autocast
        self.model = _unwrap(model)
        if teacher is None:
            if _fsdp2_sharded(self.model):
                raise TypeError(f"{fn}: the model is sharded by FSDP2's fully_shard, which cannot be deep-copied; "
                                "build the same architecture, fully_shard it as the model and pass it as "
                                "MESA(model, teacher=...)")
            self.teacher = copy.deepcopy(self.model)
        else:
            self.teacher = _unwrap(teacher)
            if self.teacher is self.model:
                raise ValueError(f"{fn}: teacher is the model itself; pass a second module of the same architecture")
        self.teacher.eval().requires_grad_(False)
        self.refresh()
        if teacher is not None:
            self._copy_from_model()

    def refresh(self) -> None:
        """Re-pair the teacher's tensors with the model's (after the model's tensors were replaced)."""
        t_state = dict(self.teacher.named_parameters()) | dict(self.teacher.named_buffers())
        m_state = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        if t_state.keys() != m_state.keys():
            raise ValueError("saf_kernels.MESA: the model's parameters and buffers do not match the teacher's: "
                             f"{sorted(set(t_state) ^ set(m_state))[:5]}")
        # (teacher, model) lists of the floating tensors: one pair of lists, or under FSDP2 two
        # (the sharded parameters, and the buffers FSDP2 leaves unsharded).
        floats: dict[bool, tuple[list, list]] = {}
        self._int_dst, self._int_src = [], []
        for name, t in t_state.items():
            m = m_state[name]
            if t.shape != m.shape:
                raise ValueError(f"saf_kernels.MESA: the teacher's {name} has shape {list(t.shape)} but the model's "
                                 f"has {list(m.shape)}")
            if t.is_floating_point():
                if mt.is_dtensor(t) != mt.is_dtensor(m):
                    raise ValueError(f"saf_kernels.MESA: the teacher's {name} is {_kind(t)} but the model's is "
                                     f"{_kind(m)}: fully_shard the teacher exactly as the model")
                ema, src = floats.setdefault(mt.is_dtensor(t), ([], []))
                ema.append(t)
                src.append(m)  # the Parameter itself: it survives `.data` replacement
            else:
                self._int_dst.append(t)
                self._int_src.append(m)
        self._float_pairs = list(floats.values())

    @torch.no_grad()
    def _copy_from_model(self) -> None:
        """The teacher's tensors := the model's (local shards under FSDP2: no communication; the
        shardings are checked as ``ema_update_`` checks them)."""
        for ema, src in self._float_pairs:
            ema, src, _ = mt.local_shards("saf_kernels.MESA", teacher=ema, model=src)
            torch._foreach_copy_(ema, src)  # exact (0 * teacher + model would turn an inf into NaN)
        if self._int_dst:
            torch._foreach_copy_(self._int_dst, self._int_src)

    @torch.no_grad()
    def update(self) -> None:
        """``teacher = decay * teacher + (1 - decay) * model`` (call after each optimizer step)."""
        for ema, src in self._float_pairs:
            _ema.ema_update_(ema, src, self.decay, backend=self.backend)
        if self._int_dst:
            torch._foreach_copy_(self._int_dst, self._int_src)

    @torch.no_grad()
    def teacher_logits(self, inputs) -> torch.Tensor:
        """The teacher's output for ``inputs`` (a tensor, or a tuple of positional arguments)."""
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        if self.teacher_autocast is None:
            return self.teacher(*args)
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        with torch.autocast(device.type, dtype=self.teacher_autocast):
            return self.teacher(*args)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, inputs=None, epoch: int = 0,
                 teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        """The loss for this batch. ``targets``: class indices ``[B]`` or probability targets
        ``[B, C]`` (mixup / cutmix with any label smoothing folded in; ``label_smoothing`` must then
        be 0). Give the model's ``inputs`` (the teacher runs on them) or precomputed
        ``teacher_logits``; neither is needed before ``start_epoch``. ``epoch`` is 0-based."""
        epoch = _tb.check_epoch(epoch, "saf_kernels.MESA")
        if epoch < self.start_epoch:
            # Cross-entropy alone, through the same fused kernel (the target is not used at weight 0).
            return _saf_loss(logits, targets, logits.detach(), 0.0, self.temperature, self.label_smoothing,
                             self.ignore_index, backend=self.backend)
        if teacher_logits is None:
            if inputs is None:
                raise ValueError("saf_kernels.MESA: give the model's inputs or teacher_logits from start_epoch on")
            teacher_logits = self.teacher_logits(inputs)
        return _saf_loss(logits, targets, teacher_logits, self.lam, self.temperature, self.label_smoothing,
                         self.ignore_index, backend=self.backend)

    def state_dict(self) -> dict:
        """The teacher's parameters and buffers."""
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the teacher saved by :meth:`state_dict`."""
        self.teacher.load_state_dict(state_dict["teacher"])


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose items also carry their index: ``(*item, index)`` (or
    ``(item, index)`` for a non-tuple item). The index is the sample id :class:`SAF` needs; the
    default collate function turns it into an int64 tensor."""

    def __init__(self, dataset):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"saf_kernels.IndexedDataset: needs a map-style dataset (__getitem__ and __len__), got "
                            f"{type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        """``(*self.dataset[index], index)``."""
        item = self.dataset[index]
        return (*item, index) if isinstance(item, tuple) else (item, index)



class TopKTrajectoryBank:
    """SAF's trajectory bank for token-level outputs (language models): per sample, the top-``k``
    logits of each of its ``tokens`` positions and their log-normaliser, from ``delay`` epochs ago.

    Storage: ``idx [N, delay, tokens, k]`` int32 (class ids; int64 on :meth:`lookup`), ``logit``
    in ``dtype`` (bfloat16 by default), ``lse [N, delay, tokens]`` float32 and ``epochs
    [N, delay]`` int32 tags (-1: empty). Memory (:attr:`nbytes`):
    ``N * delay * (tokens * (k * (4 + itemsize) + 4) + 4)`` bytes, against ``N * delay * tokens * V
    * itemsize`` for dense logits: with k = 32 and bfloat16, 196 bytes per token instead of 64,000 at
    V = 32,000 (326x less) or 256,512 at V = 128,256.

    Semantics as :class:`TrajectoryBank`: at epoch ``e`` a sample reads slot ``e % delay``, valid iff
    it was written at epoch ``e - delay``; :meth:`record` then overwrites that slot with tag ``e``.
    Feed :meth:`lookup`'s tuple to :func:`saf_kernels.fused_linear_trajectory_loss` as
    ``target_topk``: rows without a valid record get no KL there (they still count in the mean).
    No host synchronisation: every read and write is an index op on the bank's device. Ids must be
    in ``[0, num_samples)`` (an index error otherwise) and not repeat within one :meth:`record`
    (which of the repeats is kept is then unspecified).
    """

    def __init__(self, num_samples: int, k: int = 32, tokens: int = 1, delay: int = 1,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
        fn = "saf_kernels.TopKTrajectoryBank"
        self.num_samples = _check_int("num_samples", num_samples, 1, fn)
        self.k = _check_int("k", k, 1, fn)
        self.tokens = _check_int("tokens", tokens, 1, fn)
        self.delay = _check_int("delay", delay, 1, fn)
        self.dtype = _check_bank_dtype(dtype, fn)
        N, S, T = self.num_samples, self.delay, self.tokens
        where = {"device": torch.device(device)}
        self.idx = torch.zeros((N, S, T, self.k), dtype=torch.int32, **where)
        self.logit = torch.zeros((N, S, T, self.k), dtype=dtype, **where)
        self.lse = torch.zeros((N, S, T), dtype=torch.float32, **where)
        self.epochs = torch.full((N, S), -1, dtype=torch.int32, **where)

    @property
    def nbytes(self) -> int:
        """``N * delay * (tokens * (k * (4 + itemsize) + 4) + 4)`` bytes."""
        itemsize = self.logit.element_size()
        return self.num_samples * self.delay * (self.tokens * (self.k * (4 + itemsize) + 4) + 4)

    @property
    def device(self) -> torch.device:
        return self.idx.device

    def to(self, device: torch.device | str) -> TopKTrajectoryBank:
        for name in ("idx", "logit", "lse", "epochs"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def _ids(self, sample_ids, epoch, fn):
        if not isinstance(sample_ids, torch.Tensor) or sample_ids.dtype not in (torch.int64, torch.int32) \
                or sample_ids.dim() != 1:
            got = (sample_ids.dtype, tuple(sample_ids.shape)) if isinstance(sample_ids, torch.Tensor) else sample_ids
            raise TypeError(f"{fn}: sample_ids must be a 1-D int64 or int32 tensor, got {got}")
        if sample_ids.device != self.device:
            raise ValueError(f"{fn}: sample_ids are on {sample_ids.device} but the bank is on {self.device}")
        _check_int("epoch", epoch, 0, fn)
        return sample_ids.long(), epoch % self.delay

    def _rows(self, logits, b, fn, name="logits"):
        want = (b, self.tokens) if self.tokens > 1 else (b,)
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() \
                or tuple(logits.shape[:-1]) not in (want, (b, self.tokens)) or logits.shape[-1] < self.k:
            raise ValueError(f"{fn}: {name} must be a float tensor [{', '.join(map(str, want))}, V] with V >= k="
                             f"{self.k}, got {logits if not isinstance(logits, torch.Tensor) else tuple(logits.shape)}")

    def record(self, sample_ids: torch.Tensor, logits: torch.Tensor, epoch: int) -> None:
        """Store ``torch.topk(logits, k)`` and ``logsumexp(logits)`` (float32) of each sample for
        ``epoch``. ``logits``: ``[B, V]`` (``tokens == 1``) or ``[B, tokens, V]``."""
        fn = "saf_kernels.TopKTrajectoryBank.record"
        ids, slot = self._ids(sample_ids, epoch, fn)
        self._rows(logits, ids.shape[0], fn)
        with torch.no_grad():
            z = logits.detach().reshape(ids.shape[0], self.tokens, -1)
            val, idx = z.topk(self.k, dim=-1)
            self._store(ids, slot, epoch, idx, val, torch.logsumexp(z.float(), dim=-1))

    def record_linear(self, sample_ids: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None = None, *, epoch: int, chunk_size: int | None = None) -> None:
        """As :meth:`record` for the logits ``hidden @ weight.T + bias`` (``hidden [B, tokens, H]``
        or ``[B, H]``), made ``chunk_size`` rows at a time (see
        :func:`saf_kernels.ops.fused_linear.auto_chunk_size`) so that the full logits never exist."""
        from .ops.fused_linear import auto_chunk_size

        fn = "saf_kernels.TopKTrajectoryBank.record_linear"
        ids, slot = self._ids(sample_ids, epoch, fn)
        if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor) or weight.dim() != 2 \
                or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"{fn}: hidden must be [B, (tokens,) H] and weight [V, H]")
        self._rows(hidden.new_empty(hidden.shape[:-1] + (weight.shape[0],), device="meta"), ids.shape[0], fn,
                   "hidden @ weight.T")
        with torch.no_grad():
            h = hidden.detach().reshape(-1, hidden.shape[-1])
            n = h.shape[0]
            step = chunk_size or auto_chunk_size(n, weight.shape[0], h.device)
            idx = torch.empty((n, self.k), dtype=torch.int64, device=h.device)
            val = torch.empty((n, self.k), dtype=torch.float32, device=h.device)
            lse = torch.empty(n, dtype=torch.float32, device=h.device)
            for s in range(0, n, step):
                z = torch.nn.functional.linear(h[s:s + step], weight.detach(), bias)
                val[s:s + step], idx[s:s + step] = z.topk(self.k, dim=-1)
                lse[s:s + step] = torch.logsumexp(z.float(), dim=-1)
            b = ids.shape[0]
            self._store(ids, slot, epoch, idx.view(b, self.tokens, -1), val.view(b, self.tokens, -1),
                        lse.view(b, self.tokens))

    def _store(self, ids, slot, epoch, idx, val, lse):
        self.idx[ids, slot] = idx.to(torch.int32)
        self.logit[ids, slot] = val.to(self.dtype)
        self.lse[ids, slot] = lse
        self.epochs[ids, slot] = epoch

    def lookup(self, sample_ids: torch.Tensor, epoch: int):
        """``(idx int64, logit, lse, valid)`` of the samples' records from epoch ``epoch - delay``,
        shaped ``[B, tokens, k]``, ``[B, tokens, k]``, ``[B, tokens]``, ``[B, tokens]`` (the
        ``tokens`` dim absent when ``tokens == 1``): the ``target_topk`` of
        :func:`saf_kernels.fused_linear_trajectory_loss`. ``valid`` is False where there is none."""
        ids, slot = self._ids(sample_ids, epoch, "saf_kernels.TopKTrajectoryBank.lookup")
        b = ids.shape[0]
        lead = (b, self.tokens) if self.tokens > 1 else (b,)
        tags = self.epochs[ids, slot]
        valid = ((tags == epoch - self.delay) & (tags >= 0))[:, None].expand(b, self.tokens)
        return (self.idx[ids, slot].long().reshape(*lead, self.k), self.logit[ids, slot].reshape(*lead, self.k),
                self.lse[ids, slot].reshape(lead), valid.reshape(lead))

    def state_dict(self) -> dict:
        return {"num_samples": self.num_samples, "k": self.k, "tokens": self.tokens, "delay": self.delay,
                "dtype": str(self.dtype).replace("torch.", ""), "idx": self.idx, "logit": self.logit,
                "lse": self.lse, "epochs": self.epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict` of a bank of the same configuration (onto this bank's device)."""
        fn = "saf_kernels.TopKTrajectoryBank.load_state_dict"
        for key in ("num_samples", "k", "tokens", "delay", "dtype"):
            mine = getattr(self, key) if key != "dtype" else str(self.dtype).replace("torch.", "")
            if state_dict.get(key) != mine:
                raise ValueError(f"{fn}: {key} is {state_dict.get(key)!r} in the checkpoint but {mine!r} here")
        for name in ("idx", "logit", "lse", "epochs"):
            getattr(self, name).copy_(state_dict[name])

    def __repr__(self) -> str:
        return (f"TopKTrajectoryBank(num_samples={self.num_samples}, k={self.k}, tokens={self.tokens}, "
                f"delay={self.delay}, dtype={self.dtype}, {self.device}, {self.nbytes / 2**20:.1f} MiB)")
