"""Which implementation of an op runs: ``auto | cuda | triton | cpu | torch``.

``auto`` (the default, or whatever ``SAF_KERNELS_BACKEND`` says) picks, for the device of the
op's tensors: the CUDA kernel when the extension was built with CUDA, else Triton on CUDA
tensors; the C++ CPU kernel for CPU tensors when the extension is built; else the plain-PyTorch
reference. ``triton`` on CPU tensors runs under ``TRITON_INTERPRET=1`` (set before the first
Triton call). Asking for a backend that is not available raises :class:`BackendUnavailable`
saying what is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
ENV_BACKEND = "SAF_KERNELS_BACKEND"


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run these inputs here."""


def _load_extension():
    try:
        from . import _C  # noqa: F401  (registers the C++ ops)

        return True, None
    except ImportError as e:  # not built, or built against another torch
        err = e
    if os.environ.get("SAF_KERNELS_JIT") == "1":
        try:
            from ._jit import build_and_load

            build_and_load()
            return True, None
        except Exception as e:  # noqa: BLE001  (report, fall back to Triton / reference)
            err = e
    warnings.warn(
        "saf_kernels: the compiled extension saf_kernels._C is not available "
        f"({type(err).__name__}: {err}); the Triton and plain-PyTorch paths remain. Build it with "
        "`pip install --no-build-isolation -e .` (or set SAF_KERNELS_JIT=1 to compile it at import).",
        stacklevel=3,
    )
    return False, err


HAS_EXT, EXT_ERROR = _load_extension()
HAS_TRITON = importlib.util.find_spec("triton") is not None


_KERNEL_CACHE: dict[tuple[str, str], bool] = {}


@torch.compiler.assume_constant_result
def _has_kernel(op: str, key: str) -> bool:
    # Constant for the life of the process once the extension is loaded; torch.compile treats it
    # as such instead of breaking the graph on the dispatcher query.
    hit = _KERNEL_CACHE.get((op, key))
    if hit is None:
        try:
            hit = HAS_EXT and torch._C._dispatch_has_kernel_for_dispatch_key(f"saf_kernels::{op}", key)
        except RuntimeError:  # no schema in csrc/ops.cpp (an op with Triton and reference paths only)
            hit = False
        _KERNEL_CACHE[(op, key)] = hit
    return hit


def has_cuda_kernels(op: str = "trajectory_loss") -> bool:
    """True when the extension holds CUDA kernels (it was built against a CUDA torch with nvcc)."""
    return _has_kernel(op, "CUDA")


def has_cpu_kernels(op: str = "trajectory_loss") -> bool:
    return _has_kernel(op, "CPU")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_missing(device: torch.device) -> str | None:
    if not HAS_TRITON:
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if triton_interpreted():
            return None
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before the first Triton call)"
    return f"Triton kernels do not run on {device.type} tensors"


def missing(backend: str, device: torch.device, op: str) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device`` tensors, or None if it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_missing(device)
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return f"backend {backend!r} needs {backend} tensors, got {device.type} tensors"
        if not HAS_EXT:
            return f"the compiled extension saf_kernels._C is not available ({EXT_ERROR})"
        if not _has_kernel(op, backend.upper()):
            if backend == "cuda":
                return (
                    "saf_kernels._C was built without CUDA kernels (it needs a CUDA build of torch and "
                    "nvcc at build time; SAF_KERNELS_BUILD=cuda forces it)"
                )
            return f"saf_kernels._C has no {backend} kernel for {op}"
        return None
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def resolve(backend: str | None, device: torch.device, op: str) -> str:
    """The concrete backend (``cuda``, ``triton``, ``cpu`` or ``torch``) that runs ``op``."""
    if backend is None or backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda":
            if missing("cuda", device, op) is None:
                return "cuda"
            if missing("triton", device, op) is None:
                return "triton"
            return "torch"
        if device.type == "cpu" and missing("cpu", device, op) is None:
            return "cpu"
        return "torch"
    why = missing(backend, device, op)
    if why is not None:
        raise BackendUnavailable(f"saf_kernels: backend {backend!r} is not available for {op}: {why}")
    return backend


def available(device: torch.device | str, op: str = "trajectory_loss") -> dict[str, str | None]:
    """For each concrete backend: None if it can run ``op`` (a registered op's name, e.g.
    ``"trajectory_loss"``, ``"sam_perturb_"``) on ``device``, else why not."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"saf_kernels.available: device must be a torch.device or a device string, got "
                         f"{device!r}") from e
    if not isinstance(op, str) or (HAS_EXT and not hasattr(torch.ops.saf_kernels, op)):
        raise ValueError(f"saf_kernels.available: op must name a registered op of saf_kernels (e.g. "
                         f"'trajectory_loss', 'sam_perturb_'), got {op!r}")
    return {b: missing(b, device, op) for b in BACKENDS if b != "auto"}
