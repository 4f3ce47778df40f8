"""Fused ops callable from PyTorch code. Each takes ``backend="auto" | "cuda" | "triton" | "cpu" | "torch"``."""

from .trajectory_loss import saf_loss, trajectory_kl_loss

__all__ = ["saf_loss", "trajectory_kl_loss"]
