// Vectorised CPU kernels of Momentum-SAM (math: csrc/include/saf/multi_tensor.h, namespace msam,
// msam_sgd_buf, msam_adamw_moments, adamw_coefs): pass 1 un-perturbs, updates the buffer (the
// moments), steps, and sums the squares of the stored buffer (exp_avg); pass 2 re-perturbs
// w -= rho inv buf. Compiled once per instruction set.

#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/mt_vec.h"
#include "saf/multi_tensor.h"

namespace saf::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

namespace {

namespace M = saf::mt::msam;

// Pass 1's skeleton, per block of elements: update(off, m, w, g, buf, wo) puts the unperturbed
// weights into wo and the new buffer (exp_avg) into buf (and stores what else it owns); the buffer
// is stored and read back as stored; step(i, lanes, w, b) gives the weights after the step from
// the unperturbed ones and the stored buffer, whose squares are summed.
template <typename acc_t, typename Update, typename Step>
double msam_pass1(const mt::TensorEntry& t, int64_t start, int64_t n, Scratch3<acc_t>& s, Update update, Step step) {
  using V = Vectorized<acc_t>;
  SumSq<acc_t> sum;
  for (int64_t off = start; off < start + n; off += kMtBlock) {
    const int64_t m = std::min(kMtBlock, start + n - off);
    acc_t* wo = out_stream<acc_t>(t, M::W, off, s.a);
    const acc_t* w = load_stream<acc_t>(t, M::W, off, m, s.a);
    const acc_t* g = load_stream<acc_t>(t, M::G, off, m, s.b);
    acc_t* b = load_stream<acc_t>(t, M::BUF, off, m, s.c);
    update(off, m, w, g, b, wo);
    store_stream<acc_t>(t, M::BUF, off, m, b);
    const acc_t* bs = load_stream<acc_t>(t, M::BUF, off, m, s.c);  // the buffer as stored
    sum.next_block();
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
      const V bv = vload(bs + i, lanes);
      vstore(wo + i, step(i, lanes, vload(wo + i, lanes), bv), lanes);
      sum.add(bv);
    });
    store_stream<acc_t>(t, M::W, off, m, wo);
  }
  return sum.sum();
}

template <typename acc_t>
double msam_sgd_impl(const mt::TensorEntry& t, int64_t start, int64_t n, double inv_prev) {
  using V = Vectorized<acc_t>;
  Scratch3<acc_t> s;
  const V vlr{acc_t(t.param[M::LR])}, vwd{acc_t(t.param[M::WD])}, vmom{acc_t(t.param[M::MOMENTUM])};
  const V vup{acc_t(t.param[M::RHO_PREV] * inv_prev)};
  return msam_pass1<acc_t>(
      t, start, n, s,
      [&](int64_t, int64_t m, const acc_t* w, const acc_t* g, acc_t* b, acc_t* wo) {
        vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
          V wv = vload(w + i, lanes);
          vstore(b + i, mt::msam_sgd_buf<V>(wv, vload(g + i, lanes), vload(b + i, lanes), vwd, vmom, vup), lanes);
          vstore(wo + i, wv, lanes);
        });
      },
      [&](int64_t, int64_t, const V& wv, const V& bv) { return wv - vlr * bv; });
}

template <typename acc_t>
double msam_adamw_impl(const mt::TensorEntry& t, int64_t start, int64_t n, double inv_prev) {
  using V = Vectorized<acc_t>;
  Scratch<acc_t> s;
  double step_buf[1] = {0.0};
  const double step = *load_stream<double>(t, M::STEP, 0, 1, step_buf);
  const double b1 = t.param[M::BETA1], b2 = t.param[M::BETA2];
  const auto c = mt::adamw_coefs<acc_t>(t.param[M::LR], b1, b2, t.param[M::ADAMW_WD], step);
  const V vb1{acc_t(b1)}, vomb1{acc_t(1.0 - b1)}, vb2{acc_t(b2)}, vomb2{acc_t(1.0 - b2)};
  const V veps{acc_t(t.param[M::EPS])}, vstep{c.step_size}, vbc2{c.bc2_sqrt}, vdecay{c.decay};
  const V vup{acc_t(t.param[M::RHO_PREV] * inv_prev)};
  acc_t* va = nullptr;  // the block's new exp_avg_sq, unrounded (the step uses it so)
  return msam_pass1<acc_t>(
      t, start, n, s,
      [&](int64_t off, int64_t m, const acc_t* w, const acc_t* g, acc_t* ma, acc_t* wo) {
        va = load_stream<acc_t>(t, M::EXP_AVG_SQ, off, m, s.d);
        vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
          V wv = vload(w + i, lanes), vv = vload(va + i, lanes);
          vstore(ma + i,
                 mt::msam_adamw_moments<V>(wv, vload(g + i, lanes), vload(ma + i, lanes), vv, vb1, vomb1, vb2,
                                           vomb2, vup),
                 lanes);
          vstore(va + i, vv, lanes);
          vstore(wo + i, wv, lanes);
        });
        store_stream<acc_t>(t, M::EXP_AVG_SQ, off, m, va);
      },
      [&](int64_t i, int64_t lanes, const V& wv, const V& mv) {  // msam_adamw_w: the step, then the decay
        return (wv - vstep * (mv / (vload(va + i, lanes).sqrt() / vbc2 + veps))) * vdecay;
      });
}

template <typename acc_t>
void msam_perturb_impl(const mt::TensorEntry& t, int64_t start, int64_t n, double inv) {
  using V = Vectorized<acc_t>;
  Scratch3<acc_t> s;
  const V vdown{acc_t(t.param[M::RHO] * inv)};
  for (int64_t off = start; off < start + n; off += kMtBlock) {
    const int64_t m = std::min(kMtBlock, start + n - off);
    acc_t* wo = out_stream<acc_t>(t, M::W, off, s.a);
    const acc_t* w = load_stream<acc_t>(t, M::W, off, m, s.a);
    const acc_t* b = load_stream<acc_t>(t, M::BUF, off, m, s.b);
    vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
      vstore(wo + i, vload(w + i, lanes) - vdown * vload(b + i, lanes), lanes);
    });
    store_stream<acc_t>(t, M::W, off, m, wo);
  }
}

}  // namespace

double msam_sgd_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double inv_prev) {
  SAF_MT_ACC_DISPATCH(t, msam_sgd_impl, t, start, n, inv_prev);
}

double msam_adamw_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double inv_prev) {
  SAF_MT_ACC_DISPATCH(t, msam_adamw_impl, t, start, n, inv_prev);
}

void msam_perturb_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double inv) {
  SAF_MT_ACC_DISPATCH(t, msam_perturb_impl, t, start, n, inv);
}

}  // namespace saf::cpu::CPU_CAPABILITY
