"""Sharpness-aware optimizers on the fused multi-tensor kernels."""
