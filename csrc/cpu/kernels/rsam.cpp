// Vectorised CPU kernels of R-SAM (math: csrc/include/saf/multi_tensor.h, namespace rsam).
// rsam_noise_chunk works on whole rows (output units) of one tensor; rsam_norm_chunk and
// rsam_perturb_chunk on plain element chunks. Compiled once per instruction set.

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/mt_vec.h"
#include "cpu/kernels/rng_vec.h"
#include "saf/multi_tensor.h"

namespace saf::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

namespace {

namespace R = saf::mt::rsam;

template <typename acc_t>
struct RsamScratch : Scratch3<acc_t> {
  alignas(64) uint32_t words[words_for(kMtBlock)];
  alignas(64) float u1[words_for(kMtBlock) / 2];
  alignas(64) float u2[words_for(kMtBlock) / 2];
  alignas(64) float normals[words_for(kMtBlock)];
};

template <typename acc_t>
void rsam_noise_impl(const mt::TensorEntry& t, int64_t row0, int64_t nrows, uint64_t key, uint64_t offset) {
  using V = Vectorized<acc_t>;
  RsamScratch<acc_t> s;
  const int64_t len = int64_t(t.param[R::ROW_LEN]);
  const bool vector = (t.flags & R::kVector) != 0;
  const double stdev = t.param[R::STD];
  for (int64_t r = row0; r < row0 + nrows; ++r) {
    const int64_t begin = r * len, end = begin + len;
    // The unit's norm, from the weights before the noise.
    double ss = 0;
    for (int64_t off = begin; off < end; off += kMtBlock) {
      const int64_t m = std::min(kMtBlock, end - off);
      const acc_t* w = load_stream<acc_t>(t, R::W, off, m, s.a);
      V acc(acc_t(0));
      vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
        const V x = vload(w + i, lanes);
        acc = acc + x * x;
      });
      ss += hsum(acc);
    }
    const V scale(acc_t(stdev * (std::sqrt(ss) + (vector ? R::kVectorEps : 0.0))));
    for (int64_t off = begin; off < end; off += kMtBlock) {
      const int64_t m = std::min(kMtBlock, end - off);
      copy_stream(t, R::STASH, R::W, off, m);
      const float* z = normals_at(key, offset, uint64_t(t.rng_offset + off), m, s.words, s.u1, s.u2, s.normals);
      acc_t* zc = s.c;
      for (int64_t i = 0; i < m; ++i) zc[i] = acc_t(z[i]);
      const acc_t* w = load_stream<acc_t>(t, R::W, off, m, s.a);
      acc_t* wo = out_stream<acc_t>(t, R::W, off, s.b);
      vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
        vstore(wo + i, vload(w + i, lanes) + scale * vload(zc + i, lanes), lanes);
      });
      store_stream<acc_t>(t, R::W, off, m, wo);
    }
  }
}

// d = lam * g * inv_scale + (w - stash)
template <typename acc_t>
inline void direction(const mt::TensorEntry& t, int64_t off, int64_t m, acc_t lam_inv, RsamScratch<acc_t>& s,
                      acc_t* d) {
  using V = Vectorized<acc_t>;
  const acc_t* g = load_stream<acc_t>(t, R::G, off, m, s.a);
  const acc_t* w = load_stream<acc_t>(t, R::W, off, m, s.b);
  const acc_t* st = load_stream<acc_t>(t, R::STASH, off, m, s.c);
  const V vl(lam_inv);
  vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
    vstore(d + i, vl * vload(g + i, lanes) + (vload(w + i, lanes) - vload(st + i, lanes)), lanes);
  });
}

template <typename acc_t>
double rsam_norm_impl(const mt::TensorEntry& t, int64_t start, int64_t n, double lam, double inv_scale) {
  using V = Vectorized<acc_t>;
  RsamScratch<acc_t> s;
  alignas(64) acc_t d[kMtBlock];
  SumSq<acc_t> acc;
  for (int64_t off = start; off < start + n; off += kMtBlock) {
    const int64_t m = std::min(kMtBlock, start + n - off);
    direction<acc_t>(t, off, m, acc_t(lam * inv_scale), s, d);
    acc.next_block();
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) { acc.add(vload(d + i, lanes)); });
  }
  return acc.sum();
}

template <typename acc_t>
void rsam_perturb_impl(const mt::TensorEntry& t, int64_t start, int64_t n, double lam, double inv_scale,
                       double coef) {
  using V = Vectorized<acc_t>;
  RsamScratch<acc_t> s;
  alignas(64) acc_t d[kMtBlock];
  const V vrc(acc_t(t.param[R::RHO] * coef));
  for (int64_t off = start; off < start + n; off += kMtBlock) {
    const int64_t m = std::min(kMtBlock, start + n - off);
    if (coef == 0.0) {  // perturb nothing: back to the clean weights, bit exact
      copy_stream(t, R::W, R::STASH, off, m);
      continue;
    }
    direction<acc_t>(t, off, m, acc_t(lam * inv_scale), s, d);
    const acc_t* st = load_stream<acc_t>(t, R::STASH, off, m, s.c);
    acc_t* wo = out_stream<acc_t>(t, R::W, off, s.a);
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
      vstore(wo + i, vload(st + i, lanes) + vrc * vload(d + i, lanes), lanes);
    });
    store_stream<acc_t>(t, R::W, off, m, wo);
  }
}

}  // namespace

void rsam_noise_chunk(const mt::TensorEntry& t, int64_t row0, int64_t nrows, uint64_t key, uint64_t offset) {
  SAF_MT_ACC_DISPATCH(t, rsam_noise_impl, t, row0, nrows, key, offset);
}

double rsam_norm_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double lam, double inv_scale) {
  SAF_MT_ACC_DISPATCH(t, rsam_norm_impl, t, start, n, lam, inv_scale);
}

void rsam_perturb_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double lam, double inv_scale,
                        double coef) {
  SAF_MT_ACC_DISPATCH(t, rsam_perturb_impl, t, start, n, lam, inv_scale, coef);
}

}  // namespace saf::cpu::CPU_CAPABILITY
