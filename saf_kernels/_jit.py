"""Fallback build of saf_kernels._C at import time (``SAF_KERNELS_JIT=1``), from a source checkout.

Uses ``torch.utils.cpp_extension.load`` (ninja). The CPU kernels are compiled once, for the
generic instruction set only (``setup.py`` builds the AVX2/AVX512 variants as well); CUDA kernels
are included when torch is a CUDA build, as in setup.py.
"""

from __future__ import annotations

import glob
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_and_load():
    from torch.utils.cpp_extension import CUDA_HOME, load

    csrc = os.path.join(ROOT, "csrc")
    if not os.path.isdir(csrc):
        raise ImportError(f"no C++ sources at {csrc} (JIT builds need a source checkout)")
    sources = sorted(
        glob.glob(os.path.join(csrc, "*.cpp"))
        + glob.glob(os.path.join(csrc, "cpu", "*.cpp"))
        + glob.glob(os.path.join(csrc, "cpu", "kernels", "*.cpp"))
    )
    cflags = ["-O3", "-fopenmp", "-DSAF_KERNELS_EXT", "-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]
    cuda_flags = []
    if torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("SAF_KERNELS_BUILD") != "cpu":
        cuda = os.path.join(csrc, "cuda")
        sources += sorted(glob.glob(os.path.join(cuda, "*.cu")) + glob.glob(os.path.join(cuda, "*.cpp")))
        cflags.append("-DSAF_KERNELS_CUDA")
        cuda_flags = ["-O3", "-DSAF_KERNELS_CUDA", "--expt-relaxed-constexpr"]
    load(
        name="saf_kernels_jit",
        sources=sources,
        extra_include_paths=[os.path.join(csrc, "include"), csrc],
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=os.environ.get("SAF_KERNELS_JIT_VERBOSE") == "1",
    )
