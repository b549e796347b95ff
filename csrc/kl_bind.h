// pybind11 glue of the reparam_kl kernels: fills KLForwardParams / KLBackwardParams from the
// plain ints the ops layer passes (genfast/ops/kl.py). Strides come as one list each call.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "kl.h"

namespace genfast {

template <typename P>
inline P* ptr(uintptr_t v) {
  return reinterpret_cast<P*>(v);
}

// strides: mu_rs, mu_cs, lv_rs, lv_cs, n_rs, n_cs, then the op's own (see the two makers).
inline KLCommon make_kl_common(uintptr_t mu, uintptr_t logvar, uintptr_t noise, uintptr_t seed, int64_t rows,
                               int64_t cols, const std::vector<int64_t>& st, double lo, double hi, bool clamp,
                               int32_t dtype) {
  if (dtype < kFloat32 || dtype > kBFloat16) throw pybind11::value_error("genfast: unknown dtype code");
  KLCommon c;
  c.mu = ptr<const void>(mu);
  c.logvar = ptr<const void>(logvar);
  c.noise = ptr<const void>(noise);
  c.seed = ptr<const int64_t>(seed);
  c.rows = rows;
  c.cols = cols;
  c.mu_rs = st[0], c.mu_cs = st[1], c.lv_rs = st[2], c.lv_cs = st[3], c.n_rs = st[4], c.n_cs = st[5];
  c.clamp_lo = static_cast<float>(lo);
  c.clamp_hi = static_cast<float>(hi);
  c.clamp = clamp ? 1 : 0;
  c.dtype = dtype;
  return c;
}

// strides: the six common ones, then z_rs, z_cs, kl_rs, kl_cs.
inline KLForwardParams make_kl_forward(uintptr_t z, uintptr_t kl, uintptr_t mu, uintptr_t logvar, uintptr_t noise,
                                       uintptr_t seed, int64_t rows, int64_t cols, const std::vector<int64_t>& st,
                                       double lo, double hi, bool clamp, bool kl_per_row, uintptr_t partial,
                                       int64_t row_blocks, int32_t dtype) {
  if (st.size() != 10) throw pybind11::value_error("genfast: kl_forward expects 10 strides");
  KLForwardParams p;
  p.in = make_kl_common(mu, logvar, noise, seed, rows, cols, st, lo, hi, clamp, dtype);
  p.z = ptr<void>(z);
  p.z_rs = st[6], p.z_cs = st[7];
  p.kl = ptr<float>(kl);
  p.kl_rs = st[8], p.kl_cs = st[9];
  p.kl_per_row = kl_per_row ? 1 : 0;
  p.partial = ptr<float>(partial);
  p.row_blocks = row_blocks;
  return p;
}

// strides: the six common ones, then dz_rs, dz_cs, gkl_rs, gkl_cs, dmu_rs, dmu_cs, dlv_rs, dlv_cs.
inline KLBackwardParams make_kl_backward(uintptr_t dmu, uintptr_t dlogvar, uintptr_t dz, uintptr_t gkl, uintptr_t mu,
                                         uintptr_t logvar, uintptr_t noise, uintptr_t seed, int64_t rows,
                                         int64_t cols, const std::vector<int64_t>& st, double lo, double hi,
                                         bool clamp, int32_t dtype) {
  if (st.size() != 14) throw pybind11::value_error("genfast: kl_backward expects 14 strides");
  KLBackwardParams p;
  p.in = make_kl_common(mu, logvar, noise, seed, rows, cols, st, lo, hi, clamp, dtype);
  p.dz = ptr<const void>(dz);
  p.dz_rs = st[6], p.dz_cs = st[7];
  p.gkl = ptr<const float>(gkl);
  p.gkl_rs = st[8], p.gkl_cs = st[9];
  p.dmu = ptr<void>(dmu);
  p.dlogvar = ptr<void>(dlogvar);
  p.dmu_rs = st[10], p.dmu_cs = st[11], p.dlv_rs = st[12], p.dlv_cs = st[13];
  return p;
}

}  // namespace genfast
