"""Full training steps of plain SGD, SAM and ASAM on the same model and batch, for the methods
section of ``python -m saf_kernels.bench`` (saf_kernels/bench/methods.py times them side by side).

SAM's step is two forward and two backward passes plus the optimizer work, so it should cost
about 2x an SGD step; what lies above 2x is the SAM machinery's overhead.

    python -m saf_kernels.bench.sam_steps            # a small CNN on this machine's CPU
"""

from __future__ import annotations

import argparse
import copy
from typing import Callable

import torch
from torch import nn

from .. import _checks as C
from ..optim import ASAM, SAM


def step_callables(
    model: nn.Module,
    loss_fn: Callable,
    batch,
    device: torch.device | str,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    rho: float = 0.05,
    asam_rho: float = 0.5,
    asam_eta: float = 0.01,
    fused_step: bool | None = None,
    backend: str = "auto",
    extra: bool = False,
) -> dict[str, Callable[[], None]]:
    """Step callables ``{"sgd", "sam", "asam"}`` (``extra=True`` adds ``"sam+exact"``, SAM's
    bit-exact path ``fused_step=False``, beside the default fused one).

    Each call is one full training step on ``batch = (inputs, targets)``: forward, backward and
    the optimizer step -- for SAM and ASAM both passes (first forward/backward, ``first_step``,
    second forward/backward with BatchNorm statistics kept from the first pass, ``second_step``).
    Every method works on its own deep copy of ``model`` (moved to ``device``) with its own
    optimizer: SGD(lr, momentum, weight_decay), and SAM / ASAM around the same SGD. Nothing here
    synchronises the device; time the callables with device synchronisation around them.
    """
    fn = "saf_kernels.bench.sam_steps.step_callables"
    C.module(model, "model", fn)
    C.function(loss_fn, "loss_fn", fn, " (outputs, targets -> loss)")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2
            and all(isinstance(t, torch.Tensor) for t in batch)):
        raise TypeError(f"{fn}: batch must be a pair (inputs, targets) of tensors, got {type(batch).__name__}")
    device = C.device(device, "device", fn)
    for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("rho", rho),
                    ("asam_rho", asam_rho), ("asam_eta", asam_eta)):
        C.number(v, name, fn, lo=0)
    if fused_step is not None:
        C.flag(fused_step, "fused_step", fn)
    C.backend(backend, fn)
    C.flag(extra, "extra", fn)
    x, y = batch
    x, y = x.to(device), y.to(device)
    kw = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)

    def sgd_step_fn():
        m = copy.deepcopy(model).to(device).train()
        opt = torch.optim.SGD(m.parameters(), **kw)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(m(x), y).backward()
            opt.step()

        return step

    def two_pass_fn(cls, **okw):
        m = copy.deepcopy(model).to(device).train()
        opt = cls(m.parameters(), torch.optim.SGD, backend=backend, **okw, **kw)

        def step():
            with opt.first_pass(m):
                loss_fn(m(x), y).backward()
            opt.first_step(zero_grad=True)
            with opt.second_pass(m):
                loss_fn(m(x), y).backward()
            opt.second_step(zero_grad=True)

        return step

    out = {
        "sgd": sgd_step_fn(),
        "sam": two_pass_fn(SAM, rho=rho, fused_step=fused_step),
        "asam": two_pass_fn(ASAM, rho=asam_rho, eta=asam_eta, fused_step=fused_step),
    }
    if extra and fused_step is not False:
        out["sam+exact"] = two_pass_fn(SAM, rho=rho, fused_step=False)
    return out


def _two_pass_builder(cls, **okw):
    """A ``methods.py`` step builder: ``build(ctx) -> step(i)``, the batch rotated by ``ctx.batch(i)``."""

    def build(ctx):
        m = ctx.model_fn().train()
        opt = cls(m.parameters(), torch.optim.SGD, lr=ctx.lr, momentum=ctx.momentum, weight_decay=ctx.weight_decay,
                  **okw)

        def step(i: int) -> None:
            x, y, _ = ctx.batch(i)
            with opt.first_pass(m):
                ctx.loss_fn(m(x), y).backward()
            if opt.sam_step:  # always, unless a schedule (every=, LookSAM's k) says one pass
                opt.first_step(zero_grad=True)
                with opt.second_pass(m):
                    ctx.loss_fn(m(x), y).backward()
            opt.second_step(zero_grad=True)

        return step

    return build


# The methods section of `python -m saf_kernels.bench` (saf_kernels/bench/methods.py).
BUILDERS = {
    "sam": _two_pass_builder(SAM, rho=0.05),
    "asam": _two_pass_builder(ASAM, rho=0.5, eta=0.01),
}


class SmallCNN(nn.Module):
    """A CIFAR-sized CNN with BatchNorm (0.29M parameters, 14 tensors)."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def block(i, o, s):
            return [
                nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False),
                nn.BatchNorm2d(o),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(3, 32, 1), *block(32, 64, 2), *block(64, 128, 2), *block(128, 128, 1)
        )
        self.head = nn.Linear(128, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def main(argv: list[str] | None = None) -> int:
    from .multi_tensor import _interleaved

    ap = argparse.ArgumentParser(
        prog="python -m saf_kernels.bench.sam_steps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 gives stable numbers on a loaded machine)",
    )
    args = ap.parse_args(argv)
    for name in ("batch", "rounds", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = SmallCNN()
    batch = (torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,)))
    steps = step_callables(model, nn.CrossEntropyLoss(), batch, device, extra=True)
    t = _interleaved(steps, device, args.rounds, warmup=3)
    sgd = t["sgd"].median_s
    print(
        f"SmallCNN ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), batch {args.batch}, "
        f"{device}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds"
    )
    for name, tm in t.items():
        ratio = tm.median_s / sgd
        extra = f"  (overhead above 2x: {100 * (ratio - 2) / 2:+.1f}%)" if name != "sgd" else ""
        print(
            f"  {name:16s} {tm.median_s * 1e3:8.2f} ms  [{tm.p20_s * 1e3:.2f}, {tm.p80_s * 1e3:.2f}]  "
            f"{ratio:.3f}x SGD{extra}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
