// Counter-based random numbers shared by the CPU and CUDA kernels (ESAM's Bernoulli mask, R-SAM's
// Gaussian noise): Philox4x32-10 (Salmon et al., SC'11), bit for bit the generator of Triton's
// tl.randint4x / tl.rand4x / tl.randn4x, so that the Triton kernels can call those directly.
// No torch headers: .cu files include this.
//
// Stream layout (the same on every backend):
//   key     = the 64-bit seed (k0 = low word, k1 = high word)
//   counter = offset + pos / 4  (c0 = low word, c1 = high word, c2 = c3 = 0)
//   value   = output word pos % 4 of that counter
// where pos is the element's position in the tensor list: its index inside its tensor plus the
// tensor's rng_offset. The ops here pad every tensor's rng_offset to a multiple of 4
// (pad_rng_offsets in csrc/mt_rng_plan.h), so that the 4 words of one counter serve 4
// neighbouring elements of one tensor: one Philox evaluation per 4 elements, and a 4-wide CUDA
// access needs one. Nothing is stored: a mask or noise is regenerated from (seed, offset, pos).
//
// Integer outputs (raw words, Bernoulli decisions) are identical on every backend. Floats go
// through float32 log / cos / sin, whose last bit differs between libm, CUDA and Triton: normals
// agree to a few float32 ulps across backends, and exactly within one backend.
#pragma once

#include <cmath>
#include <cstdint>

#include "saf/common.h"

#if defined(__CUDACC__)
#define SAF_RNG_FN __host__ __device__ __forceinline__
#else
#define SAF_RNG_FN static inline
#endif

namespace saf::rng {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // multiplies c0
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // multiplies c2
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key increments (golden ratio, sqrt(3) - 1)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
// A Bernoulli(p) draw compares the top 24 bits of a word with round-down(p * 2^24).
constexpr int kBernoulliBits = 24;
constexpr uint32_t kBernoulliOne = 1u << kBernoulliBits;

struct Words {
  uint32_t w[4];
};

SAF_RNG_FN uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * uint64_t(b)) >> 32);
#endif
}

// The 4 words of counter (ctr_lo, ctr_hi, 0, 0) under key (k0, k1).
SAF_RNG_FN Words philox4x32_10(uint64_t ctr, uint64_t key) {
  uint32_t c0 = uint32_t(ctr), c1 = uint32_t(ctr >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(key), k1 = uint32_t(key >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t n0 = mulhi(kPhiloxM1, c2) ^ c1 ^ k0;
    const uint32_t n2 = mulhi(kPhiloxM0, c0) ^ c3 ^ k1;
    const uint32_t n1 = kPhiloxM1 * c2;
    const uint32_t n3 = kPhiloxM0 * c0;
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  Words out;
  out.w[0] = c0;
  out.w[1] = c1;
  out.w[2] = c2;
  out.w[3] = c3;
  return out;
}

// The counter of position pos (see the layout above).
SAF_RNG_FN uint64_t counter_of(uint64_t offset, uint64_t pos) { return offset + (pos >> 2); }

// Triton's uint_to_uniform_float for 32-bit words: a float32 in [0, 1).
SAF_RNG_FN float uniform(uint32_t x) {
  int32_t i = int32_t(x);
  i = i < 0 ? ~i : i;
  return float(i) * 4.6566127342e-10f;
}

// Bernoulli draw: true with probability threshold / 2^24 (threshold from bernoulli_threshold).
SAF_RNG_FN bool keep(uint32_t x, uint32_t threshold) { return (x >> (32 - kBernoulliBits)) < threshold; }

// round-down(p * 2^24), p in [0, 1]: p = 1 keeps everything, p = 0.5 is exact.
SAF_RNG_FN uint32_t bernoulli_threshold(double p) {
  if (!(p > 0.0)) return 0u;
  if (p >= 1.0) return kBernoulliOne;
  return uint32_t(p * double(kBernoulliOne));
}

// Triton's pair_uniform_to_normal (Box-Muller) in float32: word pair (a, b) -> (r cos t, r sin t).
SAF_RNG_FN void normal_pair(uint32_t a, uint32_t b, float& n0, float& n1) {
  float u1 = uniform(a);
  const float u2 = uniform(b);
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float th = 6.2831855f * u2;
  const float r = sqrtf(-2.0f * logf(u1));
  n0 = r * cosf(th);
  n1 = r * sinf(th);
}

// The 4 standard normals of one counter (Triton's randn4x): words (0,1) -> normals 0, 1 and
// words (2,3) -> normals 2, 3.
struct Normals {
  float n[4];
};

SAF_RNG_FN Normals normals(const Words& w) {
  Normals out;
  normal_pair(w.w[0], w.w[1], out.n[0], out.n[1]);
  normal_pair(w.w[2], w.w[3], out.n[2], out.n[3]);
  return out;
}

}  // namespace saf::rng
