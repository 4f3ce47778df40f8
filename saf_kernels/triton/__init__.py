"""Triton kernels, one module per op family (same stems as csrc/). Imported lazily by the op
modules, so that ``TRITON_INTERPRET=1`` takes effect if it is set before the first Triton call."""
