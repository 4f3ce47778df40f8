"""Training steps of SAF and MESA (and plain SGD) for the step-time comparison against SGD.

Two entry points:

- ``BUILDERS`` (``saf``, ``mesa``, ``mesa_bf16_teacher``): builders ``build(ctx) -> step(i)`` for the
  methods section of ``python -m saf_kernels.bench`` (``saf_kernels/bench/methods.py``). ``ctx``
  provides ``device``, ``model_fn()`` (a fresh model, same initial weights each call),
  ``batch(i) -> (inputs, labels, ids)``, ``num_classes``, ``batch_size`` and ``sgd(params)``.
- :func:`make_steps` ``(model, batch, device)``: the same steps for one model and one batch, plus
  ``"sgd"``, for code that has no such context.

Every step is forward + loss + backward + optimizer step (MESA also its EMA update). The SAF step
runs in the steady state of a long run: the bank is pre-filled so that every sample has its entry
from ``delay`` epochs ago, sample ids walk through a notional CIFAR-sized epoch (391 steps), and the
trajectory term is on. Run this module to time them on the CPU small CNN::

    python -m saf_kernels.bench.saf_steps [--device cpu] [--rounds 15]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from ..saf import MESA, SAF
from .timing import interleaved, one_pass_step, synchronize

# A notional epoch: CIFAR's 50,000 samples in batches of 128. Timing stays inside one epoch, as
# almost every step of a real run does (the bank's error check runs at an epoch's first step).
STEPS_PER_EPOCH = 391
# The paper's SAF and MESA settings.
SAF_LAM, MESA_LAM, TEMPERATURE, DELAY, EMA_DECAY = 0.3, 0.8, 5.0, 3, 0.9998
FIRST_EPOCH = DELAY  # the first epoch whose samples all have an entry from DELAY epochs ago
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


def _sgd(ctx, params):
    if hasattr(ctx, "sgd"):
        return ctx.sgd(params)
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def build_saf(ctx, bank_dtype: torch.dtype = torch.bfloat16, backend: str = "auto") -> Callable[[int], None]:
    """SAF step: ``SAF(...)(logits, labels, ids, epoch)`` (CE + trajectory term, one fused kernel)."""
    model = ctx.model_fn()
    opt = _sgd(ctx, model.parameters())
    B, C = ctx.batch_size, ctx.num_classes
    N = STEPS_PER_EPOCH * B
    saf = SAF(N, C, lam=SAF_LAM, temperature=TEMPERATURE, delay=DELAY, start_epoch=0, dtype=bank_dtype,
              device=ctx.device, backend=backend, process_group=None)
    # Steady state: every sample recorded in each of the DELAY epochs before FIRST_EPOCH.
    gen = torch.Generator(device="cpu").manual_seed(0)
    for epoch in range(FIRST_EPOCH - DELAY, FIRST_EPOCH):
        for s in range(0, N, 8192):
            ids = torch.arange(s, min(N, s + 8192))
            rows = torch.randn(len(ids), C, generator=gen) * 2
            saf.bank.record(rows.to(ctx.device), ids.to(ctx.device), epoch)
    all_ids = torch.arange(N, device=ctx.device).view(STEPS_PER_EPOCH, B)

    def step(i: int) -> None:
        x, y, _ = ctx.batch(i)
        k = i % STEPS_PER_EPOCH
        loss = saf(model(x), y, all_ids[k], FIRST_EPOCH + i // STEPS_PER_EPOCH)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def build_mesa(ctx, backend: str = "auto", teacher_autocast: torch.dtype | None = None) -> Callable[[int], None]:
    """MESA step: student forward, teacher forward (no grad), fused loss, backward, SGD, EMA update.

    The teacher runs in the model's precision, as the student; ``teacher_autocast`` (the
    ``"mesa_bf16_teacher"`` builder) runs its forward under bfloat16 autocast instead, as the
    official code does under AMP: the teacher's forward is MESA's whole overhead."""
    model = ctx.model_fn()
    opt = _sgd(ctx, model.parameters())
    mesa = MESA(model, lam=MESA_LAM, temperature=TEMPERATURE, decay=EMA_DECAY, start_epoch=0, backend=backend,
                teacher_autocast=teacher_autocast)

    def step(i: int) -> None:
        x, y, _ = ctx.batch(i)
        loss = mesa(model(x), y, x, epoch=FIRST_EPOCH)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mesa.update()

    return step


def build_sgd(ctx) -> Callable[[int], None]:
    """Plain SGD with cross-entropy (the baseline)."""
    model = ctx.model_fn()
    opt = _sgd(ctx, model.parameters())
    return one_pass_step(ctx, model, opt, F.cross_entropy)


def build_mesa_bf16_teacher(ctx, backend: str = "auto") -> Callable[[int], None]:
    """MESA with the teacher's forward under bfloat16 autocast (the student as it is)."""
    return build_mesa(ctx, backend, teacher_autocast=torch.bfloat16)


