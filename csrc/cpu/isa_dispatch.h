// Run-time choice among the per-instruction-set builds of csrc/cpu/isa/*.cpp.
#pragma once

#include <ATen/Version.h>

#include <cstdlib>
#include <cstring>

namespace saf::cpu {

enum class Isa { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

inline Isa parse_isa(const char* s, Isa fallback) {
  if (s == nullptr) return fallback;
  if (std::strcmp(s, "AVX512") == 0 || std::strcmp(s, "avx512") == 0) return Isa::AVX512;
  if (std::strcmp(s, "AVX2") == 0 || std::strcmp(s, "avx2") == 0) return Isa::AVX2;
  if (std::strcmp(s, "DEFAULT") == 0 || std::strcmp(s, "default") == 0) return Isa::DEFAULT;
  return fallback;
}

// What ATen detected (honours ATEN_CPU_CAPABILITY), lowered by SAF_KERNELS_CPU_ISA if that is set
// (tests use it to run every build on one machine); never above what the CPU supports.
inline Isa cpu_isa() {
#if defined(SAF_KERNELS_X86)
  static const Isa detected = parse_isa(at::get_cpu_capability().c_str(), Isa::DEFAULT);
  const Isa requested = parse_isa(std::getenv("SAF_KERNELS_CPU_ISA"), detected);
  return requested < detected ? requested : detected;
#else
  return Isa::DEFAULT;
#endif
}

// The build of kernel `name` (declared once per instruction set, csrc/cpu/kernels/kernels.h) for
// isa, as a function pointer.
#if defined(SAF_KERNELS_X86)
#define SAF_ISA_PICK(isa, name) \
  ((isa) == Isa::AVX512 ? &AVX512::name : (isa) == Isa::AVX2 ? &AVX2::name : &DEFAULT::name)
#else
#define SAF_ISA_PICK(isa, name) (&DEFAULT::name)
#endif

}  // namespace saf::cpu
