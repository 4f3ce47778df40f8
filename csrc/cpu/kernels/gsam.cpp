// Vectorised CPU kernels of GSAM (math: csrc/include/saf/multi_tensor.h, namespace gsam and
// GsamCoef): the three partial sums of one chunk, then the combined gradient
// c_new * g + c_old * old_g written into g (with the restore), or used directly by a fused
// restore + torch.optim.SGD step. Compiled once per instruction set.

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/mt_vec.h"
#include "saf/multi_tensor.h"

namespace saf::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

namespace {

namespace G = saf::mt::gsam;

template <typename acc_t>
void gsam_dots_impl(const mt::TensorEntry& t, int64_t start, int64_t n, double* out) {
  using V = Vectorized<acc_t>;
  Scratch<acc_t> s;
  V dot(acc_t(0)), oo(acc_t(0)), gg(acc_t(0));
  for (int64_t off = start; off < start + n; off += kMtBlock) {
    const int64_t m = std::min(kMtBlock, start + n - off);
    const acc_t* g = load_stream<acc_t>(t, G::G, off, m, s.a);
    const acc_t* o = load_stream<acc_t>(t, G::OLD_G, off, m, s.b);
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
      const V gv = vload(g + i, lanes), ov = vload(o + i, lanes);
      dot = dot + ov * gv;
      oo = oo + ov * ov;
      gg = gg + gv * gv;
    });
  }
  out[0] = hsum(dot);
  out[1] = hsum(oo);
  out[2] = hsum(gg);
}

template <typename acc_t>
void gsam_combine_impl(const mt::TensorEntry& t, int64_t start, int64_t n, double c_new, double c_old, bool apply,
                       bool restore, int64_t mode) {
  using V = Vectorized<acc_t>;
  Scratch<acc_t> s;
  const V vn{acc_t(c_new)}, vo{acc_t(c_old)};
  for (int64_t off = start; off < start + n; off += kMtBlock) {
    const int64_t m = std::min(kMtBlock, start + n - off);
    if (restore) {
      if (mode == mt::sam::COPY) {
        copy_stream(t, G::W, G::STASH, off, m);  // bit exact
      } else {
        acc_t* wo = out_stream<acc_t>(t, G::W, off, s.c);
        restored<acc_t>(t, off, m, mode, s.a, s.b, wo);
        store_stream<acc_t>(t, G::W, off, m, wo);
      }
    }
    if (!apply) continue;
    acc_t* g = load_stream<acc_t>(t, G::G, off, m, s.d);
    if (c_old == 0.0) {  // alpha = 0 or an undefined decomposition: old_g is not read (0 * inf)
      vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) { vstore(g + i, vn * vload(g + i, lanes), lanes); });
    } else {
      const acc_t* o = load_stream<acc_t>(t, G::OLD_G, off, m, s.e);
      vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
        vstore(g + i, vn * vload(g + i, lanes) + vo * vload(o + i, lanes), lanes);
      });
    }
    store_stream<acc_t>(t, G::G, off, m, g);
  }
}

// Restore, then torch.optim.SGD's update with the combined gradient (csrc/cpu/kernels/sam.cpp's
// order of operations). !apply: the restore only (a skipped step).
template <typename acc_t>
void gsam_sgd_impl(const mt::TensorEntry& t, int64_t start, int64_t n, double c_new, double c_old, bool apply,
                   int64_t mode) {
  using V = Vectorized<acc_t>;
  Scratch<acc_t> s;
  if (!apply) {
    gsam_combine_impl<acc_t>(t, start, n, 0.0, 0.0, false, true, mode);
    return;
  }
  const SgdVec<acc_t> sgd(t);
  const bool has_buf = sgd.has_buf;
  const V vn{acc_t(c_new)}, vo{acc_t(c_old)};
  for (int64_t off = start; off < start + n; off += kMtBlock) {
    const int64_t m = std::min(kMtBlock, start + n - off);
    acc_t* wo = out_stream<acc_t>(t, G::W, off, s.a);
    const acc_t* w = restored<acc_t>(t, off, m, mode, s.b, s.c, s.a);
    const acc_t* g = load_stream<acc_t>(t, G::G, off, m, s.b);
    // c_old == 0 (alpha = 0 or an undefined decomposition): old_g is not read (0 * inf).
    const acc_t* o = c_old != 0.0 ? load_stream<acc_t>(t, G::OLD_G, off, m, s.c) : nullptr;
    acc_t* buf = has_buf ? load_stream<acc_t>(t, G::BUF, off, m, s.d) : nullptr;
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
      V gv = vn * vload(g + i, lanes);
      if (o != nullptr) gv = gv + vo * vload(o + i, lanes);
      vstore(wo + i, sgd.step(vload(w + i, lanes), gv, buf, i, lanes), lanes);
    });
    if (has_buf) store_stream<acc_t>(t, G::BUF, off, m, buf);
    store_stream<acc_t>(t, G::W, off, m, wo);
  }
}

}  // namespace

void gsam_dots_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double* out) {
  SAF_MT_ACC_DISPATCH(t, gsam_dots_impl, t, start, n, out);
}

void gsam_combine_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double c_new, double c_old, bool apply,
                        bool restore, int64_t mode) {
  SAF_MT_ACC_DISPATCH(t, gsam_combine_impl, t, start, n, c_new, c_old, apply, restore, mode);
}

void gsam_sgd_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double c_new, double c_old, bool apply,
                    int64_t mode) {
  SAF_MT_ACC_DISPATCH(t, gsam_sgd_impl, t, start, n, c_new, c_old, apply, mode);
}

}  // namespace saf::cpu::CPU_CAPABILITY