BUILDERS = {"saf": build_saf, "mesa": build_mesa, "mesa_bf16_teacher": build_mesa_bf16_teacher}


class _Context:
    """The smallest context the builders need: copies of one model, one batch."""

    def __init__(self, model: torch.nn.Module, batch, device, num_classes: int | None = None):
        self.device = torch.device(device)
        self._model = model.to(self.device)
        x, y = batch
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.batch_size = self.x.shape[0]
        if num_classes is None:
            with torch.no_grad():
                num_classes = int(copy.deepcopy(self._model).eval()(self.x[:1]).shape[1])
        self.num_classes = num_classes

    def model_fn(self) -> torch.nn.Module:
        return copy.deepcopy(self._model)

    def batch(self, i: int):
        return self.x, self.y, None


def make_steps(model: torch.nn.Module, batch, device, num_classes: int | None = None,
               backend: str = "auto") -> dict[str, Callable[[int], None]]:
    """``{"sgd": step, "saf": step, "mesa": step}`` for ``model`` (copied per method) on ``batch``
    = ``(inputs, labels)``: each ``step(i)`` is forward + loss + backward + optimizer step (+ EMA)."""
    ctx = _Context(model, batch, device, num_classes)
    return {"sgd": build_sgd(ctx), "saf": build_saf(ctx, backend=backend), "mesa": build_mesa(ctx, backend=backend)}


def compare(steps: dict[str, Callable[[int], None]], device, rounds: int = 15, inner: int = 4,
            warmup: int = 3) -> dict[str, float]:
    """Median seconds per step of each method, timed in interleaved rounds (every method once per
    round) so that drift of a shared machine hits all alike."""
    device = torch.device(device)
    for step in steps.values():
        for i in range(warmup):
            step(i)
    synchronize(device)
    samples = interleaved(steps, device, rounds, inner, warmup)
    return {m: statistics.median(s) for m, s in samples.items()}


def _default_model_and_batch(device: torch.device):
    try:  # the benchmark models of saf_kernels.bench, when this version has them
        from .models import SmallCNN, resnet18
    except ImportError:
        SmallCNN = resnet18 = None
    torch.manual_seed(0)
    if device.type == "cuda":
        if resnet18 is None:
            raise SystemExit("the GPU default (ResNet-18) needs saf_kernels.bench.models")
        model, shape, classes = resnet18(100), (3, 32, 32), 100
    else:
        model = SmallCNN(10) if SmallCNN is not None else _small_cnn(10)
        shape, classes = (1, 28, 28), 10
    x = torch.randn(128, *shape)
    y = torch.randint(0, classes, (128,))
    return model, (x, y), classes


def _small_cnn(num_classes: int) -> torch.nn.Module:
    # The same layers as saf_kernels.bench.models.SmallCNN (two conv + BatchNorm blocks, two linear).
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saf_kernels.bench.saf_steps", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inner", type=int, default=4)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, batch, classes = _default_model_and_batch(device)
    steps = make_steps(model, batch, device, classes, backend=args.backend)
    times = compare(steps, device, args.rounds, args.inner)
    base = times["sgd"]
    print(f"{device} ({torch.get_num_threads()} threads), batch {tuple(batch[0].shape)}, {classes} classes, "
          f"{args.rounds} rounds x {args.inner} steps")
    for m, t in times.items():
        print(f"  {m:5s} {t * 1e3:8.2f} ms/step   {t / base:6.3f}x SGD time   {base / t:6.1%} of SGD throughput")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
