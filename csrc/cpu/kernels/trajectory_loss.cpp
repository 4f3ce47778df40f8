// Vectorised CPU kernel of the fused trajectory loss over a range of rows.
//
// Files in csrc/cpu/kernels/ are compiled once per instruction set (setup.py passes
// -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 and the matching -m flags, as ATen does);
// csrc/cpu/trajectory_loss.cpp picks one build at run time. Only at::vec, c10's scalar types
// and the standard library are used here, so nothing shared with the generic translation units
// gets compiled with wider instructions.

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/kernels/kernels.h"

#include "saf/trajectory_loss.h"

namespace saf::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();  // ~2x faster than exp(); 20 ULP is well inside every tolerance here
  } else {
    return x.exp();
  }
}

template <typename T>
inline T hsum(const Vectorized<T>& v) {
  alignas(64) T buf[Vectorized<T>::size()];
  v.store(buf);
  T s = T(0);
  for (int i = 0; i < Vectorized<T>::size(); ++i) s += buf[i];
  return s;
}

template <typename T>
inline T hmin(const Vectorized<T>& v) {
  alignas(64) T buf[Vectorized<T>::size()];
  v.store(buf);
  T m = buf[0];
  for (int i = 1; i < Vectorized<T>::size(); ++i) m = buf[i] < m || buf[i] != buf[i] ? buf[i] : m;
  return m;
}

template <typename T>
inline T hmax(const Vectorized<T>& v) {
  alignas(64) T buf[Vectorized<T>::size()];
  v.store(buf);
  T m = buf[0];
  for (int i = 1; i < Vectorized<T>::size(); ++i) m = buf[i] > m ? buf[i] : m;
  return m;
}

// Maxima of two rows in one pass.
template <typename T>
inline void row_max2(const T* x, const T* y, int64_t n, T& mx, T& my) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  mx = my = -std::numeric_limits<T>::infinity();
  int64_t c = 0;
  if (n >= W) {
    V vx = V::loadu(x), vy = V::loadu(y);
    for (c = W; c + W <= n; c += W) {
      vx = at::vec::maximum(vx, V::loadu(x + c));
      vy = at::vec::maximum(vy, V::loadu(y + c));
    }
    mx = hmax(vx);
    my = hmax(vy);
  }
  for (; c < n; ++c) {
    mx = x[c] > mx ? x[c] : mx;
    my = y[c] > my ? y[c] : my;
  }
}

// x^n for a small integer n >= 1 (exp(d) from exp(d / T) when T = n).
template <typename V>
inline V ipow(const V& x, int n) {
  V r = x;
  for (int i = 1; i < n; ++i) r = r * x;
  return r;
}

// Widen a row to the accumulation type (a copy only when the types differ).
template <typename acc_t, typename src_t>
inline const acc_t* widen(const void* src, acc_t* buf, int64_t n) {
  const src_t* s = static_cast<const src_t*>(src);
  if constexpr (std::is_same_v<src_t, acc_t>) {
    return s;
  } else {
    at::vec::convert(s, buf, n);
    return buf;
  }
}

template <typename acc_t>
using WidenFn = const acc_t* (*)(const void*, acc_t*, int64_t);

template <typename acc_t>
inline WidenFn<acc_t> widen_fn(DType t) {
  switch (t) {
    case DType::F32: return &widen<acc_t, float>;
    case DType::F16: return &widen<acc_t, c10::Half>;
    case DType::BF16: return &widen<acc_t, c10::BFloat16>;
    case DType::F64: return &widen<acc_t, double>;
  }
  return nullptr;
}

// Round a row of the accumulation type to a storage type (the bank's), as Tensor.to() rounds.
template <typename acc_t, typename dst_t>
inline void narrow(const acc_t* src, void* dst, int64_t n) {
  at::vec::convert(src, static_cast<dst_t*>(dst), n);
}

template <typename acc_t>
using NarrowFn = void (*)(const acc_t*, void*, int64_t);

template <typename acc_t>
inline NarrowFn<acc_t> narrow_fn(DType t) {
  switch (t) {
    case DType::F32: return &narrow<acc_t, float>;
    case DType::F16: return &narrow<acc_t, c10::Half>;
    case DType::BF16: return &narrow<acc_t, c10::BFloat16>;
    case DType::F64: return &narrow<acc_t, double>;
  }
  return nullptr;
}

