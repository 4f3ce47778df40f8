// Vectorised CPU kernel of LookSAM's g_v (math: csrc/include/saf/multi_tensor.h, namespace
// looksam): gv = g_s - c g written, and the sum of squares of the stored gv in the same pass.
// LookSAM's other passes are GSAM's and SAM's chunk kernels (gsam_dots, sam_norm, gsam_combine)
// over plans in their slots. Compiled once per instruction set.

#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/mt_vec.h"
#include "saf/multi_tensor.h"

namespace saf::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

namespace {

namespace L = saf::mt::looksam;

template <typename acc_t>
double looksam_gv_impl(const mt::TensorEntry& t, int64_t start, int64_t n, double c) {
  using V = Vectorized<acc_t>;
  Scratch3<acc_t> s;
  const V vc{acc_t(c)};
  SumSq<acc_t> sum;
  for (int64_t off = start; off < start + n; off += kMtBlock) {
    const int64_t m = std::min(kMtBlock, start + n - off);
    const acc_t* gs = load_stream<acc_t>(t, L::GS, off, m, s.a);
    const acc_t* g = load_stream<acc_t>(t, L::G, off, m, s.b);
    acc_t* v = out_stream<acc_t>(t, L::GV, off, s.c);
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
      vstore(v + i, vload(gs + i, lanes) - vc * vload(g + i, lanes), lanes);
    });
    store_stream<acc_t>(t, L::GV, off, m, v);
    const acc_t* stored = load_stream<acc_t>(t, L::GV, off, m, s.c);  // |gv| of gv as stored
    sum.next_block();
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) { sum.add(vload(stored + i, lanes)); });
  }
  return sum.sum();
}

}  // namespace

double looksam_gv_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double c) {
  SAF_MT_ACC_DISPATCH(t, looksam_gv_impl, t, start, n, c);
}

}  // namespace saf::cpu::CPU_CAPABILITY
