// pybind11 glue for adaLN modulate / gated residual (see modulate.h): the Python side passes data
// pointers as ints (0 for none) and each tensor's (batch, row) strides as a tuple, in the order
// of the struct fields. Nothing here knows about torch.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "modulate.h"

namespace genfast {

template <typename T>
inline T* raw(uintptr_t p) { return reinterpret_cast<T*>(p); }  // a Python int as a pointer

inline void check_dtype_code(int32_t dtype) {
  if (dtype < kFloat32 || dtype > kBFloat16) throw pybind11::value_error("genfast: unknown dtype code");
}

// strides: out_sb, out_sn, x_sb, x_sn, shift_sb, shift_sn, scale_sb, scale_sn
inline ModulateParams make_modulate_params(uintptr_t out, uintptr_t x, uintptr_t shift, uintptr_t scale,
                                           uintptr_t mean, uintptr_t rstd, int64_t B, int64_t N, int64_t C,
                                           const std::array<int64_t, 8>& s, double eps, bool rms, int32_t dtype) {
  check_dtype_code(dtype);
  return ModulateParams{raw<void>(out), raw<const void>(x), raw<const void>(shift), raw<const void>(scale),
                        raw<float>(mean), raw<float>(rstd), B, N, C, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
                        static_cast<float>(eps), rms ? 1 : 0, dtype};
}

// strides: dx_sb, dx_sn, g_sb, g_sn, x_sb, x_sn, scale_sb, scale_sn
inline ModulateBwdParams make_modulate_bwd_params(uintptr_t dx, uintptr_t dshift, uintptr_t dscale, uintptr_t partial,
                                                  uintptr_t grad, uintptr_t x, uintptr_t scale, uintptr_t mean,
                                                  uintptr_t rstd, int64_t B, int64_t N, int64_t C,
                                                  const std::array<int64_t, 8>& s, int64_t chunk_rows,
                                                  bool per_sample, bool rms, int32_t dtype, uintptr_t addend) {
  check_dtype_code(dtype);
  if (per_sample && chunk_rows < 1) throw pybind11::value_error("genfast: chunk_rows must be >= 1");
  if (addend && !dx) throw pybind11::value_error("genfast: an addend needs dx");
  return ModulateBwdParams{raw<void>(dx), raw<void>(dshift), raw<void>(dscale), raw<float>(partial),
                           raw<const void>(addend), raw<const void>(grad), raw<const void>(x), raw<const void>(scale),
                           raw<const float>(mean), raw<const float>(rstd), B, N, C, s[0], s[1], s[2], s[3], s[4],
                           s[5], s[6], s[7], chunk_rows, per_sample ? 1 : 0, rms ? 1 : 0, dtype};
}

// strides: out_sb, out_sn, x_sb, x_sn, gate_sb, gate_sn, y_sb, y_sn
inline GatedResidualParams make_gated_params(uintptr_t out, uintptr_t x, uintptr_t gate, uintptr_t y, int64_t B,
                                             int64_t N, int64_t C, const std::array<int64_t, 8>& s, int32_t dtype) {
  check_dtype_code(dtype);
  return GatedResidualParams{raw<void>(out), raw<const void>(x), raw<const void>(gate), raw<const void>(y), B, N, C,
                             s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], dtype};
}

// strides: g_sb, g_sn, gate_sb, gate_sn, y_sb, y_sn
inline GatedResidualBwdParams make_gated_bwd_params(uintptr_t dy, uintptr_t dgate, uintptr_t partial, uintptr_t grad,
                                                    uintptr_t gate, uintptr_t y, int64_t B, int64_t N, int64_t C,
                                                    const std::array<int64_t, 6>& s, int64_t chunk_rows,
                                                    bool per_sample, int32_t dtype, uintptr_t dbias,
                                                    uintptr_t bias_partial) {
  check_dtype_code(dtype);
  if (per_sample && chunk_rows < 1) throw pybind11::value_error("genfast: chunk_rows must be >= 1");
  if (dbias && !(per_sample && dy && bias_partial))
    throw pybind11::value_error("genfast: dbias needs per_sample, dy and bias_partial");
  return GatedResidualBwdParams{raw<void>(dy), raw<void>(dgate), raw<float>(partial), raw<void>(dbias),
                                raw<float>(bias_partial), raw<const void>(grad), raw<const void>(gate),
                                raw<const void>(y), B, N, C, s[0], s[1], s[2], s[3], s[4], s[5], chunk_rows,
                                per_sample ? 1 : 0, dtype};
}

}  // namespace genfast
