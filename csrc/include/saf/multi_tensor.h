// Multi-tensor machinery shared by the CPU and CUDA kernels: the layout of a tensor-list plan and
// the per-element math of every multi-tensor op (SAM/ASAM perturbation and restore, fused
// restore + SGD / AdamW, EMA). No torch headers: .cu files include this.
//
// A plan is one contiguous byte buffer, built on the host (csrc/multi_tensor.h) and, on CUDA,
// copied to device memory, so that one kernel launch covers any number of tensors:
//
//   [Header][TensorEntry x n_tensors][ChunkEntry x n_chunks]
//
// Tensor i holds up to kMaxLists aligned element streams (e.g. weight, grad, stash, momentum),
// all of numel elements in the same dense layout, each with its own dtype, plus up to kMaxParams
// per-tensor scalars (rho, eta, lr, ...) and flags. Chunk j covers elements
// [chunk * chunk_size, min((chunk + 1) * chunk_size, numel)) of tensor `tensor`. One CUDA block
// (or one CPU task step) handles one chunk, so a reduction writes one partial per chunk and a
// final pass sums the partials in chunk order: the result does not depend on the thread count.
// rng_offset is the number of elements of the list before tensor i, so that a counter-based RNG
// (Philox, seed + offset) gives every element its own stream position with no per-tensor state.
#pragma once

#include <cmath>
#include <cstdint>

#include "saf/common.h"

// Host copies get internal linkage: the CPU kernels are compiled once per instruction set, and a
// shared (COMDAT) copy could otherwise be taken from an AVX512 object for a generic caller.
#if defined(__CUDACC__)
#define SAF_MT_FN __host__ __device__ __forceinline__
#else
#define SAF_MT_FN static inline
#endif

