// Vectorised CPU kernels of ESAM's stochastic weight perturbation over one chunk of one tensor
// (math: csrc/include/saf/multi_tensor.h, namespace esam; random numbers: saf/philox.h).
// Compiled once per instruction set like csrc/cpu/kernels/sam.cpp; csrc/cpu/esam.cpp splits the
// chunks over threads. The keep mask is generated per block of kMtBlock elements into L1 scratch
// and never stored: the norm pass and the perturbation pass each regenerate it.

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/mt_vec.h"
#include "cpu/kernels/rng_vec.h"
#include "saf/multi_tensor.h"
#include "saf/philox.h"

namespace saf::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

namespace {

namespace E = saf::mt::esam;

template <typename acc_t>
struct EsamScratch : Scratch3<acc_t> {
  alignas(64) acc_t keep[kMtBlock];
  alignas(64) uint32_t words[words_for(kMtBlock)];
};

template <typename acc_t>
double esam_norm_impl(const mt::TensorEntry& t, int64_t start, int64_t n, uint64_t key, uint64_t offset) {
  using V = Vectorized<acc_t>;
  EsamScratch<acc_t> s;
  const bool adaptive = (t.flags & E::kAdaptive) != 0;
  const uint32_t thr = saf::rng::bernoulli_threshold(t.param[E::BETA]);
  const V veta(acc_t(t.param[E::ETA])), zero(acc_t(0));
  SumSq<acc_t> acc;
  for (int64_t off = start; off < start + n; off += kMtBlock) {
    const int64_t m = std::min(kMtBlock, start + n - off);
    keep_flags<acc_t>(key, offset, uint64_t(t.rng_offset + off), m, thr, s.words, s.keep);
    const acc_t* g = load_stream<acc_t>(t, E::G, off, m, s.a);
    const acc_t* w = adaptive ? load_stream<acc_t>(t, E::W, off, m, s.b) : nullptr;
    acc.next_block();
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
      V x = vload(g + i, lanes);
      if (adaptive) x = x * (vload(w + i, lanes).abs() + veta);
      // A select, not a product: a dropped element's inf / NaN gradient must not reach the norm.
      acc.add(V::blendv(zero, x, vload(s.keep + i, lanes) != zero));
    });
  }
  return acc.sum();
}

template <typename acc_t>
void esam_perturb_impl(const mt::TensorEntry& t, int64_t start, int64_t n, double coef, int64_t mode, uint64_t key,
                       uint64_t offset) {
  using V = Vectorized<acc_t>;
  EsamScratch<acc_t> s;
  const bool adaptive = (t.flags & E::kAdaptive) != 0;
  const double beta = t.param[E::BETA];
  const uint32_t thr = saf::rng::bernoulli_threshold(beta);
  const V vrc(acc_t(t.param[E::RHO] / beta * coef)), veta(acc_t(t.param[E::ETA])), zero(acc_t(0));
  const bool skip = coef == 0.0;  // perturb nothing; the stash still serves the restore
  for (int64_t off = start; off < start + n; off += kMtBlock) {
    const int64_t m = std::min(kMtBlock, start + n - off);
    if (mode == mt::sam::COPY) {
      copy_stream(t, E::STASH, E::W, off, m);
      if (skip) continue;
    } else if (skip) {
      std::fill(s.c, s.c + m, acc_t(0));
      store_stream<acc_t>(t, E::STASH, off, m, s.c);
      continue;
    }
    keep_flags<acc_t>(key, offset, uint64_t(t.rng_offset + off), m, thr, s.words, s.keep);
    acc_t* w = load_stream<acc_t>(t, E::W, off, m, s.a);
    const acc_t* g = load_stream<acc_t>(t, E::G, off, m, s.b);
    acc_t* e = s.c;
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
      V x = vrc * vload(g + i, lanes);
      if (adaptive) {
        const V tw = vload(w + i, lanes).abs() + veta;
        x = x * (tw * tw);
      }
      vstore(e + i, V::blendv(zero, x, vload(s.keep + i, lanes) != zero), lanes);
    });
    // Delta mode: add exactly what the restore subtracts, e rounded to the stash's dtype.
    const acc_t* ed = mode == mt::sam::DELTA ? store_delta<acc_t>(t, off, m, e, s.b) : e;
    acc_t* wo = out_stream<acc_t>(t, E::W, off, s.a);
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
      // Dropped elements keep their exact bits (w + 0 would turn -0.0 into +0.0).
      const V wv = vload(w + i, lanes);
      vstore(wo + i, V::blendv(wv, wv + vload(ed + i, lanes), vload(s.keep + i, lanes) != zero), lanes);
    });
    store_stream<acc_t>(t, E::W, off, m, wo);
  }
}

template <typename acc_t>
void esam_restore_impl(const mt::TensorEntry& t, int64_t start, int64_t n, int64_t mode, uint64_t key,
                       uint64_t offset) {
  using V = Vectorized<acc_t>;
  if (mode == mt::sam::COPY) {
    copy_stream(t, E::W, E::STASH, start, n);  // bit exact; the mask is not needed
    return;
  }
  // Delta mode: the mask is regenerated, so only the perturbed elements are touched and every
  // dropped element keeps its exact bits.
  EsamScratch<acc_t> s;
  const uint32_t thr = saf::rng::bernoulli_threshold(t.param[E::BETA]);
  const V zero(acc_t(0));
  for (int64_t off = start; off < start + n; off += kMtBlock) {
    const int64_t m = std::min(kMtBlock, start + n - off);
    keep_flags<acc_t>(key, offset, uint64_t(t.rng_offset + off), m, thr, s.words, s.keep);
    const acc_t* w = load_stream<acc_t>(t, E::W, off, m, s.a);
    const acc_t* e = load_stream<acc_t>(t, E::STASH, off, m, s.b);
    acc_t* wo = out_stream<acc_t>(t, E::W, off, s.c);
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
      const V wv = vload(w + i, lanes);
      vstore(wo + i, V::blendv(wv, wv - vload(e + i, lanes), vload(s.keep + i, lanes) != zero), lanes);
    });
    store_stream<acc_t>(t, E::W, off, m, wo);
  }
}

}  // namespace

double esam_norm_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, uint64_t key, uint64_t offset) {
  SAF_MT_ACC_DISPATCH(t, esam_norm_impl, t, start, n, key, offset);
}

void esam_perturb_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double coef, int64_t mode, uint64_t key,
                        uint64_t offset) {
  SAF_MT_ACC_DISPATCH(t, esam_perturb_impl, t, start, n, coef, mode, key, offset);
}

void esam_restore_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, int64_t mode, uint64_t key,
                        uint64_t offset) {
  SAF_MT_ACC_DISPATCH(t, esam_restore_impl, t, start, n, mode, key, offset);
}

}  // namespace saf::cpu::CPU_CAPABILITY
