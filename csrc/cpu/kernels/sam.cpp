// Vectorised CPU kernels of the SAM family over one chunk of one tensor of a multi-tensor plan
// (layout and per-element math: csrc/include/saf/multi_tensor.h). Compiled once per instruction
// set like csrc/cpu/kernels/trajectory_loss.cpp; csrc/cpu/sam.cpp splits the chunks over
// threads and picks the build at run time.
//
// Every kernel works through a chunk in blocks of kMtBlock elements: streams whose dtype is the
// accumulation type are used in place, others are widened into L1-resident scratch and narrowed
// back, so float32 runs at memory speed and mixed bfloat16/float32 lists need no second launch.

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/mt_vec.h"
#include "saf/multi_tensor.h"

namespace saf::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

namespace {

template <typename acc_t>
double sam_norm_impl(const mt::TensorEntry& t, int64_t start, int64_t n) {
  using V = Vectorized<acc_t>;
  Scratch<acc_t> s;
  const bool adaptive = (t.flags & mt::sam::kAdaptive) != 0;
  const V veta(acc_t(t.param[mt::sam::ETA]));
  SumSq<acc_t> acc;
  for (int64_t off = start; off < start + n; off += kMtBlock) {
    const int64_t m = std::min(kMtBlock, start + n - off);
    const acc_t* g = load_stream<acc_t>(t, mt::sam::G, off, m, s.a);
    const acc_t* w = adaptive ? load_stream<acc_t>(t, mt::sam::W, off, m, s.b) : nullptr;
    acc.next_block();
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
      V x = vload(g + i, lanes);
      if (adaptive) x = x * (vload(w + i, lanes).abs() + veta);
      acc.add(x);
    });
  }
  return acc.sum();
}

template <typename acc_t>
void sam_perturb_impl(const mt::TensorEntry& t, int64_t start, int64_t n, double coef, int64_t mode) {
  using V = Vectorized<acc_t>;
  Scratch<acc_t> s;
  const bool adaptive = (t.flags & mt::sam::kAdaptive) != 0;
  const acc_t rc = acc_t(t.param[mt::sam::RHO] * coef);
  const V vrc(rc), veta(acc_t(t.param[mt::sam::ETA]));
  const bool skip = coef == 0.0;  // perturb nothing; keep the stash consistent for the restore
  for (int64_t off = start; off < start + n; off += kMtBlock) {
    const int64_t m = std::min(kMtBlock, start + n - off);
    if (mode == mt::sam::COPY) {
      copy_stream(t, mt::sam::STASH, mt::sam::W, off, m);
      if (skip) continue;
    } else if (skip) {
      std::fill(s.c, s.c + m, acc_t(0));
      store_stream<acc_t>(t, mt::sam::STASH, off, m, s.c);
      continue;
    }
    acc_t* w = load_stream<acc_t>(t, mt::sam::W, off, m, s.a);
    const acc_t* g = load_stream<acc_t>(t, mt::sam::G, off, m, s.b);
    acc_t* e = s.c;
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
      const V gv = vload(g + i, lanes);
      V x = vrc * gv;
      if (adaptive) {
        const V tw = vload(w + i, lanes).abs() + veta;
        x = x * (tw * tw);
      }
      vstore(e + i, x, lanes);
    });
    const acc_t* ed = mode == mt::sam::DELTA ? store_delta<acc_t>(t, off, m, e, s.d) : e;
    acc_t* wo = out_stream<acc_t>(t, mt::sam::W, off, s.a);
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) { vstore(wo + i, vload(w + i, lanes) + vload(ed + i, lanes), lanes); });
    store_stream<acc_t>(t, mt::sam::W, off, m, wo);
  }
}

template <typename acc_t>
void sam_restore_impl(const mt::TensorEntry& t, int64_t start, int64_t n, int64_t mode) {
  if (mode == mt::sam::COPY) {
    copy_stream(t, mt::sam::W, mt::sam::STASH, start, n);  // bit exact
    return;
  }
  Scratch<acc_t> s;
  for (int64_t off = start; off < start + n; off += kMtBlock) {
    const int64_t m = std::min(kMtBlock, start + n - off);
    acc_t* out = out_stream<acc_t>(t, mt::sam::W, off, s.c);
    restored<acc_t>(t, off, m, mode, s.a, s.b, out);
    store_stream<acc_t>(t, mt::sam::W, off, m, out);
  }
}

