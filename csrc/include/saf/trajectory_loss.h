// Row math of the fused trajectory loss, shared by the CPU and CUDA kernels.
//
// For one row with logits z, target logits t (both length C), temperature T, and either a class
// label y or a row of probability targets y_c ("soft" targets: mixup, cutmix):
//   q = softmax(z / T), p = softmax(t / T), s = softmax(z)
//   KL  = sum_c p_c (log p_c - log q_c)                         (KL(p || q), as the SAF code)
//   CE  = logsumexp(z) - (1 - eps) z_y - (eps / C) sum_c z_c     (class label; label smoothing eps)
//   CE  = -sum_c y_c log s_c                                     (probability targets; no smoothing)
//   row loss  = scale * (ce_weight * CE + kl_weight * T^2 * KL)
//   d/dz_c    = scale * (ce_weight * (s_c - (1 - eps) [c == y] - eps / C) + kl_weight * T * (q_c - p_c))
//   d/dz_c    = scale * (ce_weight * (S_y s_c - y_c) + kl_weight * T * (q_c - p_c))   (soft, S_y = sum y)
// where scale is 1, or 1 / (number of rows not ignored) for the "mean" reduction, so that the
// gradient written in the forward pass is already that of the reduced loss.
//
// Precision: KL is taken from per-element log-ratios (a second pass over the row),
//   KL = sum_c p_c ((t_c - mt) - (z_c - mz)) / T + log1p(sum_c (q'_c - p'_c) / st)
// (q'_c, p'_c the unnormalised exps below), never as a difference of row-wide sums, which cancel
// when the two distributions are nearly equal and the logits large (a loss of 1e-7 from terms of
// 10). The differences q'_c - p'_c are taken as p'_c expm1(v_c), v_c = ((z_c - mz) - (t_c - mt)) / T,
// where |v_c| is small (else q'_c - p'_c, which does not cancel): then the error of the fast exps
// (exp_u20 on the CPU, __expf and ex2.approx on GPUs) enters the two terms of KL alike and cancels,
// and log1p of the sum, not log(sz / st), is not rounded near 1. This keeps the error below that of
// the plain float32 formula (log_softmax, then sum p (log p - log q)) on such rows. The soft
// cross-entropy likewise sums y_c (z_c - mz), not y_c z_c.
//
// Rows whose label equals ignore_index get loss 0 and gradient 0. A label outside [0, C) is an
// error: the CPU kernel reports it, the GPU kernels write NaN into that row (loss and gradient).
// Probability targets have no ignored rows; a row with a negative or non-finite probability is an
// error in the same way (reported by the CPU kernel, NaN on the GPU kernels).
// A row with any NaN or +-inf in z or t gets NaN loss and NaN gradient on every kernel (found by
// summing x - x, which is 0 for finite x and NaN otherwise; fast exp approximations would not
// propagate NaN reliably on their own). A row that takes part in neither term (a bank row without
// labels and without a past entry) is not read: loss 0, gradient 0, whatever its values.
#pragma once

#include "saf/common.h"

