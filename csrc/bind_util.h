// pybind11 glue shared by genfast._C, genfast._cuda and genfast._cuda_emu: turns the plain
// Python ints and floats the ops layer passes (data pointers, sizes, strides) into the
// kernels' parameter structs. Nothing here knows about torch.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

#include "flow_step.h"

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

}  // namespace genfast
