// pybind11 glue shared by genfast._C, genfast._cuda and genfast._cuda_emu: turns the plain
// Python ints and floats the ops layer passes (data pointers, sizes, strides) into the
// kernels' parameter structs. Nothing here knows about torch.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

#include "flow_step.h"
#include "vq.h"

namespace genfast {

inline FlowStepParams make_flow_step_params(
    uintptr_t out, uintptr_t x, uintptr_t vc, uintptr_t vu, int64_t rows, int64_t cols,
    int64_t out_rs, int64_t out_cs, int64_t x_rs, int64_t x_cs, int64_t vc_rs, int64_t vc_cs,
    int64_t vu_rs, int64_t vu_cs, uintptr_t dt, int64_t dt_stride, double dt_value, uintptr_t w,
    int64_t w_stride, double w_value, int32_t dtype) {
  FlowStepParams p;
  p.out = reinterpret_cast<void*>(out);
  p.x = reinterpret_cast<const void*>(x);
  p.vc = reinterpret_cast<const void*>(vc);
  p.vu = reinterpret_cast<const void*>(vu);
  p.rows = rows;
  p.cols = cols;
  p.out_rs = out_rs;
  p.out_cs = out_cs;
  p.x_rs = x_rs;
  p.x_cs = x_cs;
  p.vc_rs = vc_rs;
  p.vc_cs = vc_cs;
  p.vu_rs = vu_rs;
  p.vu_cs = vu_cs;
  p.dt = reinterpret_cast<const float*>(dt);
  p.dt_stride = dt_stride;
  p.dt_value = static_cast<float>(dt_value);
  p.w = reinterpret_cast<const float*>(w);
  p.w_stride = w_stride;
  p.w_value = static_cast<float>(w_value);
  p.dtype = dtype;
  if (dtype < kFloat32 || dtype > kBFloat16) throw pybind11::value_error("genfast: unknown dtype code");
  return p;
}

// The Python-side argument order of every flow_step binding (a trailing `stream` int where the
// module launches CUDA work): out, x, vc, vu, rows, cols, out_rs, out_cs, x_rs, x_cs, vc_rs,
// vc_cs, vu_rs, vu_cs, dt, dt_stride, dt_value, w, w_stride, w_value, dtype. Pointers are ints
// (0 for none).

inline VqParams make_vq_params(uintptr_t z, int64_t n, int64_t d, int64_t z_inner, int64_t z_os, int64_t z_rs,
                               int64_t z_cs, int32_t z_dtype,
                               uintptr_t codebook, int64_t k, int64_t c_rs, int64_t c_cs, int32_t c_dtype,
                               int32_t metric, int32_t precision, uintptr_t indices, uintptr_t distance) {
  VqParams p;
  p.z = reinterpret_cast<const void*>(z);
  p.n = n;
  p.d = d;
  p.z_inner = z_inner;
  p.z_os = z_os;
  p.z_rs = z_rs;
  p.z_cs = z_cs;
  p.z_dtype = z_dtype;
  p.codebook = reinterpret_cast<const void*>(codebook);
  p.k = k;
  p.c_rs = c_rs;
  p.c_cs = c_cs;
  p.c_dtype = c_dtype;
  p.metric = metric;
  p.precision = precision;
  p.indices = reinterpret_cast<int64_t*>(indices);
  p.distance = reinterpret_cast<float*>(distance);
  for (int32_t t : {z_dtype, c_dtype})
    if (t < kFloat32 || t > kBFloat16) throw pybind11::value_error("genfast: unknown dtype code");
  if (metric != kVqL2 && metric != kVqCosine) throw pybind11::value_error("genfast: unknown vq metric code");
  if (precision != kVqFp32 && precision != kVqBf16Screen) throw pybind11::value_error("genfast: unknown vq precision");
  if (d < 1 || k < 1 || k > INT32_MAX || z_inner < 1) throw pybind11::value_error("genfast: vq needs d >= 1 and 1 <= k < 2^31");
  return p;
}

// vq_nearest(z, n, d, z_inner, z_os, z_rs, z_cs, z_dtype, codebook, k, c_rs, c_cs, c_dtype, metric, precision,
// indices, distance[, stream]) and vq_counts(indices, n, idx_stride, k, counts[, stream]): pointers are ints.

}  // namespace genfast
