"""Training steps of ESAM, R-SAM and GSAM for the step-time comparison against SGD.

Two entry points:

- ``BUILDERS``: ``build(ctx) -> step(i)`` for the methods section of ``python -m saf_kernels.bench``
  (``saf_kernels/bench/methods.py``: ``ctx.model_fn()``, ``ctx.batch(i) -> (x, y, ids)``,
  ``ctx.loss_fn``, ``ctx.lr / momentum / weight_decay``). ``esam``, ``rsam`` and ``gsam`` are
  each optimizer's defaults with the issue's settings (ESAM ``beta = gamma = 0.5``, elementwise
  SWP); the variants: ``esam_tensor`` (the official per-tensor SWP, which also skips the
  dropped tensors' weight gradients), ``esam_exact``, ``rsam_exact``, ``gsam_exact``
  (``fused_step=False``: the bit-exact restore, then torch's SGD; the defaults fuse restore +
  SGD in one pass).
- ``python -m saf_kernels.bench.esam_steps``: times SGD, SAM and every builder here on the CPU
  small CNN (or ResNet-18 on a GPU) in interleaved rounds, without the rest of the bench.

Every step is the whole training step: the forward and backward passes the method needs and the
optimizer step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ..optim import ESAM, GSAM, RSAM, SAM, per_sample_closure

# The issue's settings, and the papers' defaults for the rest.
RHO, BETA, GAMMA, GSAM_ALPHA = 0.05, 0.5, 0.5, 0.4


def _kw(ctx) -> dict:
    return dict(lr=ctx.lr, momentum=ctx.momentum, weight_decay=ctx.weight_decay)


def _loss(ctx):
    fn = getattr(ctx, "loss_fn", F.cross_entropy)
    return fn


def _closure(opt, model, loss_fn, ctx, i):
    x, y, _ = ctx.batch(i)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


def build_esam(ctx, swp: str = "element", fused_step: bool | None = None) -> Callable[[int], None]:
    """ESAM with beta = gamma = 0.5: pass 1, SWP, the no-grad forward, pass 2 on half the batch."""
    model = ctx.model_fn()
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=RHO, beta=BETA, gamma=GAMMA, swp=swp, fused_step=fused_step,
               model=model, seed=0, **_kw(ctx))
    loss_fn = _loss(ctx)

    def per_sample(out, y):
        return loss_fn(out, y, reduction="none")

    def step(i: int) -> None:
        x, y, _ = ctx.batch(i)
        opt.step(per_sample_closure(model, x, y, per_sample))

    return step


def build_rsam(ctx, fused_step: bool | None = None) -> Callable[[int], None]:
    """R-SAM: noise, pass 1 at w + delta, ascent, pass 2, restore + SGD."""
    model = ctx.model_fn()
    opt = RSAM(model.parameters(), torch.optim.SGD, rho=RHO, noise_std=(5e-4, 2.5e-3), total_steps=10000,
               fused_step=fused_step, model=model, seed=0, **_kw(ctx))
    loss_fn = _loss(ctx)

    def step(i: int) -> None:
        opt.step(_closure(opt, model, loss_fn, ctx, i))

    return step


def build_gsam(ctx, fused_step: bool | None = None) -> Callable[[int], None]:
    """GSAM: SAM's two passes, the fused reductions and decomposition, restore + SGD."""
    model = ctx.model_fn()
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=RHO, alpha=GSAM_ALPHA, fused_step=fused_step, model=model,
               **_kw(ctx))
    loss_fn = _loss(ctx)

    def step(i: int) -> None:
        opt.step(_closure(opt, model, loss_fn, ctx, i))

    return step


def build_sam(ctx, fused_step: bool | None = None) -> Callable[[int], None]:
    """SAM (for the ratios against SAM in this module's own runner; the SAM branch registers its
    own ``sam`` builder for the bench)."""
    model = ctx.model_fn()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, fused_step=fused_step, model=model, **_kw(ctx))
    loss_fn = _loss(ctx)

    def step(i: int) -> None:
        opt.step(_closure(opt, model, loss_fn, ctx, i))

    return step


