"""Step builders of the cheaper sharpness methods for ``python -m saf_kernels.bench`` (methods
table): Momentum-SAM (one pass), LookSAM (k = 5) and SAM on a schedule (every = 5)."""

from __future__ import annotations

import torch

from ..optim import MSAM, SAM, LookSAM


def _scheduled_builder(make):
    """``build(ctx) -> step(i)`` for a two-pass optimizer whose schedule decides the passes."""

    def build(ctx):
        m = ctx.model_fn().train()
        opt = make(m, ctx)

        def step(i: int) -> None:
            x, y, _ = ctx.batch(i)
            with opt.first_pass(m):
                ctx.loss_fn(m(x), y).backward()
            if opt.sam_step:
                opt.first_step(zero_grad=True)
                with opt.second_pass(m):
                    ctx.loss_fn(m(x), y).backward()
            opt.second_step(zero_grad=True)

        return step

    return build


def build_msam(ctx):
    m = ctx.model_fn().train()
    opt = MSAM(m.parameters(), lr=ctx.lr, momentum=ctx.momentum, weight_decay=ctx.weight_decay, rho=0.3)

    def step(i: int) -> None:
        x, y, _ = ctx.batch(i)
        loss = ctx.loss_fn(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _sgd_kw(ctx):
    return dict(lr=ctx.lr, momentum=ctx.momentum, weight_decay=ctx.weight_decay)


BUILDERS = {
    "msam": build_msam,
    "looksam": _scheduled_builder(lambda m, ctx: LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=5, alpha=0.7,
                                                         **_sgd_kw(ctx))),
    "sam_every5": _scheduled_builder(lambda m, ctx: SAM(m.parameters(), torch.optim.SGD, rho=0.05, every=5,
                                                        **_sgd_kw(ctx))),
}
