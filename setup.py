"""Build saf_kernels._C.

CPU kernels are always built. CUDA kernels are built when the installed torch is a CUDA build and
nvcc is found -- never because a GPU happens to be visible. ``SAF_KERNELS_BUILD=cpu|cuda|auto``
overrides the choice (``cuda`` fails loudly when it cannot be honoured). ``SAF_KERNELS_NO_EXT=1``
skips the extension: the package then runs on its Triton and plain-PyTorch paths.

Install with ``pip install --no-build-isolation -e .`` after torch is installed.
"""

import glob
import os
import platform
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _build_mode(torch):
    from torch.utils.cpp_extension import CUDA_HOME

    requested = os.environ.get("SAF_KERNELS_BUILD", "auto").lower()
    if requested not in ("auto", "cpu", "cuda"):
        sys.exit(f"SAF_KERNELS_BUILD must be auto, cpu or cuda, not {requested!r}")
    nvcc = None
    if CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    nvcc = nvcc or shutil.which("nvcc")
    cuda_ok = torch.version.cuda is not None and nvcc is not None
    if requested == "cuda" and not cuda_ok:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "nvcc was not found"
        sys.exit(f"SAF_KERNELS_BUILD=cuda but {why}")
    if requested == "cpu":
        return "cpu"
    return "cuda" if cuda_ok else "cpu"


def _x86():
    return platform.machine().lower() in ("x86_64", "amd64")


# Kernel sources under csrc/cpu/kernels/ are compiled once per instruction set, with ATen's flags
# for that set; csrc/cpu/isa_dispatch.h picks a build at run time from at::get_cpu_capability().
ISA_FLAGS = {
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def _isas():
    return list(ISA_FLAGS) if _x86() else ["DEFAULT"]


def _build_ext_class(base):
    class BuildExt(base):
        """Compiles the per-instruction-set kernel objects, then the extension as usual."""

        def build_extension(self, ext):
            kernels = getattr(ext, "saf_isa_sources", [])
            cflags = ext.extra_compile_args
            cxx = list(cflags["cxx"] if isinstance(cflags, dict) else cflags)
            for isa in _isas():
                objects = self.compiler.compile(
                    kernels,
                    output_dir=os.path.join(self.build_temp, f"isa_{isa}"),
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs={"cxx": cxx + ISA_FLAGS[isa]},
                    depends=ext.depends,
                )
                ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    return BuildExt


def _extensions():
    if os.environ.get("SAF_KERNELS_NO_EXT") == "1":
        print("saf_kernels: SAF_KERNELS_NO_EXT=1, building no extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    mode = _build_mode(torch)
    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp", "-DSAF_KERNELS_EXT"]
    if _x86():
        cxx.append("-DSAF_KERNELS_X86")
    if os.environ.get("SAF_KERNELS_DEBUG") == "1":
        cxx = [f for f in cxx if f != "-O3"] + ["-O0", "-g"]
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    kwargs = dict(
        name="saf_kernels._C",
        include_dirs=include_dirs,
        extra_link_args=["-fopenmp"],
    )
    if mode == "cuda":
        sources += _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
        extra["cxx"].append("-DSAF_KERNELS_CUDA")
        extra["nvcc"] = ["-O3", "-lineinfo", "-DSAF_KERNELS_CUDA", "--expt-relaxed-constexpr"]
        ext = CUDAExtension(sources=sources, extra_compile_args=extra, **kwargs)
    else:
        ext = CppExtension(sources=sources, extra_compile_args=extra, **kwargs)
    ext.saf_isa_sources = _rel("csrc/cpu/kernels/*.cpp")
    ext.depends = _rel("csrc/include/saf/*.h") + _rel("csrc/cpu/*.h") + _rel("csrc/cpu/kernels/*.h") + _rel("csrc/*.h")
    print(
        f"saf_kernels: building the {mode.upper()} extension (CPU kernels for {', '.join(_isas())}; "
        f"torch {torch.__version__})"
    )
    base = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": _build_ext_class(base)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
