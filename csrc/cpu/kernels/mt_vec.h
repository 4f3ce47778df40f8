// The scaffolding of the vectorised multi-tensor CPU kernels (csrc/cpu/kernels/{sam,ema,esam,
// rsam,gsam}.cpp): stream access in blocks of kMtBlock elements, the float / double dispatch of a
// chunk, scratch, the norm's accumulators, the restore and torch.optim.SGD's update as vectors.
// A method's kernel file holds only its chunk functions written with these.
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

// A chunk's accumulation type: double for float64 tensors, else float. SAF_MT_ACC_DISPATCH(t,
// impl, args...) returns impl<acc_t>(args...).
inline bool is_f64(const mt::TensorEntry& t) { return t.dtype[0] == int32_t(DType::F64); }
#define SAF_MT_ACC_DISPATCH(t, impl, ...) \
  return is_f64(t) ? impl<double>(__VA_ARGS__) : impl<float>(__VA_ARGS__)

// Widened copies of three (Scratch3, extended by the kernels that need more room) or five streams
// of one block.
template <typename acc_t>
struct Scratch3 {
  alignas(64) acc_t a[kMtBlock];
  alignas(64) acc_t b[kMtBlock];
  alignas(64) acc_t c[kMtBlock];
};

template <typename acc_t>
struct Scratch : Scratch3<acc_t> {
  alignas(64) acc_t d[kMtBlock];
  alignas(64) acc_t e[kMtBlock];
};

// A sum of squares in two vector accumulators, alternating: more adds in flight, and a little
// less rounding. The order of the adds is fixed by the chunk, never by the threads.
template <typename acc_t>
struct SumSq {
  using V = at::vec::Vectorized<acc_t>;
  V acc0{acc_t(0)}, acc1{acc_t(0)};
  int step = 0;
  void add(const V& x) {
    if (step++ & 1) {
      acc1 = acc1 + x * x;
    } else {
      acc0 = acc0 + x * x;
    }
  }
  // Each block of kMtBlock elements starts on acc0 again.
  void next_block() { step = 0; }
  double sum() const { return hsum(acc0 + acc1); }
};

// The restored weights of elements [off, off + m) in acc_t (copy mode: the stash; delta mode:
// w - stash), computed into out (streams in sam's slots W and STASH, shared by every op).
template <typename acc_t>
const acc_t* restored(const mt::TensorEntry& t, int64_t off, int64_t m, int64_t mode, acc_t* s1, acc_t* s2,
                      acc_t* out) {
  if (mode == mt::sam::COPY) return load_stream<acc_t>(t, mt::sam::STASH, off, m, out);
  const acc_t* w = load_stream<acc_t>(t, mt::sam::W, off, m, s1);
  const acc_t* e = load_stream<acc_t>(t, mt::sam::STASH, off, m, s2);
  vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) { vstore(out + i, vload(w + i, lanes) - vload(e + i, lanes), lanes); });
  return out;
}

// Delta mode: writes the perturbation e to the stash and returns it rounded to the stash's dtype
// and back (what the perturbation adds, so that the restore subtracts exactly that).
template <typename acc_t>
const acc_t* store_delta(const mt::TensorEntry& t, int64_t off, int64_t m, const acc_t* e, acc_t* scratch) {
  if (t.dtype[mt::sam::STASH] == int32_t(acc_dtype<acc_t>())) {
    std::memcpy(stream_at(t, mt::sam::STASH, off), e, size_t(m) * sizeof(acc_t));
    return e;
  }
  store_stream<acc_t>(t, mt::sam::STASH, off, m, e);
  return load_stream<acc_t>(t, mt::sam::STASH, off, m, scratch);
}

// torch.optim.SGD's update of a vector (saf/multi_tensor.h's sgd_step, same order of operations)
// with the tensor's hyper-parameters in sgd's slots: new weights from the restored weights wv
// and the (unscaled) gradient gv; buf[i, i + lanes) (the momentum buffer) read and written when
// momentum != 0.
template <typename acc_t>
struct SgdVec {
  using V = at::vec::Vectorized<acc_t>;
  acc_t wd;
  bool nesterov, maximize, first, has_buf;
  V vlr, vwd, vmom, vdamp1;
  explicit SgdVec(const mt::TensorEntry& t)
      : wd(acc_t(t.param[mt::sgd::WD])),
        nesterov(t.flags & mt::sgd::kNesterov),
        maximize(t.flags & mt::sgd::kMaximize),
        first(t.flags & mt::sgd::kFirstRun),
        has_buf(acc_t(t.param[mt::sgd::MOMENTUM]) != acc_t(0)),
        vlr(acc_t(t.param[mt::sgd::LR])),
        vwd(wd),
        vmom(acc_t(t.param[mt::sgd::MOMENTUM])),
        vdamp1(acc_t(1) - acc_t(t.param[mt::sgd::DAMPENING])) {}
  V step(const V& wv, V gv, acc_t* buf, int64_t i, int64_t lanes) const {
    if (maximize) gv = V(acc_t(0)) - gv;
    if (wd != acc_t(0)) gv = gv + vwd * wv;
    if (has_buf) {
      const V b = first ? gv : vload(buf + i, lanes) * vmom + vdamp1 * gv;
      vstore(buf + i, b, lanes);
      gv = nesterov ? gv + vmom * b : b;
    }
    return wv - vlr * gv;
  }
};

}  // namespace saf::cpu::CPU_CAPABILITY
