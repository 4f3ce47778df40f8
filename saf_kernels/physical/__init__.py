"""Physical neural networks and SAT, sharpness-aware training of their control parameters
(Xu et al., "Perfecting Imperfect Physical Neural Networks with Transferable Robustness using
Sharpness-Aware Training", arXiv 2411.12352; Nature Communications 2026).

- Devices (:mod:`.mrr`, :mod:`.freespace`): layers whose trainable tensor is the ``control``
  (an MRR ring's detuning, a free-space pixel), mapped to weights by a differentiable device
  model, with the imperfections as seedable state outside ``state_dict()``:
  :class:`MRRLinear`, :class:`MRRConv2d` (``w = L(x + offset + 0.08 dT)``), :class:`FreeSpaceLinear`
  (tiles that can be rotated, shifted, scaled); context managers :func:`thermal_drift`,
  :func:`fabrication_variance`, :func:`misalignment`; :func:`deploy_weights` loads a network
  trained on weights through ``L^-1``.
- SAT (:mod:`.sat`): the library's ``SAM`` / ``ASAM`` over the controls; :func:`sat_step`,
  :func:`sat_param_groups`, :func:`constrain_`.
- The model-free step (:mod:`.model_free`): :class:`ModelFreeAscent` over :class:`Knob` s, a
  finite-difference adversarial step for physical parameters that cannot be differentiated.
- Robustness (:mod:`.robustness`): :func:`accuracy`, :func:`drift_sweep`,
  :func:`fabrication_sweep`, :func:`misalignment_sweep`, :func:`control_hessian_top_eigenvalue`.
"""

from ._common import PhysicalLayer
from .freespace import FreeSpaceLinear, misalign_kernels, misalignment
from .model_free import Knob, ModelFreeAscent
from .mrr import (
    DRIFT_PER_KELVIN,
    Lorentzian,
    MRRConv2d,
    MRRLayer,
    MRRLinear,
    deploy_weights,
    fabrication_variance,
    thermal_drift,
)
from .robustness import (
    accuracy,
    control_hessian_top_eigenvalue,
    drift_sweep,
    fabrication_sweep,
    misalignment_sweep,
    sweep,
)
from .sat import constrain_, control_parameters, digital_parameters, sat_param_groups, sat_step

__all__ = [
    "DRIFT_PER_KELVIN",
    "FreeSpaceLinear",
    "Knob",
    "Lorentzian",
    "MRRConv2d",
    "MRRLayer",
    "MRRLinear",
    "ModelFreeAscent",
    "PhysicalLayer",
    "accuracy",
    "constrain_",
    "control_hessian_top_eigenvalue",
    "control_parameters",
    "deploy_weights",
    "digital_parameters",
    "drift_sweep",
    "fabrication_sweep",
    "fabrication_variance",
    "misalign_kernels",
    "misalignment",
    "misalignment_sweep",
    "sat_param_groups",
    "sat_step",
    "sweep",
    "thermal_drift",
]
