// Blocks of Philox random numbers for the per-instruction-set CPU kernels (esam.cpp, rsam.cpp):
// the same streams as csrc/include/saf/philox.h, generated several counters at a time so that
// the compiler vectorises the 32x32->64-bit products (vpmuludq) and the float conversions.
//
// Included only by files compiled once per instruction set (everything lives in
// saf::cpu::CPU_CAPABILITY).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#include "saf/philox.h"

namespace saf::cpu::CPU_CAPABILITY {

// Counters per lane group: enough independent work to fill the vector units.
constexpr int kPhiloxLanes = 8;

// The 4 words of each counter in [c0, c0 + nc), into words[4 * j + k] (k = word index).
inline void philox_words(uint64_t key, uint64_t c0, int64_t nc, uint32_t* words) {
  using namespace saf::rng;
  constexpr int L = kPhiloxLanes;
  int64_t j = 0;
  for (; j + L <= nc; j += L) {
    uint32_t a0[L], a1[L], a2[L], a3[L];
    for (int l = 0; l < L; ++l) {
      const uint64_t c = c0 + uint64_t(j + l);
      a0[l] = uint32_t(c);
      a1[l] = uint32_t(c >> 32);
      a2[l] = 0;
      a3[l] = 0;
    }
    uint32_t k0 = uint32_t(key), k1 = uint32_t(key >> 32);
    for (int r = 0; r < 10; ++r) {
      for (int l = 0; l < L; ++l) {
        const uint64_t p0 = uint64_t(kPhiloxM0) * a0[l];
        const uint64_t p1 = uint64_t(kPhiloxM1) * a2[l];
        const uint32_t n0 = uint32_t(p1 >> 32) ^ a1[l] ^ k0;
        const uint32_t n2 = uint32_t(p0 >> 32) ^ a3[l] ^ k1;
        a1[l] = uint32_t(p1);
        a3[l] = uint32_t(p0);
        a0[l] = n0;
        a2[l] = n2;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int l = 0; l < L; ++l) {
      uint32_t* w = words + 4 * (j + l);
      w[0] = a0[l];
      w[1] = a1[l];
      w[2] = a2[l];
      w[3] = a3[l];
    }
  }
  for (; j < nc; ++j) {
    const saf::rng::Words w = philox4x32_10(c0 + uint64_t(j), key);
    for (int k = 0; k < 4; ++k) words[4 * j + k] = w.w[k];
  }
}

// Words needed for m positions starting at pos: scratch of at least words_for(m) uint32.
constexpr int64_t words_for(int64_t m) { return (m / 4 + 2) * 4; }

// The words of positions [pos, pos + m): returns a pointer p with p[i] = word of position pos + i.
inline const uint32_t* position_words(uint64_t key, uint64_t offset, uint64_t pos, int64_t m, uint32_t* scratch) {
  const uint64_t first = pos >> 2, last = (pos + uint64_t(m) - 1) >> 2;
  philox_words(key, offset + first, int64_t(last - first + 1), scratch);
  return scratch + (pos & 3);
}

// Bernoulli keep flags (1 or 0 in acc_t) of positions [pos, pos + m).
template <typename acc_t>
inline void keep_flags(uint64_t key, uint64_t offset, uint64_t pos, int64_t m, uint32_t threshold, uint32_t* scratch,
                       acc_t* out) {
  const uint32_t* w = position_words(key, offset, pos, m, scratch);
  for (int64_t i = 0; i < m; ++i) out[i] = saf::rng::keep(w[i], threshold) ? acc_t(1) : acc_t(0);
}

// Standard normals of positions [pos, pos + m) (Triton's randn4x layout: words (0,1) of a counter
// give normals 0 and 1, words (2,3) normals 2 and 3), Box-Muller vectorised with at::vec's
// log / sqrt / cos / sin (Sleef on AVX2 / AVX512). scratch: words_for(m) words; u1, u2: at least
// words_for(m) / 2 floats each; normals: words_for(m) floats.
inline const float* normals_at(uint64_t key, uint64_t offset, uint64_t pos, int64_t m, uint32_t* scratch, float* u1,
                               float* u2, float* normals) {
  using V = at::vec::Vectorized<float>;
  const uint64_t first = pos >> 2, last = (pos + uint64_t(m) - 1) >> 2;
  const int64_t nc = int64_t(last - first + 1);
  philox_words(key, offset + first, nc, scratch);
  const int64_t np = 2 * nc;  // pairs
  for (int64_t q = 0; q < np; ++q) {
    u1[q] = saf::rng::uniform(scratch[2 * q]);
    u2[q] = saf::rng::uniform(scratch[2 * q + 1]);
  }
  const V lo(1.0e-7f), m2(-2.0f), two_pi(6.2831855f);
  int64_t q = 0;
  for (; q + V::size() <= np; q += V::size()) {
    const V a = at::vec::maximum(V::loadu(u1 + q), lo);
    const V th = two_pi * V::loadu(u2 + q);
    const V r = (m2 * a.log()).sqrt();
    (r * th.cos()).store(u1 + q);
    (r * th.sin()).store(u2 + q);
  }
  for (; q < np; ++q) {
    float n0, n1;
    saf::rng::normal_pair(scratch[2 * q], scratch[2 * q + 1], n0, n1);
    u1[q] = n0;
    u2[q] = n1;
  }
  for (int64_t p = 0; p < np; ++p) {
    normals[2 * p] = u1[p];
    normals[2 * p + 1] = u2[p];
  }
  return normals + (pos & 3);
}

}  // namespace saf::cpu::CPU_CAPABILITY
