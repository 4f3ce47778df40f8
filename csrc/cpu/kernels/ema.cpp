// Vectorised CPU kernel of ema_update_ over one chunk of one tensor of a multi-tensor plan
// (streams: ema, model; csrc/include/saf/multi_tensor.h). Compiled once per instruction set;
// csrc/cpu/ema.cpp splits the chunks over threads and picks the build at run time.

#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/mt_vec.h"
#include "saf/multi_tensor.h"

namespace saf::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

void ema_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double weight) {
  // weight = 1 - decay; ema = lerp(ema, model, weight), as torch.lerp.
  const auto run = [&](auto zero) {
    using acc_t = decltype(zero);
    using V = Vectorized<acc_t>;
    alignas(64) acc_t sa[kMtBlock];
    alignas(64) acc_t sb[kMtBlock];
    const acc_t wt = acc_t(weight);
    const bool small = wt < acc_t(0.5);
    const V vw(wt), v1w(acc_t(1) - wt);
    for (int64_t off = start; off < start + n; off += kMtBlock) {
      const int64_t m = std::min(kMtBlock, start + n - off);
      const acc_t* e = load_stream<acc_t>(t, mt::ema::EMA, off, m, sa);
      const acc_t* x = load_stream<acc_t>(t, mt::ema::MODEL, off, m, sb);
      acc_t* out = out_stream<acc_t>(t, mt::ema::EMA, off, sa);
      vec_loop<acc_t>(m, [&](int64_t i, int64_t lanes) {
        const V a = vload(e + i, lanes), b = vload(x + i, lanes);
        vstore(out + i, small ? a + vw * (b - a) : b - (b - a) * v1w, lanes);
      });
      store_stream<acc_t>(t, mt::ema::EMA, off, m, out);
    }
  };
  if (t.dtype[mt::ema::EMA] == int32_t(DType::F64)) {
    run(double(0));
  } else {
    run(float(0));
  }
}

}  // namespace saf::cpu::CPU_CAPABILITY
