"""saf_kernels: fused Triton and C++/CUDA kernels for sharpness-aware training.

Public API (see README.md for the table):

- :func:`trajectory_kl_loss`, :func:`saf_loss`: the SAF/MESA trajectory loss, fused with
  cross-entropy, forward and gradient in one kernel.
- :class:`SAF`, :class:`MESA`, :class:`TrajectoryBank`, :class:`IndexedDataset`: SAF and MESA as
  drop-in training components (a GPU-resident bank of past logits; an EMA teacher).
- :mod:`saf_kernels.ops`: every fused op; :mod:`saf_kernels.reference`: their plain-PyTorch versions.
"""

from ._backend import BACKENDS, BackendUnavailable, available
from .ops import saf_loss, trajectory_kl_loss
from .saf import MESA, SAF, IndexedDataset, TrajectoryBank

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "IndexedDataset",
    "MESA",
    "SAF",
    "TrajectoryBank",
    "available",
    "saf_loss",
    "trajectory_kl_loss",
]