// Processes rows [begin, end). Returns the index of the first row with a label outside [0, C)
// (other than ignore_index), or with a negative or non-finite probability target, or -1.
//
// Per row: pass 1 finds the maxima; pass 2 the sums (exps kept in scratch); pass 3 the KL's
// per-element log-ratios and, if wanted, the gradient (from the scratch, mostly in L1/L2).
//
// With the bank extension (a.row_mode set, saf/trajectory_bank.h) row i's target is row
// a.target_index[i] of a.target, used only if the row's mode has kRowKL; with kRowRecord the row's
// logits are written over that target row (rounded to target_dtype) once the row has been read
// for the last time. Rows are distinct bank rows (the wrapper rejects duplicate ids), so threads
// never share one.
template <typename acc_t, typename grad_t>
int64_t trajectory_rows_impl(const TrajectoryArgs& a, int64_t begin, int64_t end) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t C = a.cols;
  const RowConsts<acc_t> k(a.p, C);  // the CPU wrapper folds any scale into p.scale / the weights
  const CeKind ce_kind = a.labels ? CeKind::Label : (a.soft ? CeKind::Soft : CeKind::None);
  const bool label = ce_kind == CeKind::Label, soft = ce_kind == CeKind::Soft;
  const bool with_ce = ce_kind != CeKind::None;
  const auto widen_z = widen_fn<acc_t>(a.logits_dtype);
  const auto widen_t = widen_fn<acc_t>(a.target_dtype);
  const auto widen_y = soft ? widen_fn<acc_t>(a.soft_dtype) : nullptr;
  const auto narrow_t = narrow_fn<acc_t>(a.target_dtype);
  const int zsz = dtype_size(a.logits_dtype), tsz = dtype_size(a.target_dtype);
  const int ysz = soft ? dtype_size(a.soft_dtype) : 0;

  // Per-call scratch: widened z, t and y, exp(z - mz), exp((z - mz)/T), exp((t - mt)/T), and a row
  // of zeros standing in for the target of bank rows without a past entry.
  std::vector<acc_t> scratch(7 * C, acc_t(0));
  acc_t* zbuf = scratch.data();
  acc_t* tbuf = zbuf + C;
  acc_t* ybuf = tbuf + C;
  acc_t* e1 = ybuf + C;
  acc_t* ez = e1 + C;
  acc_t* et = ez + C;
  const acc_t* zeros = et + C;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  acc_t* row_loss = static_cast<acc_t*>(a.row_loss);
  int64_t bad_row = -1;

  for (int64_t i = begin; i < end; ++i) {
    grad_t* g = a.grad ? static_cast<grad_t*>(a.grad) + i * a.grad_stride : nullptr;
    // Without the bank extension the target is always read: NaN in it must reach the loss even
    // at weight 0.
    const uint8_t mode = a.row_mode ? a.row_mode[i] : uint8_t(kRowKL);
    const bool with_kl = mode & kRowKL;
    char* trow = nullptr;
    if (mode & (kRowKL | kRowRecord)) {
      const int64_t r = a.target_index ? a.target_index[i] : i;
      trow = static_cast<char*>(const_cast<void*>(a.target)) + r * a.target_stride * tsz;
    }
    const char* zrow = static_cast<const char*>(a.logits) + i * a.logits_stride * zsz;
    auto record = [&]() {
      if (!(mode & kRowRecord)) return;
      if (a.logits_dtype == a.target_dtype) {
        std::memcpy(trow, zrow, size_t(C) * size_t(zsz));
      } else {
        narrow_t(widen_z(zrow, zbuf, C), trow, C);
      }
    };
    auto skip_row = [&](acc_t v) {
      record();
      row_loss[i] = v;
      if (g) std::fill(g, g + C, grad_t(v));
    };
    // A row in neither term (a bank row without labels and without a past entry) is not read.
    if (!with_ce && !with_kl) {
      skip_row(acc_t(0));
      continue;
    }
    int64_t y = -1;
    if (label) {
      y = a.labels[i];
      if (y == a.p.ignore_index) {
        skip_row(acc_t(0));
        continue;
      }
      if (y < 0 || y >= C) {
        if (bad_row < 0) bad_row = i;
        skip_row(nan);
        continue;
      }
    }
    const acc_t* z = widen_z(zrow, zbuf, C);
    const acc_t* t = with_kl ? widen_t(trow, tbuf, C) : zeros;
    const acc_t* yv = soft ? widen_y(static_cast<const char*>(a.soft) + i * a.soft_stride * ysz, ybuf, C)
                           : nullptr;

    RowStats<acc_t> r{};
    row_max2(z, t, C, r.mz, r.mt);
    const V vmz(r.mz), vmt(r.mt), vinv(k.inv_t);
    const int n_pow = k.int_t;  // > 0: exp(d) = exp(d / T)^T, one exp fewer per element
    V s1(0), sz(0), st(0), sumz(0), nonfinite(0), sy(0), syd(0), ymin(0);
    int64_t c = 0;
    for (; c + W <= C; c += W) {
      const V zc = V::loadu(z + c);
      const V tc = V::loadu(t + c);
      const V d = zc - vmz;
      const V xz = vexp(d * vinv);
      const V xt = vexp((tc - vmt) * vinv);
      xz.store(ez + c);
      xt.store(et + c);
      sz += xz;
      st += xt;
      nonfinite += (zc - zc) + (tc - tc);
      if (with_ce) {
        const V x1 = n_pow ? ipow(xz, n_pow) : vexp(d);
        x1.store(e1 + c);
        s1 += x1;
        if (label) {
          sumz += zc;
        } else {
          const V yc = V::loadu(yv + c);
          sy += yc;
          syd += yc * d;
          ymin = at::vec::minimum(ymin, yc);
          nonfinite += yc - yc;
        }
      }
    }
    r.s1 = hsum(s1);
    r.sz = hsum(sz);
    r.st = hsum(st);
    r.sumz = hsum(sumz);
    r.sy = hsum(sy);
    r.syd = hsum(syd);
    r.nonfinite = hsum(nonfinite);
    acc_t ym = soft ? hmin(ymin) : acc_t(0);
    for (; c < C; ++c) {
      const acc_t d = z[c] - r.mz;
      r.nonfinite += (z[c] - z[c]) + (t[c] - t[c]);
      ez[c] = std::exp(d * k.inv_t);
      et[c] = std::exp((t[c] - r.mt) * k.inv_t);
      r.sz += ez[c];
      r.st += et[c];
      if (with_ce) {
        e1[c] = std::exp(d);
        r.s1 += e1[c];
        if (label) {
          r.sumz += z[c];
        } else {
          r.sy += yv[c];
          r.syd += yv[c] * d;
          ym = yv[c] < ym ? yv[c] : ym;
          r.nonfinite += yv[c] - yv[c];
        }
      }
    }
    if (soft && !(ym >= acc_t(0) && r.nonfinite == acc_t(0))) {
      // A negative or non-finite probability: an error (NaN here, reported by the wrapper), unless
      // the row is non-finite through its logits or target already (then it is NaN by policy).
      bool own = !(ym >= acc_t(0));
      for (int64_t j = 0; j < C && !own; ++j) own = !std::isfinite(double(yv[j]));
      if (own && bad_row < 0) bad_row = i;
      r.nonfinite = nan;
    }
    r.zy = label ? z[y] : acc_t(0);

    // Pass 3: the KL's per-element log-ratios; the gradient from the scratch.
    const GradCoefs<acc_t> gc = grad_coefs(r, k, ce_kind, with_kl);
    acc_t* out = nullptr;
    if (g) {
      // Same type: write in place. Otherwise into scratch (z's, read just before in the same
      // iteration) and narrow once at the end.
      if constexpr (std::is_same_v<grad_t, acc_t>) {
        out = g;
      } else {
        out = zbuf;
      }
    }
    const V va(gc.a), vb(gc.b), vd(gc.d), vk(gc.k0), vys(gc.ys), vbound(kl_expm1_bound<acc_t>());
    V wv(0), dsv(0);
    c = (with_kl || out) ? 0 : C;
    for (; c + W <= C; c += W) {
      const V etc = V::loadu(et + c), ezc = V::loadu(ez + c);
      if (with_kl) {
        const V zc = V::loadu(z + c), tc = V::loadu(t + c);
        const V x = (tc - vmt) - (zc - vmz);
        wv += etc * x;
        // kl_exp_diff (saf/trajectory_loss.h), vectorised.
        const V v = V(acc_t(0)) - x * vinv;
        dsv += V::blendv(ezc - etc, etc * expm1_small(v), v.abs() <= vbound);
      }
      if (out) {
        V x = vk + vb * ezc - vd * etc;
        if (with_ce) x += va * V::loadu(e1 + c);
        if (soft) x -= vys * V::loadu(yv + c);
        x.store(out + c);
      }
    }
    r.w = hsum(wv);
    r.ds = hsum(dsv);
    for (; c < C; ++c) {
      if (with_kl) {
        const acc_t x = (t[c] - r.mt) - (z[c] - r.mz);
        r.w += et[c] * x;
        r.ds += kl_exp_diff(ez[c], et[c], -x * k.inv_t);
      }
      if (out) {
        acc_t x = gc.k0 + gc.b * ez[c] - gc.d * et[c];
        if (with_ce) x += gc.a * e1[c];
        if (soft) x -= gc.ys * yv[c];
        out[c] = x;
      }
    }
    row_loss[i] = row_loss_from_stats(r, k, ce_kind, with_kl, [](acc_t x) { return std::log(x); },
                                      [](acc_t x) { return std::log1p(x); });
    if (out) {
      if (label) out[y] -= gc.hot;  // NaN rows stay NaN: hot is finite
      if constexpr (!std::is_same_v<grad_t, acc_t>) {
        at::vec::convert(out, g, C);
      }
    }
    // The target row has been read for the last time: the bank slot can take the logits.
    record();
  }
  return bad_row;
}