BUILDERS = {
    "esam": build_esam,
    "rsam": build_rsam,
    "gsam": build_gsam,
    "esam_tensor": lambda ctx: build_esam(ctx, swp="tensor"),
    "esam_exact": lambda ctx: build_esam(ctx, fused_step=False),
    "rsam_exact": lambda ctx: build_rsam(ctx, fused_step=False),
    "gsam_exact": lambda ctx: build_gsam(ctx, fused_step=False),
}


# ---------------------------------------------------------------------------------------------
# Standalone runner
# ---------------------------------------------------------------------------------------------


class _Context:
    """The parts of methods.StepContext the builders use (for running this module alone)."""

    def __init__(self, device: torch.device, batches: int = 4, seed: int = 0):
        try:
            from .models import SmallCNN, resnet18
        except ImportError:  # a checkout without the bench's models: the same small CNN here
            SmallCNN, resnet18 = _SmallCNN, None
        self.device = device
        if device.type == "cuda" and resnet18 is not None:
            shape, classes, make = (3, 32, 32), 100, lambda: resnet18(100)
        else:
            shape, classes, make = (1, 28, 28), 10, lambda: SmallCNN(10)

        def model_fn():
            torch.manual_seed(seed)
            return make().to(device)

        self.model_fn = model_fn
        gen = torch.Generator().manual_seed(seed)
        self.inputs = [torch.randn((128, *shape), generator=gen).to(device) for _ in range(batches)]
        self.labels = [torch.randint(0, classes, (128,), generator=gen).to(device) for _ in range(batches)]
        self.num_classes, self.batch_size = classes, 128
        self.loss_fn = F.cross_entropy
        self.lr, self.momentum, self.weight_decay = 0.05, 0.9, 5e-4

    def batch(self, i: int):
        k = i % len(self.inputs)
        return self.inputs[k], self.labels[k], None

    def sgd(self, params):
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


class _SmallCNN(torch.nn.Module):
    """saf_kernels/bench/models.py's SmallCNN (two conv + BatchNorm blocks, two linear layers)."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 7 * 7, 128), nn.ReLU(inplace=True),
                                  nn.Linear(128, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def _build_sgd(ctx):
    model = ctx.model_fn()
    opt = ctx.sgd(model.parameters())

    def step(i: int) -> None:
        x, y, _ = ctx.batch(i)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(device: torch.device, methods: list[str], rounds: int, inner: int) -> dict[str, float]:
    """Median step time of each method, timed in interleaved rounds (every method once per round,
    so that drift of a shared machine hits all alike)."""
    ctx = _Context(device)
    table = {"sgd": _build_sgd, "sam": build_sam, "sam_exact": lambda c: build_sam(c, False), **BUILDERS}
    steps = {m: table[m](ctx) for m in methods}
    for _m, s in steps.items():
        for i in range(3):
            s(i)
    samples: dict[str, list[float]] = {m: [] for m in steps}
    for r in range(rounds):
        for m, s in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            for k in range(inner):
                s(100 + r * inner + k)
            _sync(device)
            samples[m].append((time.perf_counter() - t0) / inner)
    return {m: statistics.median(v) for m, v in samples.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default="sgd,sam,sam_exact,esam,esam_tensor,esam_exact,rsam,rsam_exact,gsam,gsam_exact")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--inner", type=int, default=2)
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    known = ["sgd", "sam", "sam_exact", *BUILDERS]
    unknown = sorted(set(methods) - set(known))
    if unknown:
        p.error(f"unknown methods {unknown}; known: {known}")
    for name in ("rounds", "inner"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for need in ("sam", "sgd"):
        if need not in methods:
            methods.insert(0, need)
    med = run(torch.device(args.device), methods, args.rounds, args.inner)
    print(f"device {args.device}, threads {torch.get_num_threads()}, {args.rounds} rounds x {args.inner} steps")
    print(f"{'method':<12} {'median ms':>10} {'x SGD':>7} {'x SAM':>7}")
    for m in methods:
        print(f"{m:<12} {med[m] * 1e3:>10.2f} {med[m] / med['sgd']:>7.3f} {med[m] / med['sam']:>7.3f}")


if __name__ == "__main__":
    main()