namespace saf::mt {

constexpr int kMaxLists = 6;
constexpr int kMaxParams = 8;

struct Header {
  int64_t n_tensors;
  int64_t n_chunks;
  int64_t chunk_size;
  int64_t tensors_offset;  // bytes from the start of the plan
  int64_t chunks_offset;
  int32_t n_lists;
  int32_t reserved;
};

// Flags of a tensor entry (bits).
enum : int32_t {
  kAligned = 1,  // every stream's pointer is aligned for 4-element vector access (CUDA)
  kFlagA = 2,    // op-specific per-tensor booleans (see each op's *Params)
  kFlagB = 4,
  kFlagC = 8,
  kFlagD = 16,
};

struct TensorEntry {
  void* ptr[kMaxLists];
  int64_t numel;
  int64_t rng_offset;
  double param[kMaxParams];
  int32_t dtype[kMaxLists];  // saf::DType, or -1 for an unused stream
  int32_t flags;
  int32_t reserved;
};

struct ChunkEntry {
  int32_t tensor;
  int32_t chunk;  // index of the chunk inside its tensor
};

inline constexpr int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

inline constexpr int64_t plan_bytes(int64_t n_tensors, int64_t n_chunks) {
  return align16(sizeof(Header)) + align16(n_tensors * int64_t(sizeof(TensorEntry))) +
         n_chunks * int64_t(sizeof(ChunkEntry));
}

// ---------------------------------------------------------------------------------------------
// Stream slots and per-tensor parameters of each op
// ---------------------------------------------------------------------------------------------

// SAM / ASAM perturbation (sam_perturb_): streams w, g, stash; params rho, eta; flag adaptive.
//   norm  = || T * g ||_2 over every element of every tensor, T = |w| + eta where adaptive, else 1
//   e     = rho * T^2 * g * coef,  coef = 1 / (norm + eps)  (times 1 / grad_scale under AMP)
//   copy mode:  stash = w;  w = w + e                         (restore: w = stash, bit exact)
//   delta mode: stash = round(e);  w = w + round(e)           (restore: w = w - stash, lossy)
// coef == 0 means "perturb nothing" (non-finite norm, or found_inf set): w is left as it is, and
// the stash still gets w (copy) or 0 (delta) so that the restore is the same either way.
namespace sam {
enum Stream { W = 0, G = 1, STASH = 2 };
enum Param { RHO = 0, ETA = 1 };
constexpr int32_t kAdaptive = kFlagA;
enum StashMode : int64_t { COPY = 0, DELTA = 1 };
}  // namespace sam

// Fused restore + SGD (torch.optim.SGD semantics on the restored weights):
// streams w, g, stash, momentum buffer; params lr, weight_decay, momentum, dampening;
// flags nesterov, maximize, first_run (the buffer is initialised to the gradient).
namespace sgd {
enum Stream { W = 0, G = 1, STASH = 2, BUF = 3 };
enum Param { LR = 0, WD = 1, MOMENTUM = 2, DAMPENING = 3 };
constexpr int32_t kNesterov = kFlagA;
constexpr int32_t kMaximize = kFlagB;
constexpr int32_t kFirstRun = kFlagC;
}  // namespace sgd

// Fused restore + AdamW (torch.optim.AdamW semantics, no amsgrad): streams w, g, stash, exp_avg,
// exp_avg_sq, step (a one-element float32 tensor, already incremented for this step); params lr,
// beta1, beta2, eps, weight_decay; flag maximize.
namespace adamw {
enum Stream { W = 0, G = 1, STASH = 2, EXP_AVG = 3, EXP_AVG_SQ = 4, STEP = 5 };
enum Param { LR = 0, BETA1 = 1, BETA2 = 2, EPS = 3, WD = 4 };
constexpr int32_t kMaximize = kFlagA;
}  // namespace adamw

// EMA (ema_update_): streams ema, model.
namespace ema {
enum Stream { EMA = 0, MODEL = 1 };
}

// ---- ESAM, R-SAM, GSAM (issue 5): streams, params and math of their multi-tensor ops ----------
// Random numbers come from saf/philox.h: element i of tensor t draws at position
// rng_offset + i, and these ops pad rng_offset to a multiple of 4 (csrc/mt_plan.h).

// ESAM stochastic weight perturbation (esam_perturb_ / esam_restore_): streams w, g, stash;
// params rho, eta, beta (keep probability); flag adaptive. keep = Bernoulli(beta) at the element's
// position (regenerated, never stored):
//   norm = || keep * T * g ||_2 over every element of every tensor (the kept gradients)
//   e    = keep * (rho / beta) * T^2 * g * coef,  coef = 1 / (norm + eps)  (/ grad_scale)
// i.e. the official code's scale rho / (norm + eps) / beta, elementwise instead of per tensor.
namespace esam {
enum Stream { W = 0, G = 1, STASH = 2 };
enum Param { RHO = 0, ETA = 1, BETA = 2 };
constexpr int32_t kAdaptive = kFlagA;
}  // namespace esam

// R-SAM. rsam_noise_ (streams w, stash; row-aligned chunks, see csrc/mt_plan.h): for every output
// unit j (the slice W[j, ...] along dim 0, contiguous in memory) delta = std * ||W[j]|| * z with
// z ~ N(0, 1) per element; tensors with fewer than 2 dims are one unit scaled by ||p|| + 1e-16.
// stash = w, w += delta. rsam_perturb_ (streams w, g, stash; plain chunks): with the noise that
// was actually applied recovered as delta = w - stash,
//   d = lam * g + delta,  w = stash + rho * d * coef,  coef = 1 / (||d|| + eps)  (g / grad_scale)
namespace rsam {
enum Stream { W = 0, G = 1, STASH = 2 };
enum Param { STD = 0, ROW_LEN = 1, CHUNK_ROWS = 2, RHO = 3 };
constexpr int32_t kVector = kFlagA;  // fewer than 2 dims: one unit, ||p|| + 1e-16
constexpr double kVectorEps = 1e-16;
}  // namespace rsam

// GSAM (gsam_combine_ / gsam_restore_sgd_): streams w, g (the gradient g_p at the perturbed
// weights), stash, momentum buffer (SGD only), old_g (the first gradient); SGD's params and flags
// in sgd's slots. One pass of partial sums <old_g, g>, |old_g|^2, |g|^2, then
//   grad = c_new * g + c_old * old_g   (GsamCoef below: g_p - alpha * g_perp, unscaled)
namespace gsam {
enum Stream { W = 0, G = 1, STASH = 2, BUF = 3, OLD_G = 4 };
}  // namespace gsam

// GSAM's decomposition (juntang-zhuang/GSAM gradient_decompose) folded into two coefficients of
// the raw (possibly AMP-scaled) gradients: with g = g_raw * inv_new, o = o_raw * inv_old,
//   cos    = <o, g> / (||g|| ||o|| + eps)
//   g_perp = o - cos * ||o|| * g / (||g|| + eps)
//   grad   = g - alpha * g_perp = (1 + alpha * cos * ||o|| / (||g|| + eps)) g - alpha o
// skip (found_inf): apply = false, the caller leaves the gradients and skips the step. A sum that
// is not finite (no AMP): the decomposition is undefined and grad = g (the unscaled g_p), whose
// inf / NaN then reach the base step as they would in torch.
struct GsamCoef {
  double c_new;  // multiplies g_raw
  double c_old;  // multiplies o_raw
  double cos;
  double norm_old;
  double norm_new;
  bool apply;
};

SAF_MT_FN GsamCoef gsam_coef(double dot, double ss_old, double ss_new, double inv_new, double inv_old, double alpha,
                             double eps, bool skip) {
  GsamCoef r;
  r.norm_old = std::sqrt(ss_old) * inv_old;
  r.norm_new = std::sqrt(ss_new) * inv_new;
  const double d = dot * inv_new * inv_old;
  r.cos = d / (r.norm_new * r.norm_old + eps);
  const double chk = r.norm_old + r.norm_new + r.cos;
  const bool finite = chk - chk == 0.0;  // false for inf and NaN
  r.apply = !skip;
  r.c_new = skip ? 0.0 : (finite ? (1.0 + alpha * r.cos * r.norm_old / (r.norm_new + eps)) * inv_new : inv_new);
  r.c_old = (skip || !finite) ? 0.0 : -alpha * inv_old;
  return r;
}
// ---- end ESAM, R-SAM, GSAM ----------------------------------------------------------------------

// ---- LookSAM, Momentum-SAM (issue 15): streams, params and math of their multi-tensor ops ------

// LookSAM (looksam_gv_ / looksam_combine_), in GSAM's slots so that GSAM's and SAM's passes serve
// (csrc/mt_plan.h). looksam_gv_: streams gv (gsam's W), g_s (the gradient at the perturbed
// weights, gsam's G), g (the first gradient, gsam's OLD_G), one dtype per tensor. GSAM's partial
// sums give <g, g_s>, |g|^2, |g_s|^2; then (LookSamGvCoef) one pass writes gv = g_s - c g and sums
// |gv|^2 of the stored values, gv_norm = |gv|. looksam_combine_: g in gsam's G, gv in its OLD_G;
// SAM's norm pass gives |g|^2, then GSAM's combine pass g = 1 g + coef gv (LookSamCombineCoef).
namespace looksam {
enum Stream { GV = 0, GS = 1, G = 4 };
}  // namespace looksam

// c = <g, g_s> / |g|^2; it applies (ok) only when finite with a finite |g_s| and |g| > 0, else gv
// and gv_norm are left as they were. The stats: cos(g, g_s) (eps in the denominator), |g|, |g_s|.
struct LookSamGvCoef {
  double c;
  bool ok;
  double cos;
  double norm_old;
  double norm_new;
};

SAF_MT_FN LookSamGvCoef looksam_gv_coef(double dot, double gg, double ss, double eps) {
  LookSamGvCoef r;
  const double c = dot / gg;
  const double chk = c + ss;
  r.ok = chk - chk == 0.0 && gg > 0.0;  // false for inf and NaN
  r.c = r.ok ? c : 0.0;
  r.norm_old = std::sqrt(gg);
  r.norm_new = std::sqrt(ss);
  r.cos = dot / (r.norm_old * r.norm_new + eps);
  return r;
}

// The reuse step's coefficient: coef = alpha |g| / (|gv| + eps); a zero or non-finite |gv| or a
// non-finite |g| leaves g as it is (ok false). norm: |g| as given (scaled under AMP).
struct LookSamCombineCoef {
  double coef;
  bool ok;
  double norm;
};

SAF_MT_FN LookSamCombineCoef looksam_combine_coef(double gg, double gv_norm, double alpha, double eps) {
  LookSamCombineCoef r;
  r.norm = std::sqrt(gg);
  const double chk = r.norm + gv_norm;
  r.ok = chk - chk == 0.0 && gv_norm > 0.0;
  r.coef = r.ok ? alpha * r.norm / (gv_norm + eps) : 0.0;
  return r;
}

// Momentum-SAM (msam_sgd_ / msam_adamw_), the weights stored at the perturbed point between
// steps. Streams: w, g, the buffer the perturbation follows (SGD: momentum; AdamW: exp_avg),
// then AdamW's exp_avg_sq and step (one element, any float dtype, counting this step). Params:
// SGD lr, weight_decay, momentum; AdamW lr, beta1, beta2, eps, weight_decay; both rho_prev
// (slot 6) and rho (slot 7), so that one re-perturbation pass serves both. Pass 1: un-perturb
// (w += rho_prev inv_prev buf), the buffer (moments), the step, and the partial sums of |buf|^2 of
// the stored buffer; finalize inv = 1 / (|buf| + eps) (stored in inv_norm's dtype and read back);
// pass 2: w -= rho inv buf.
namespace msam {
enum Stream { W = 0, G = 1, BUF = 2, EXP_AVG_SQ = 3, STEP = 4 };
enum Param { LR = 0, WD = 1, MOMENTUM = 2, BETA1 = 1, BETA2 = 2, EPS = 3, ADAMW_WD = 4, RHO_PREV = 6, RHO = 7 };
}  // namespace msam

// SGD, one element: w becomes the unperturbed weight; returns the new buffer (before rounding
// to its dtype; the step w - lr * buf uses the stored, rounded buffer, as the authors' in-place
// code does).
template <typename acc_t>
SAF_MT_FN acc_t msam_sgd_buf(acc_t& w, acc_t g, acc_t buf, acc_t wd, acc_t momentum, acc_t up) {
  const acc_t d = g + wd * w;  // the decay at the perturbed weights, as the authors' code
  w = w + up * buf;
  return momentum * buf + d;
}

// AdamW, one element: w becomes the unperturbed weight, v the new second moment; returns the
// new first moment (before rounding). omb1 = 1 - beta1, omb2 = 1 - beta2.
template <typename acc_t>
SAF_MT_FN acc_t msam_adamw_moments(acc_t& w, acc_t g, acc_t m, acc_t& v, acc_t beta1, acc_t omb1, acc_t beta2,
                                   acc_t omb2, acc_t up) {
  w = w + up * m;
  v = v * beta2 + omb2 * g * g;
  return m * beta1 + omb1 * g;
}

// ---- end LookSAM, Momentum-SAM ---------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Per-element math, identical on every backend (acc_t is float, or double for float64 tensors)
// ---------------------------------------------------------------------------------------------

// The ASAM scaling T = |w| + eta (1 when the tensor is not adaptive).
template <typename acc_t>
SAF_MT_FN acc_t asam_t(acc_t w, acc_t eta, bool adaptive) {
  return adaptive ? (w < acc_t(0) ? -w : w) + eta : acc_t(1);
}

// The perturbation of one element: rho * T^2 * g * coef.
template <typename acc_t>
SAF_MT_FN acc_t sam_e(acc_t w, acc_t g, acc_t rho_coef, acc_t eta, bool adaptive) {
  const acc_t t = asam_t(w, eta, adaptive);
  return rho_coef * (t * t) * g;
}

// torch.lerp's formula (two branches, exact at both ends): a + weight * (b - a).
template <typename acc_t>
SAF_MT_FN acc_t lerp(acc_t a, acc_t b, acc_t weight) {
  return weight < acc_t(0.5) ? a + weight * (b - a) : b - (b - a) * (acc_t(1) - weight);
}

// One SGD element in torch.optim.SGD's order of operations. w is the restored weight, g the
// (unscaled) gradient; buf is read and written unless momentum == 0. Returns the new weight.
template <typename acc_t>
SAF_MT_FN acc_t sgd_step(acc_t w, acc_t g, acc_t& buf, acc_t lr, acc_t wd, acc_t momentum, acc_t dampening,
                      bool nesterov, bool maximize, bool first_run) {
  if (maximize) g = -g;
  if (wd != acc_t(0)) g = g + wd * w;
  if (momentum != acc_t(0)) {
    buf = first_run ? g : buf * momentum + (acc_t(1) - dampening) * g;
    g = nesterov ? g + momentum * buf : buf;
  }
  return w - lr * g;
}

// Scalars of one AdamW step that depend only on the step count.
template <typename acc_t>
struct AdamWCoefs {
  acc_t step_size;  // lr / (1 - beta1^step)
  acc_t bc2_sqrt;   // sqrt(1 - beta2^step)
  acc_t decay;      // 1 - lr * weight_decay
};

template <typename acc_t>
SAF_MT_FN AdamWCoefs<acc_t> adamw_coefs(double lr, double beta1, double beta2, double wd, double step) {
  AdamWCoefs<acc_t> c;
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  c.step_size = acc_t(lr / bc1);
  c.bc2_sqrt = acc_t(std::sqrt(bc2));
  c.decay = acc_t(1.0 - lr * wd);
  return c;
}

// Momentum-SAM's AdamW step of one element (msam_adamw_moments' m and v): the Adam step, then
// the decoupled decay (the authors' order: after the step; torch.optim.AdamW decays first).
template <typename acc_t>
SAF_MT_FN acc_t msam_adamw_w(acc_t w, acc_t m, acc_t v, acc_t eps, const AdamWCoefs<acc_t>& c) {
  return (w - c.step_size * (m / (std::sqrt(v) / c.bc2_sqrt + eps))) * c.decay;
}

// One AdamW element in torch.optim.AdamW's order of operations (decoupled weight decay first).
template <typename acc_t>
SAF_MT_FN acc_t adamw_step(acc_t w, acc_t g, acc_t& m, acc_t& v, acc_t beta1, acc_t beta2, acc_t eps,
                        const AdamWCoefs<acc_t>& c, bool maximize) {
  if (maximize) g = -g;
  w = w * c.decay;
  m = lerp(m, g, acc_t(1) - beta1);
  v = v * beta2 + (acc_t(1) - beta2) * g * g;
  const acc_t denom = std::sqrt(v) / c.bc2_sqrt + eps;
  return w - c.step_size * (m / denom);
}

// The epilogue of the SAM norm: from the sum of squares of the (scaled) gradients, the true norm
// and the coefficient the perturbation multiplies by. inv_scale is 1 / grad_scale (1 without
// AMP); skip is true when a found_inf flag is set. A non-finite norm, or skip, gives coef = 0.
struct SamCoef {
  double norm;
  double coef;
};

SAF_MT_FN SamCoef sam_coef(double sumsq, double inv_scale, double eps, bool skip) {
  SamCoef r;
  r.norm = std::sqrt(sumsq) * inv_scale;
  const bool finite = r.norm - r.norm == 0.0;  // false for inf and NaN
  // A zero norm perturbs nothing, whatever eps (eps = 0 would give 0 * inf = NaN).
  r.coef = (finite && r.norm > 0.0 && !skip) ? inv_scale / (r.norm + eps) : 0.0;
  return r;
}

}  // namespace saf::mt
