"""Sharpness-aware optimizers on the fused multi-tensor kernels."""

# ---- SAM family ----
from .base import TwoPassOptimizer
from .sam import ASAM, SAM, default_adaptive_filter
from .utils import first_pass, frozen_bn_stats

__all__ = ["ASAM", "SAM", "TwoPassOptimizer", "default_adaptive_filter", "first_pass", "frozen_bn_stats"]
# ---- end SAM family ----

# ---- ESAM, R-SAM, GSAM ----
from .esam import ESAM, index_batch, per_sample_closure  # noqa: E402
from .gsam import GSAM  # noqa: E402
from .rsam import RSAM  # noqa: E402
from .schedulers import CosineIncrease, ProportionScheduler  # noqa: E402

__all__ += ["ESAM", "RSAM", "GSAM", "ProportionScheduler", "CosineIncrease", "index_batch", "per_sample_closure"]
# ---- end ESAM, R-SAM, GSAM ----
