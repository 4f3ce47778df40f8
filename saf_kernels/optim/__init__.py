"""Sharpness-aware optimizers on the fused multi-tensor kernels."""

# ---- SAM family ----
from .base import TwoPassOptimizer
from .sam import ASAM, SAM, default_adaptive_filter
from .utils import first_pass, frozen_bn_stats

__all__ = ["ASAM", "SAM", "TwoPassOptimizer", "default_adaptive_filter", "first_pass", "frozen_bn_stats"]
# ---- end SAM family ----
