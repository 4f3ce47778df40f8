// Stream access for the vectorised multi-tensor CPU kernels (csrc/cpu/kernels/{sam,ema}.cpp).
//
// Included only by files compiled once per instruction set: everything here lives in
// saf::cpu::CPU_CAPABILITY so that the builds never share a symbol.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>

#include "saf/multi_tensor.h"

namespace saf::cpu::CPU_CAPABILITY {

// Elements handled per inner block: the widened copies of every stream stay in L1.
constexpr int64_t kMtBlock = 1024;

template <typename acc_t>
constexpr DType acc_dtype() {
  return std::is_same_v<acc_t, double> ? DType::F64 : DType::F32;
}

inline char* stream_at(const mt::TensorEntry& t, int s, int64_t elem) {
  return static_cast<char*>(t.ptr[s]) + elem * dtype_size(static_cast<DType>(t.dtype[s]));
}

// Elements [off, off + n) of stream s in acc_t: the memory itself when the dtype is acc_t,
// else a widened copy in scratch.
template <typename acc_t>
inline acc_t* load_stream(const mt::TensorEntry& t, int s, int64_t off, int64_t n, acc_t* scratch) {
  char* p = stream_at(t, s, off);
  switch (static_cast<DType>(t.dtype[s])) {
    case DType::F32:
      if constexpr (std::is_same_v<acc_t, float>) return reinterpret_cast<float*>(p);
      at::vec::convert(reinterpret_cast<const float*>(p), scratch, n);
      return scratch;
    case DType::F64:
      if constexpr (std::is_same_v<acc_t, double>) return reinterpret_cast<double*>(p);
      at::vec::convert(reinterpret_cast<const double*>(p), scratch, n);
      return scratch;
    case DType::F16:
      at::vec::convert(reinterpret_cast<const c10::Half*>(p), scratch, n);
      return scratch;
    case DType::BF16:
      at::vec::convert(reinterpret_cast<const c10::BFloat16*>(p), scratch, n);
      return scratch;
  }
  return scratch;
}

// Writes src (n values of acc_t) to elements [off, off + n) of stream s, rounding to its dtype
// (round to nearest even, as torch's casts). Nothing to do when src already is that memory.
template <typename acc_t>
inline void store_stream(const mt::TensorEntry& t, int s, int64_t off, int64_t n, const acc_t* src) {
  char* p = stream_at(t, s, off);
  if (static_cast<const void*>(src) == static_cast<const void*>(p)) return;
  switch (static_cast<DType>(t.dtype[s])) {
    case DType::F32: at::vec::convert(src, reinterpret_cast<float*>(p), n); break;
    case DType::F64: at::vec::convert(src, reinterpret_cast<double*>(p), n); break;
    case DType::F16: at::vec::convert(src, reinterpret_cast<c10::Half*>(p), n); break;
    case DType::BF16: at::vec::convert(src, reinterpret_cast<c10::BFloat16*>(p), n); break;
  }
}

// Where to compute stream s's new values: the memory itself when its dtype is acc_t (and the
// values are written once), else scratch, to be narrowed by store_stream.
template <typename acc_t>
inline acc_t* out_stream(const mt::TensorEntry& t, int s, int64_t off, acc_t* scratch) {
  if (t.dtype[s] == int32_t(acc_dtype<acc_t>())) return reinterpret_cast<acc_t*>(stream_at(t, s, off));
  return scratch;
}

// Raw copy of n elements from stream src to stream dst (same dtype): bit exact.
inline void copy_stream(const mt::TensorEntry& t, int dst, int src, int64_t off, int64_t n) {
  std::memcpy(stream_at(t, dst, off), stream_at(t, src, off), size_t(n) * dtype_size(static_cast<DType>(t.dtype[src])));
}

// Sum of a vector's lanes, in double.
template <typename T>
inline double hsum(const at::vec::Vectorized<T>& v) {
  alignas(64) T buf[at::vec::Vectorized<T>::size()];
  v.store(buf);
  double s = 0;
  for (int i = 0; i < at::vec::Vectorized<T>::size(); ++i) s += double(buf[i]);
  return s;
}

// Applies f(vector index i, lanes) over [0, n): full vectors, then one partial vector whose
// inactive lanes the caller ignores (loads zero-fill them; partial stores leave memory alone).
template <typename acc_t, typename F>
inline void vec_loop(int64_t n, F f) {
  constexpr int64_t W = at::vec::Vectorized<acc_t>::size();
  int64_t i = 0;
  for (; i + W <= n; i += W) f(i, W);
  if (i < n) f(i, n - i);
}

template <typename acc_t>
inline at::vec::Vectorized<acc_t> vload(const acc_t* p, int64_t lanes) {
  using V = at::vec::Vectorized<acc_t>;
  return lanes == V::size() ? V::loadu(p) : V::loadu(p, lanes);
}

template <typename acc_t>
inline void vstore(acc_t* p, const at::vec::Vectorized<acc_t>& v, int64_t lanes) {
  using V = at::vec::Vectorized<acc_t>;
  if (lanes == V::size()) {
    v.store(p);
  } else {
    v.store(p, lanes);
  }
}

}  // namespace saf::cpu::CPU_CAPABILITY
