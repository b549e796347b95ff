// The pybind11 modules, one source compiled three times (setup.py):
//   -DGENFAST_MODULE_CPU       genfast._C         the C++ CPU kernels
//   -DGENFAST_MODULE_CUDA      genfast._cuda      the CUDA kernels (launch on the given stream)
//   -DGENFAST_MODULE_CUDA_EMU  genfast._cuda_emu  the same CUDA kernels run on the CPU (tests)
// Every function takes plain ints (data pointers, sizes, strides) and floats: no torch here, so
// the modules work with any torch version (DESIGN.md §2). The GIL is released around kernels.
#include <pybind11/pybind11.h>

#include <string>

#include "bind_util.h"
#include "flow_step.h"
#include "attention.h"

#if defined(GENFAST_MODULE_CUDA) || defined(GENFAST_MODULE_CUDA_EMU)
#define GENFAST_CUDA_SIDE 1
#endif
#if defined(GENFAST_MODULE_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;
namespace genfast {
namespace {

#ifdef GENFAST_CUDA_SIDE
// A CUDA launch error becomes a Python RuntimeError naming the kernel.
void check_launch(int err, const char* what) {
  if (err == 0) return;
#if defined(GENFAST_MODULE_CUDA)
  throw std::runtime_error(std::string("genfast: ") + what + " launch failed: " +
                           cudaGetErrorString(static_cast<cudaError_t>(err)));
#else
  throw std::runtime_error(std::string("genfast: emulated ") + what + " failed with code " + std::to_string(err));
#endif
}
#endif

void flow_step(uintptr_t out, uintptr_t x, uintptr_t vc, uintptr_t vu, int64_t rows, int64_t cols,
               int64_t out_rs, int64_t out_cs, int64_t x_rs, int64_t x_cs, int64_t vc_rs, int64_t vc_cs,
               int64_t vu_rs, int64_t vu_cs, uintptr_t dt, int64_t dt_stride, double dt_value, uintptr_t w,
               int64_t w_stride, double w_value, int32_t dtype, uintptr_t stream) {
  const FlowStepParams p = make_flow_step_params(out, x, vc, vu, rows, cols, out_rs, out_cs, x_rs, x_cs, vc_rs,
                                                 vc_cs, vu_rs, vu_cs, dt, dt_stride, dt_value, w, w_stride,
                                                 w_value, dtype);
  py::gil_scoped_release nogil;
#ifdef GENFAST_CUDA_SIDE
  check_launch(flow_step_cuda(p, reinterpret_cast<void*>(stream)), "flow_step");
#else
  (void)stream;
  flow_step_cpu(p);
#endif
}

#ifndef GENFAST_CUDA_SIDE
// The CPU attention path's fused softmax rows (csrc/attention.h); genfast._C only.
AttnRowsParams attn_rows_params(int64_t groups, int64_t rows, int64_t nk, int64_t heads, int64_t q0, double scale,
                                bool causal, uintptr_t mask, int64_t mask_bs, uintptr_t lse, int64_t lse_gs,
                                int32_t dtype) {
  if (dtype < kFloat32 || dtype > kBFloat16) throw py::value_error("genfast: unknown dtype code");
  return AttnRowsParams{groups, rows, nk, heads, q0, static_cast<float>(scale), causal ? 1 : 0,
                        reinterpret_cast<const uint8_t*>(mask), mask_bs, reinterpret_cast<float*>(lse), lse_gs, dtype};
}

void attn_softmax_rows(uintptr_t s, uintptr_t p, int64_t groups, int64_t rows, int64_t nk, int64_t heads, int64_t q0,
                       double scale, bool causal, uintptr_t mask, int64_t mask_bs, uintptr_t lse, int64_t lse_gs,
                       int32_t dtype) {
  const AttnRowsParams a = attn_rows_params(groups, rows, nk, heads, q0, scale, causal, mask, mask_bs, lse, lse_gs, dtype);
  py::gil_scoped_release nogil;
  attn_softmax_rows_cpu(a, reinterpret_cast<const void*>(s), reinterpret_cast<void*>(p));
}

void attn_softmax_bwd_rows(uintptr_t s, uintptr_t dp, uintptr_t p, uintptr_t ds, int64_t groups, int64_t rows,
                           int64_t nk, int64_t heads, int64_t q0, double scale, bool causal, uintptr_t mask,
                           int64_t mask_bs, uintptr_t lse, int64_t lse_gs, int32_t dtype) {
  const AttnRowsParams a = attn_rows_params(groups, rows, nk, heads, q0, scale, causal, mask, mask_bs, lse, lse_gs, dtype);
  py::gil_scoped_release nogil;
  attn_softmax_bwd_rows_cpu(a, reinterpret_cast<const void*>(s), reinterpret_cast<const void*>(dp),
                            reinterpret_cast<void*>(p), reinterpret_cast<void*>(ds));
}
#endif

void bind_all(py::module_& m) {
#ifndef GENFAST_CUDA_SIDE
  m.def("attn_softmax_rows", &attn_softmax_rows, "Fused scale + mask + softmax + log-sum-exp over score rows (csrc/attention.h).",
        py::arg("s"), py::arg("p"), py::arg("groups"), py::arg("rows"), py::arg("nk"), py::arg("heads"), py::arg("q0"),
        py::arg("scale"), py::arg("causal"), py::arg("mask"), py::arg("mask_bs"), py::arg("lse"), py::arg("lse_gs"),
        py::arg("dtype"));
  m.def("attn_softmax_bwd_rows", &attn_softmax_bwd_rows, "Fused softmax backward over score rows (csrc/attention.h).",
        py::arg("s"), py::arg("dp"), py::arg("p"), py::arg("ds"), py::arg("groups"), py::arg("rows"), py::arg("nk"),
        py::arg("heads"), py::arg("q0"), py::arg("scale"), py::arg("causal"), py::arg("mask"), py::arg("mask_bs"),
        py::arg("lse"), py::arg("lse_gs"), py::arg("dtype"));
#endif
  m.def("flow_step", &flow_step,
        "Fused rectified-flow Euler / CFG step over [rows, cols] strided views (see csrc/flow_step.h).",
        py::arg("out"), py::arg("x"), py::arg("vc"), py::arg("vu"), py::arg("rows"), py::arg("cols"),
        py::arg("out_rs"), py::arg("out_cs"), py::arg("x_rs"), py::arg("x_cs"), py::arg("vc_rs"),
        py::arg("vc_cs"), py::arg("vu_rs"), py::arg("vu_cs"), py::arg("dt"), py::arg("dt_stride"),
        py::arg("dt_value"), py::arg("w"), py::arg("w_stride"), py::arg("w_value"), py::arg("dtype"),
        py::arg("stream") = 0);
}

}  // namespace
}  // namespace genfast

#if defined(GENFAST_MODULE_CPU)
PYBIND11_MODULE(_C, m) {
  m.doc() = "genfast C++ CPU kernels";
  genfast::bind_all(m);
}
#elif defined(GENFAST_MODULE_CUDA)
PYBIND11_MODULE(_cuda, m) {
  m.doc() = "genfast CUDA kernels";
  genfast::bind_all(m);
}
#elif defined(GENFAST_MODULE_CUDA_EMU)
PYBIND11_MODULE(_cuda_emu, m) {
  m.doc() = "genfast CUDA kernels run on the CPU through csrc/emu (tests only)";
  genfast::bind_all(m);
}
#else
#error "compile bindings.cpp with one of GENFAST_MODULE_CPU / GENFAST_MODULE_CUDA / GENFAST_MODULE_CUDA_EMU"
#endif