template <typename acc_t>
void sgd_impl(const mt::TensorEntry& t, int64_t start, int64_t n, int64_t mode, double inv_scale) {
  using V = Vectorized<acc_t>;
  namespace S = mt::sgd;
  Scratch<acc_t> s;
  const SgdVec<acc_t> sgd(t);
  const bool has_buf = sgd.has_buf;
  const V vinv = V(acc_t(inv_scale));
  const bool unscale = inv_scale != 1.0;
  for (int64_t off = start; off < start + n; off += kMtBlock) {
    const int64_t m = std::min(kMtBlock, start + n - off);
    acc_t* wo = out_stream<acc_t>(t, S::W, off, s.a);
    const acc_t* w = restored<acc_t>(t, off, m, mode, s.b, s.c, s.a);
    const acc_t* g = load_stream<acc_t>(t, S::G, off, m, s.d);
    acc_t* buf = has_buf ? load_stream<acc_t>(t, S::BUF, off, m, s.e) : nullptr;
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
      V gv = vload(g + i, lanes);
      if (unscale) gv = gv * vinv;
      vstore(wo + i, sgd.step(vload(w + i, lanes), gv, buf, i, lanes), lanes);
    });
    if (has_buf) store_stream<acc_t>(t, S::BUF, off, m, buf);
    store_stream<acc_t>(t, S::W, off, m, wo);
  }
}

template <typename acc_t>
void adamw_impl(const mt::TensorEntry& t, int64_t start, int64_t n, int64_t mode, double inv_scale) {
  using V = Vectorized<acc_t>;
  namespace A = mt::adamw;
  Scratch<acc_t> s;
  acc_t step_buf[1] = {acc_t(0)};
  const double step = double(*load_stream<acc_t>(t, A::STEP, 0, 1, step_buf));
  const auto c = mt::adamw_coefs<acc_t>(t.param[A::LR], t.param[A::BETA1], t.param[A::BETA2], t.param[A::WD], step);
  const acc_t beta1 = acc_t(t.param[A::BETA1]), beta2 = acc_t(t.param[A::BETA2]), eps = acc_t(t.param[A::EPS]);
  const bool maximize = t.flags & A::kMaximize;
  const acc_t wm = acc_t(1) - beta1;  // lerp weight of exp_avg towards g
  const bool small = wm < acc_t(0.5);
  const V vdecay(c.decay), vstep(c.step_size), vbc2(c.bc2_sqrt), vb2(beta2), v1b2(acc_t(1) - beta2), veps(eps);
  const V vwm(wm), v1wm(acc_t(1) - wm);
  const V vinv = V(acc_t(inv_scale));
  const bool unscale = inv_scale != 1.0;
  for (int64_t off = start; off < start + n; off += kMtBlock) {
    const int64_t m = std::min(kMtBlock, start + n - off);
    acc_t* wo = out_stream<acc_t>(t, A::W, off, s.a);
    const acc_t* w = restored<acc_t>(t, off, m, mode, s.b, s.c, s.a);
    const acc_t* g = load_stream<acc_t>(t, A::G, off, m, s.b);
    acc_t* ma = load_stream<acc_t>(t, A::EXP_AVG, off, m, s.d);
    acc_t* va = load_stream<acc_t>(t, A::EXP_AVG_SQ, off, m, s.e);
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
      V gv = vload(g + i, lanes);
      if (unscale) gv = gv * vinv;
      if (maximize) gv = V(acc_t(0)) - gv;
      const V wv = vload(w + i, lanes) * vdecay;
      V mv = vload(ma + i, lanes);
      mv = small ? mv + vwm * (gv - mv) : gv - (gv - mv) * v1wm;
      const V vv = vload(va + i, lanes) * vb2 + v1b2 * gv * gv;
      vstore(ma + i, mv, lanes);
      vstore(va + i, vv, lanes);
      const V denom = vv.sqrt() / vbc2 + veps;
      vstore(wo + i, wv - vstep * (mv / denom), lanes);
    });
    store_stream<acc_t>(t, A::EXP_AVG, off, m, ma);
    store_stream<acc_t>(t, A::EXP_AVG_SQ, off, m, va);
    store_stream<acc_t>(t, A::W, off, m, wo);
  }
}

}  // namespace

double sam_norm_chunk(const mt::TensorEntry& t, int64_t start, int64_t n) {
  SAF_MT_ACC_DISPATCH(t, sam_norm_impl, t, start, n);
}

void sam_perturb_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double coef, int64_t mode) {
  SAF_MT_ACC_DISPATCH(t, sam_perturb_impl, t, start, n, coef, mode);
}

void sam_restore_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, int64_t mode) {
  SAF_MT_ACC_DISPATCH(t, sam_restore_impl, t, start, n, mode);
}

void sam_restore_sgd_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, int64_t mode, double inv_scale) {
  SAF_MT_ACC_DISPATCH(t, sgd_impl, t, start, n, mode, inv_scale);
}

void sam_restore_adamw_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, int64_t mode, double inv_scale) {
  SAF_MT_ACC_DISPATCH(t, adamw_impl, t, start, n, mode, inv_scale);
}

}  // namespace saf::cpu::CPU_CAPABILITY
