"""saf_kernels: fused Triton and C++/CUDA kernels for sharpness-aware training.

Public API (see README.md for the table):

- :func:`trajectory_kl_loss`, :func:`saf_loss`: the SAF/MESA trajectory loss, fused with
  cross-entropy, forward and gradient in one kernel.
- :func:`fused_linear_trajectory_loss`: the same loss for language models, fused with the output
  layer, chunk by chunk over tokens (the ``[N, V]`` logits never exist at once).
- :class:`SAF`, :class:`MESA`, :class:`TrajectoryBank`, :class:`IndexedDataset`: SAF and MESA as
  drop-in training components (a GPU-resident bank of past logits; an EMA teacher).
- :mod:`saf_kernels.ops`: every fused op; :mod:`saf_kernels.reference`: their plain-PyTorch versions.
- :func:`sam_perturb_`, :func:`sam_restore_` (and the fused restore + SGD / AdamW steps): SAM's
  multi-tensor ops; :mod:`saf_kernels.optim`: ``SAM``, ``ASAM``, ``ESAM``, ``RSAM``, ``GSAM`` on
  them; :mod:`saf_kernels.sharpness`: top Hessian eigenvalue, worst loss increase in a rho-ball.
- :mod:`saf_kernels.physical`: SAT for physical neural networks (MRR and free-space layers whose
  trainable tensor is the device control, the model-free finite-difference step, robustness sweeps).
"""

from . import optim, physical, sharpness
from ._backend import BACKENDS, BackendUnavailable, available
from .ops import (
    ema_update_,
    fused_linear_trajectory_loss,
    saf_loss,
    sam_perturb_,
    sam_restore_,
    sam_restore_adamw_,
    sam_restore_sgd_,
    trajectory_kl_loss,
)
from .saf import MESA, SAF, IndexedDataset, TopKTrajectoryBank, TrajectoryBank

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "IndexedDataset",
    "MESA",
    "SAF",
    "TopKTrajectoryBank",
    "TrajectoryBank",
    "available",
    "fused_linear_trajectory_loss",
    "saf_loss",
    "trajectory_kl_loss",
    "ema_update_",
    "optim",
    "physical",
    "sharpness",
    "sam_perturb_",
    "sam_restore_",
    "sam_restore_sgd_",
    "sam_restore_adamw_",
]
