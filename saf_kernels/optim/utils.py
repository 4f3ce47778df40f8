"""Training-loop helpers for the two-pass optimizers: BatchNorm statistics from the first pass
only, and the DDP first pass with or without gradient synchronisation (m-sharpness).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from .. import _checks


def _running_stat_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that keep running statistics: every BatchNorm (incl. SyncBatchNorm) with
    ``track_running_stats``, and any module with ``running_mean`` / ``running_var`` buffers."""
    out = []
    for m in model.modules():
        rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
            out.append(m)
    return out


class _StatsSnapshot:
    """The running-statistics buffers of a model and a reusable copy of them."""

    def __init__(self, model: nn.Module):
        self.buffers: list[torch.Tensor] = []
        for m in _running_stat_modules(model):
            self.buffers += [m.running_mean, m.running_var]
            nbt = getattr(m, "num_batches_tracked", None)
            if isinstance(nbt, torch.Tensor):
                self.buffers.append(nbt)
        self.saved = [torch.empty_like(b) for b in self.buffers]

    def valid_for(self, model: nn.Module) -> bool:
        # Buffers can be replaced (model.to(), load_state_dict with assign=True): compare identities.
        current = []
        for m in _running_stat_modules(model):
            current += [m.running_mean, m.running_var]
            nbt = getattr(m, "num_batches_tracked", None)
            if isinstance(nbt, torch.Tensor):
                current.append(nbt)
        return len(current) == len(self.buffers) and all(a is b for a, b in zip(current, self.buffers))


_SNAPSHOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Inside the block, forward passes in training mode do not change the running statistics.

    For SAM's second (perturbed) forward, so that BatchNorm keeps the statistics of the first,
    clean pass only (google-research/sam's behaviour). Normalisation inside the block still uses
    batch statistics, as in any training forward.

    The running mean, running variance and ``num_batches_tracked`` of every BatchNorm are copied
    on entry and copied back on exit (two ``_foreach_copy_`` of a few KB). Unlike the usual
    ``momentum = 0`` trick this is right for ``momentum=None`` (cumulative moving average, which
    uses ``num_batches_tracked``), leaves ``num_batches_tracked`` alone, does not change module
    attributes (no ``torch.compile`` recompiles) and handles SyncBatchNorm.
    """
    _checks.module(model, "model", "frozen_bn_stats")
    snap = _SNAPSHOTS.get(model)
    if snap is None or not snap.valid_for(model):
        snap = _StatsSnapshot(model)
        _SNAPSHOTS[model] = snap
    if not snap.buffers:
        yield
        return
    with torch.no_grad():
        torch._foreach_copy_(snap.saved, snap.buffers)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(snap.buffers, snap.saved)


@contextlib.contextmanager
def no_grad_for(params) -> Iterator[None]:
    """Inside the block the given parameters have ``requires_grad=False`` (no gradient is
    computed for them); restored on exit, also on an error."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


@contextlib.contextmanager
def first_pass(model: nn.Module | None, sync: bool = False) -> Iterator[None]:
    """Context for SAM's first forward *and* backward under DistributedDataParallel.

    ``sync=False`` (default): inside ``model.no_sync()``, so each replica perturbs its weights
    with its own gradient -- the SAM paper's m-sharpness with m = the per-replica batch, which
    the paper found generalises better ("not syncing the perturbations"), and what
    google-research/sam does by default. Saves one all-reduce per step. ``sync=True``: gradients
    are averaged across replicas first, so every replica applies the same perturbation.

    The forward must be inside the block too: DDP decides at forward time whether the backward
    all-reduces. For a model that is not DDP this does nothing.
    """
    _checks.module(model, "model", "first_pass", optional=True)
    _checks.flag(sync, "sync", "first_pass")
    if model is not None and not sync and hasattr(model, "no_sync") and is_ddp(model):
        with model.no_sync():
            yield
    else:
        yield
