"""One training step of each method against plain SGD, same model and batch, one run.

Default: a small CNN on MNIST-sized batches (128 x 1 x 28 x 28, 10 classes) on CPU; ResNet-18 on
CIFAR-sized batches (128 x 3 x 32 x 32, 100 classes) on GPU. Inputs are random (an embedded
default needs no download) and rotated between steps. A step is forward + loss + backward +
optimizer step (both passes for the SAM family, the EMA update for MESA). Methods are timed in
interleaved rounds (every method once per round), so that drift of the machine hits all alike;
the ratio is median step time over SGD's median step time, each sample a mean over ``PERIOD``
consecutive steps.

Each method's step comes from a builder ``build(ctx) -> step(i)`` registered in ``BUILDERS``
(or returning a string saying why it cannot run here).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .models import SmallCNN, resnet18
from .timing import interleaved, one_pass_step, synchronize

METHODS = ("sgd", "sam", "asam", "esam", "rsam", "gsam", "saf", "mesa", "msam", "looksam", "sam_every5")
TITLE = "Training step vs plain SGD ({model}, batch {batch}, {device}; ratio = median step / SGD median step, one run)"
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
# The longest period of a method here (LookSAM k = 5, SAM every = 5): a timed sample is that many
# steps, so that a method whose cost comes every k-th step is charged it in every sample (a shorter
# window's median would under-weight it).
PERIOD = 5


@dataclass
class StepContext:
    """What a step builder gets: a model factory (same initial weights each call), rotated batches."""

    device: torch.device
    model_fn: Callable[[], torch.nn.Module]
    inputs: list[torch.Tensor]
    labels: list[torch.Tensor]
    num_classes: int
    batch_size: int
    loss_fn: Callable = F.cross_entropy
    lr: float = LR
    momentum: float = MOMENTUM
    weight_decay: float = WEIGHT_DECAY
    extra: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Size of the notional dataset the rotated batches come from (sample ids 0..N-1)."""
        return len(self.inputs) * self.batch_size

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, labels, sample ids) of step i."""
        k = i % len(self.inputs)
        ids = torch.arange(k * self.batch_size, (k + 1) * self.batch_size, device=self.device)
        return self.inputs[k], self.labels[k], ids

    def sgd(self, params) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


def build_sgd(ctx: StepContext) -> Callable[[int], None]:
    model = ctx.model_fn()
    opt = ctx.sgd(model.parameters())
    return one_pass_step(ctx, model, opt, ctx.loss_fn)


def builders() -> dict[str, Callable]:
    """Method name -> step builder, for every method implemented in this version."""
    found: dict[str, Callable] = {"sgd": build_sgd}
    for mod in ("sam_steps", "saf_steps", "esam_steps", "cheap_steps"):
        try:
            module = __import__(f"{__package__}.{mod}", fromlist=["BUILDERS"])
        except ImportError:
            continue
        found.update(getattr(module, "BUILDERS", {}))
    return found


def describe(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        return {"model": "ResNet-18 (CIFAR, 100 classes)", "batch": "128 x 3 x 32 x 32", "device": str(device)}
    return {"model": "small CNN (10 classes)", "batch": "128 x 1 x 28 x 28", "device": str(device)}


def make_context(device: torch.device, quick: bool, batches: int = 4, seed: int = 0) -> StepContext:
    if device.type == "cuda":
        shape, classes = (3, 32, 32), 100

        def model_fn():
            torch.manual_seed(seed)
            return resnet18(classes).to(device)
    else:
        shape, classes = (1, 28, 28), 10

        def model_fn():
            torch.manual_seed(seed)
            return SmallCNN(classes).to(device)

    gen = torch.Generator(device="cpu").manual_seed(seed)
    B = 128
    inputs = [torch.randn((B, *shape), generator=gen).to(device) for _ in range(batches)]
    labels = [torch.randint(0, classes, (B,), generator=gen).to(device) for _ in range(batches)]
    return StepContext(device, model_fn, inputs, labels, classes, B)


def run_method_benchmarks(device: torch.device, quick: bool, methods: list[str] | None, progress) -> list[dict]:
    ctx = make_context(device, quick)
    registry = builders()
    wanted = list(methods) if methods else list(METHODS)
    if "sgd" not in wanted:
        wanted.insert(0, "sgd")
    rounds = 3 if quick else 15
    inner = PERIOD  # each sample spans whole periods: one SAM step in each for LookSAM and every=5
    progress.add(len(wanted) + 1)
    rows: dict[str, dict] = {}
    steps: dict[str, Callable] = {}
    for m in wanted:
        progress(f"build {m}")
        row = {"kind": "method", "method": m}
        rows[m] = row
        build = registry.get(m)
        if build is None:
            row["unavailable"] = "not implemented in this version"
            continue
        try:
            step = build(ctx)
        except Exception as e:  # noqa: BLE001  (a method failing to build is a result, not a crash)
            row["error"] = f"{type(e).__name__}: {e}"
            continue
        if isinstance(step, str):
            row["unavailable"] = step
            continue
        try:
            mem = _warm_and_peak(step, device)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"
            continue
        row["peak_mem_bytes"] = mem
        steps[m] = step
    samples = interleaved(steps, device, rounds, inner, 100)
    progress("timing")
    base = statistics.median(samples["sgd"]) if "sgd" in samples else None
    for m, s in samples.items():
        rows[m]["median_s"] = statistics.median(s)
        rows[m]["rounds"] = rounds
        rows[m]["inner"] = inner
        if base:
            rows[m]["ratio_to_sgd"] = rows[m]["median_s"] / base
    return [rows[m] for m in wanted]


def _warm_and_peak(step: Callable[[int], None], device: torch.device) -> int | None:
    for i in range(3):
        step(i)
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(3)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)
