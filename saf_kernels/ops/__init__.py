"""Fused ops callable from PyTorch code. Each takes ``backend="auto" | "cuda" | "triton" | "cpu" | "torch"``."""

from .ema import ema_update_
from .trajectory_bank import trajectory_bank_record, trajectory_bank_step
from .trajectory_loss import saf_loss, trajectory_kl_loss

# ---- SAM family (multi-tensor ops) ----
from .sam import sam_perturb_, sam_restore_, sam_restore_adamw_, sam_restore_sgd_  # noqa: E402

__all__ = ["ema_update_", "saf_loss", "trajectory_bank_record", "trajectory_bank_step", "trajectory_kl_loss",
           "sam_perturb_", "sam_restore_", "sam_restore_sgd_", "sam_restore_adamw_"]

# ---- ESAM, R-SAM, GSAM (multi-tensor ops with in-kernel Philox random numbers) ----
from .esam import esam_perturb_, esam_restore_, sds_count, sds_select  # noqa: E402
from .gsam import gsam_combine_, gsam_restore_sgd_  # noqa: E402
from .philox import philox_  # noqa: E402
from .rsam import rsam_noise_, rsam_perturb_  # noqa: E402

__all__ += ["philox_", "esam_perturb_", "esam_restore_", "sds_count", "sds_select", "rsam_noise_", "rsam_perturb_",
            "gsam_combine_", "gsam_restore_sgd_"]
# ---- end ESAM, R-SAM, GSAM ----
