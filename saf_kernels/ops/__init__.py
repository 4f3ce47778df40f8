"""Fused ops callable from PyTorch code. Each takes ``backend="auto" | "cuda" | "triton" | "cpu" | "torch"``."""

from .ema import ema_update_
from .esam import esam_perturb_, esam_restore_, esam_sumsq, sds_count, sds_select
from .fused_linear import fused_linear_trajectory_loss
from .gsam import gsam_combine_, gsam_restore_sgd_, gsam_sums
from .looksam import looksam_combine_, looksam_gv_
from .msam import msam_adamw_, msam_sgd_
from .philox import philox_
from .rsam import rsam_noise_, rsam_perturb_, rsam_sumsq
from .sam import sam_perturb_, sam_restore_, sam_restore_adamw_, sam_restore_sgd_, sam_sumsq
from .trajectory_bank import trajectory_bank_record, trajectory_bank_step
from .trajectory_loss import saf_loss, trajectory_kl_loss

__all__ = [
    "ema_update_",
    "esam_perturb_",
    "esam_restore_",
    "esam_sumsq",
    "fused_linear_trajectory_loss",
    "gsam_combine_",
    "gsam_restore_sgd_",
    "gsam_sums",
    "looksam_combine_",
    "looksam_gv_",
    "msam_adamw_",
    "msam_sgd_",
    "philox_",
    "rsam_noise_",
    "rsam_perturb_",
    "rsam_sumsq",
    "saf_loss",
    "sam_perturb_",
    "sam_restore_",
    "sam_restore_adamw_",
    "sam_restore_sgd_",
    "sam_sumsq",
    "sds_count",
    "sds_select",
    "trajectory_bank_record",
    "trajectory_bank_step",
    "trajectory_kl_loss",
]