namespace saf {

enum class Reduction : int64_t { None = 0, Sum = 1, Mean = 2 };

struct TrajectoryParams {
  double temperature;
  double ce_weight;
  double kl_weight;
  double label_smoothing;
  int64_t ignore_index;
  double scale;  // multiplies every row loss and gradient (host value)
};

// Everything a kernel needs, as raw pointers. Rows are contiguous; row strides in elements.
struct TrajectoryArgs {
  const void* logits;
  const void* target;
  const int64_t* labels;  // nullptr: no cross-entropy term
  void* grad;             // nullptr: loss only
  void* row_loss;         // [B], float64 if either input is float64, else float32
  const void* scale_dev;  // optional device scalar (accumulation type) multiplying p.scale
  int64_t rows;
  int64_t cols;
  int64_t logits_stride;
  int64_t target_stride;
  int64_t grad_stride;
  DType logits_dtype;
  DType target_dtype;
  TrajectoryParams p;
  // --- Trajectory-bank extension (saf_kernels::saf_bank_step; see saf/trajectory_bank.h). All
  // null for trajectory_loss, whose behaviour they leave unchanged.
  const void* kl_scale_dev;     // device scalar scaling the KL term only (scale_dev then scales CE only)
  const int64_t* target_index;  // row i's target is row target_index[i] of `target` (a gather)
  const uint8_t* row_mode;      // per-row RowMode bits; null: every row has a target, none is recorded
  // --- Probability targets [rows, cols] (row stride soft_stride, soft_dtype) instead of `labels`:
  // CE = -sum_c y_c log softmax(z)_c on every row (none is ignored). null: class labels or no CE.
  const void* soft;
  int64_t soft_stride;
  DType soft_dtype;
};

// Per-row bits of TrajectoryArgs::row_mode.
enum RowMode : uint8_t {
  kRowKL = 1,      // the row has a target: the KL term applies
  kRowRecord = 2,  // write the row's logits into its target row (after reading it), in target_dtype
};

// Derived per-row constants, in the accumulation type.
template <typename acc_t>
struct RowConsts {
  acc_t inv_t, t, ce_w, kl_w, eps, eps_over_c;
  // T as a small integer n lets a kernel derive exp(d) = exp(d / T)^n with n - 1 products.
  int int_t;
  SAF_HD RowConsts(const TrajectoryParams& p, int64_t cols, acc_t scale = acc_t(1))
      : inv_t(acc_t(1) / acc_t(p.temperature)),
        t(acc_t(p.temperature)),
        ce_w(acc_t(p.ce_weight) * acc_t(p.scale) * scale),
        kl_w(acc_t(p.kl_weight) * acc_t(p.scale) * scale),
        eps(acc_t(p.label_smoothing)),
        eps_over_c(acc_t(p.label_smoothing) / acc_t(cols)),
        int_t((p.temperature >= 1.0 && p.temperature <= 8.0 && p.temperature == double(int(p.temperature)))
                  ? int(p.temperature)
                  : 0) {}
  // Separate scales of the CE and KL terms (the bank step averages CE over the labelled rows and
  // KL over the rows that have a past entry).
  SAF_HD RowConsts(const TrajectoryParams& p, int64_t cols, acc_t ce_scale, acc_t kl_scale)
      : RowConsts(p, cols, acc_t(1)) {
    ce_w *= ce_scale;
    kl_w *= kl_scale;
  }
};

// Row statistics after the reduction over classes. Sums are taken after subtracting the row
// maxima mz = max(z) and mt = max(t), so that
//   s_c = exp(z_c - mz) / s1,  q_c = exp((z_c - mz) / T) / sz,  p_c = exp((t_c - mt) / T) / st,
// and, from a second pass once the maxima and sums are known,
//   w = sum_c exp((t_c - mt) / T) ((t_c - mt) - (z_c - mz)),
//   ds = sum_c (exp((z_c - mz) / T) - exp((t_c - mt) / T))   (= sz - st, without the cancellation;
//        each term as kl_exp_diff below),
// so that KL = w / (T st) + log1p(ds / st). Probability targets: sy = sum_c y_c and
// syd = sum_c y_c (z_c - mz), so that CE = sy log(s1) - syd.
template <typename acc_t>
struct RowStats {
  acc_t mz, mt, s1, sz, st, w, ds, sumz, zy, sy, syd;
  acc_t nonfinite;  // sum of (z - z) + (t - t) (+ (y - y)): 0, or NaN if the row holds NaN or inf
};

// expm1(v) for |v| <= kl_expm1_bound<acc_t>(): the degree-8 Taylor polynomial (Horner), within
// 1e-8 relative in float at |v| = 0.5 and 6e-16 (3 ulp) in double at |v| = 1/16: a few multiply-adds,
// where a library expm1 costs several times a fast exp (Sleef's expm1f8_u10 tripled the CPU
// kernel's time).
template <typename acc_t>
SAF_HD acc_t expm1_small(acc_t v) {
  acc_t p = acc_t(1) + v * acc_t(1.0 / 8);
  p = acc_t(1) + v * acc_t(1.0 / 7) * p;
  p = acc_t(1) + v * acc_t(1.0 / 6) * p;
  p = acc_t(1) + v * acc_t(1.0 / 5) * p;
  p = acc_t(1) + v * acc_t(1.0 / 4) * p;
  p = acc_t(1) + v * acc_t(1.0 / 3) * p;
  p = acc_t(1) + v * acc_t(1.0 / 2) * p;
  return v * p;
}

template <typename acc_t>
SAF_HD constexpr acc_t kl_expm1_bound() {
  return sizeof(acc_t) == 8 ? acc_t(0.0625) : acc_t(0.5);
}

// exp((z_c - mz)/T) - exp((t_c - mt)/T) given ez = exp((z_c - mz)/T), et = exp((t_c - mt)/T) and
// v = ((z_c - mz) - (t_c - mt)) / T: et * expm1(v) where the two are close (the difference would
// cancel, and the exps' own errors with it), else ez - et.
template <typename acc_t>
SAF_HD acc_t kl_exp_diff(acc_t ez, acc_t et, acc_t v) {
  const acc_t b = kl_expm1_bound<acc_t>();
  return (v <= b && v >= -b) ? et * expm1_small(v) : ez - et;
}

// Whether CE uses probability targets (soft) or a class label (hard).
enum class CeKind : int { None = 0, Label = 1, Soft = 2 };

// Per-row loss from its statistics.
template <typename acc_t, typename LogF, typename Log1pF>
SAF_HD acc_t row_loss_from_stats(const RowStats<acc_t>& r, const RowConsts<acc_t>& k, CeKind ce_kind,
                                 bool with_kl, LogF logf, Log1pF log1pf) {
  acc_t loss = r.nonfinite;
  if (with_kl) {
    // log1p(ds / st), not log(sz) - log(st) (both ~log C) nor log(sz / st) (rounded near 1).
    const acc_t kl = k.inv_t * r.w / r.st + log1pf(r.ds / r.st);
    loss += k.kl_w * k.t * k.t * kl;
  }
  if (ce_kind == CeKind::Label) {
    const acc_t ce = r.mz + logf(r.s1) - (acc_t(1) - k.eps) * r.zy - k.eps_over_c * r.sumz;
    loss += k.ce_w * ce;
  } else if (ce_kind == CeKind::Soft) {
    loss += k.ce_w * (r.sy * logf(r.s1) - r.syd);
  }
  return loss;
}

// Coefficients of the gradient: d_c = a * e1_c + b * eT_c - d * et_c + k0 - ys * y_c
// (- hot at the label), with e1_c = exp(z_c - mz), eT_c = exp((z_c - mz)/T), et_c = exp((t_c - mt)/T)
// and y_c the probability targets (ys = 0 without them).
template <typename acc_t>
struct GradCoefs {
  acc_t a, b, d, k0, hot, ys;
};

template <typename acc_t>
SAF_HD GradCoefs<acc_t> grad_coefs(const RowStats<acc_t>& r, const RowConsts<acc_t>& k, CeKind ce_kind,
                                   bool with_kl) {
  GradCoefs<acc_t> g;
  const bool label = ce_kind == CeKind::Label, soft = ce_kind == CeKind::Soft;
  // nonfinite is 0 or NaN: adding it to every coefficient poisons the whole row's gradient.
  g.a = (label ? k.ce_w / r.s1 : soft ? k.ce_w * r.sy / r.s1 : acc_t(0)) + r.nonfinite;
  g.b = with_kl ? k.kl_w * k.t / r.sz : acc_t(0);
  g.d = with_kl ? k.kl_w * k.t / r.st : acc_t(0);
  g.k0 = (label ? -k.ce_w * k.eps_over_c : acc_t(0)) + r.nonfinite;
  g.hot = label ? k.ce_w * (acc_t(1) - k.eps) : acc_t(0);
  g.ys = soft ? k.ce_w : acc_t(0);
  return g;
}

}  // namespace saf
