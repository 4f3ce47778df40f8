"""SAM first_step + second_step on ResNet-18 / ResNet-50 / ViT-B parameter lists: the per-tensor
loop (the widely used port), foreach, and saf_kernels (+ fused restore/SGD), as in
``python -m saf_kernels.bench --ops sam_step``; groups are one parameter list so that
``--benchmark-compare`` puts the providers and commits side by side."""

from __future__ import annotations

import pytest
import torch

from saf_kernels.bench import multi_tensor as mt
from saf_kernels.bench.param_shapes import MODELS

from .conftest import DEVICE

CASES = mt.cases(DEVICE, quick=False)
PROVIDERS = list(mt.providers(DEVICE))


@pytest.fixture(scope="module")
def param_lists():
    cache = {}

    def get(model, dtype):
        if (model, dtype) not in cache:
            cache.clear()  # one list at a time: ViT-B is 350 MB per copy in fp32
            gen = torch.Generator().manual_seed(0)
            ps = [
                torch.randn(s, generator=gen).mul_(0.05).to(DEVICE, dtype).requires_grad_()
                for s in MODELS[model]()
            ]
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, dtype)
            cache[(model, dtype)] = ps
        return cache[(model, dtype)]

    return get


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{str(c[1]).replace('torch.', '')}")
def test_sam_step(timed, param_lists, case, provider):
    make = mt.providers(DEVICE)[provider]
    if isinstance(make, str):
        pytest.skip(make)
    model, dtype = case
    step = make(param_lists(model, dtype))
    big = model == "vit_b_16" and DEVICE.type == "cpu"
    timed(lambda i: step(), group=f"sam_step {model} {dtype}", rounds=5 if big else 15, warmup=2)