template <typename acc_t>
int64_t probability_check_impl(const void* y, DType dtype, int64_t stride, int64_t C, int64_t begin, int64_t end) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const auto widen_y = widen_fn<acc_t>(dtype);
  const int ysz = dtype_size(dtype);
  std::vector<acc_t> buf(C);
  for (int64_t i = begin; i < end; ++i) {
    const acc_t* v = widen_y(static_cast<const char*>(y) + i * stride * ysz, buf.data(), C);
    V mn(0), nf(0);
    int64_t c = 0;
    for (; c + W <= C; c += W) {
      const V x = V::loadu(v + c);
      mn = at::vec::minimum(mn, x);
      nf += x - x;
    }
    acc_t m = hmin(mn), f = hsum(nf);
    for (; c < C; ++c) {
      m = v[c] < m ? v[c] : m;
      f += v[c] - v[c];
    }
    if (!(m >= acc_t(0)) || f != acc_t(0)) return i;
  }
  return -1;
}

int64_t probability_check_rows(const void* y, DType dtype, int64_t stride, int64_t C, int64_t begin,
                               int64_t end) {
  return dtype == DType::F64 ? probability_check_impl<double>(y, dtype, stride, C, begin, end)
                             : probability_check_impl<float>(y, dtype, stride, C, begin, end);
}

int64_t trajectory_loss_rows(const TrajectoryArgs& a, int64_t begin, int64_t end) {
  const bool f64 = a.logits_dtype == DType::F64 || a.target_dtype == DType::F64;
  switch (a.logits_dtype) {
    case DType::F64: return trajectory_rows_impl<double, double>(a, begin, end);
    case DType::F32:
      return f64 ? trajectory_rows_impl<double, float>(a, begin, end)
                 : trajectory_rows_impl<float, float>(a, begin, end);
    case DType::F16:
      return f64 ? trajectory_rows_impl<double, c10::Half>(a, begin, end)
                 : trajectory_rows_impl<float, c10::Half>(a, begin, end);
    case DType::BF16:
      return f64 ? trajectory_rows_impl<double, c10::BFloat16>(a, begin, end)
                 : trajectory_rows_impl<float, c10::BFloat16>(a, begin, end);
  }
  return -1;
}

}  // namespace saf::cpu::CPU_CAPABILITY
