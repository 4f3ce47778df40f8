"""Step builders of the cheaper sharpness methods for ``python -m saf_kernels.bench`` (methods
table): Momentum-SAM (one pass), LookSAM (k = 5) and SAM on a schedule (every = 5)."""

from __future__ import annotations

from ..optim import MSAM, SAM, LookSAM
from .sam_steps import _two_pass_builder
from .timing import one_pass_step


def build_msam(ctx):
    m = ctx.model_fn().train()
    opt = MSAM(m.parameters(), lr=ctx.lr, momentum=ctx.momentum, weight_decay=ctx.weight_decay, rho=0.3)
    return one_pass_step(ctx, m, opt, ctx.loss_fn)


BUILDERS = {
    "msam": build_msam,
    "looksam": _two_pass_builder(LookSAM, rho=0.1, k=5, alpha=0.7),
    "sam_every5": _two_pass_builder(SAM, rho=0.05, every=5),
}
