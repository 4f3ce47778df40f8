"""One tolerance table, per dtype, for comparisons against the float64 reference.

``atol`` is relative to the largest magnitude in the expected tensor, so that one table serves
losses of order 10 and softmax gradients of order 1/C.
"""

from __future__ import annotations

import torch

# dtype -> (rtol, atol relative to max |expected|)
TOL = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 8e-3),
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "", atol_floor: float = 0.0
) -> None:
    """Compare in float64: |actual - expected| <= atol * max|expected| + rtol * |expected|.

    ``atol_floor`` is an absolute minimum for values that are exactly 0 in theory but carry
    cancellation error proportional to the inputs (e.g. a KL term with one class).
    """
    rtol, atol = TOL[dtype]
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    finite = e[torch.isfinite(e)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=max(atol * scale, atol_floor, 1e-30), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")
