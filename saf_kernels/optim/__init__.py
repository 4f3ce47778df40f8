"""Sharpness-aware optimizers on the fused multi-tensor kernels: SAM, ASAM, ESAM, R-SAM, GSAM, LookSAM,
Momentum-SAM; SAM on a schedule (``every=``, :class:`AdaptivePolicy`) and on a subset (``perturb_filter=``)."""

from .base import TwoPassOptimizer
from .esam import ESAM, index_batch, per_sample_closure
from .gsam import GSAM
from .looksam import LookSAM
from .msam import MSAM, MSAMAdamW
from .rsam import RSAM
from .sam import ASAM, SAM, default_adaptive_filter
from .schedule import AdaptivePolicy, norm_layer_filter
from .schedulers import CosineIncrease, ProportionScheduler
from .utils import first_pass, frozen_bn_stats

__all__ = [
    "ASAM",
    "AdaptivePolicy",
    "LookSAM",
    "MSAM",
    "MSAMAdamW",
    "norm_layer_filter",
    "CosineIncrease",
    "ESAM",
    "GSAM",
    "ProportionScheduler",
    "RSAM",
    "SAM",
    "TwoPassOptimizer",
    "default_adaptive_filter",
    "first_pass",
    "frozen_bn_stats",
    "index_batch",
    "per_sample_closure",
]
