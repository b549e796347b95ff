// The rectified-flow Euler / classifier-free-guidance step, shared by the CPU, CUDA and
// emulated-CUDA kernels. No PyTorch headers: the bindings fill this struct from Python ints.
//
//   out[r, c] = x[r, c] - dt_r * ((1 + w_r) * vc[r, c] - w_r * vu[r, c])   (vu != nullptr)
//   out[r, c] = x[r, c] - dt_r * vc[r, c]                                  (vu == nullptr)
//
// Every tensor is seen as a 2-D view [rows, cols] (rows = the batch, cols = the rest collapsed
// into one strided dimension) with its own row and column strides, counted in elements, so the
// two halves of a doubled-batch model output are read in place. Math in fp32; out may be x.
#pragma once
#include <cstdint>

namespace genfast {

enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct FlowStepParams {
  void* out;
  const void* x;
  const void* vc;
  const void* vu;  // nullptr: plain Euler step, guidance unused
  int64_t rows, cols;
  int64_t out_rs, out_cs, x_rs, x_cs, vc_rs, vc_cs, vu_rs, vu_cs;
  // dt_r = dt ? dt[r * dt_stride] : dt_value (dt_stride 0: one value for all rows). fp32, on
  // the kernel's device, read there: no host synchronisation.
  const float* dt;
  int64_t dt_stride;
  float dt_value;
  const float* w;  // guidance, same convention as dt
  int64_t w_stride;
  float w_value;
  int32_t dtype;  // DType of out, x, vc, vu (all the same)
};

// csrc/cpu/flow_step.cpp
void flow_step_cpu(const FlowStepParams& p);

// csrc/cuda/flow_step.cu: launches on `stream` (a cudaStream_t) and returns the cudaError_t of
// the launch as an int. Built by nvcc into genfast._cuda, and as C++ with -DGENFAST_EMULATE
// into genfast._cuda_emu, where the stream is ignored and the kernel runs on the CPU.
int flow_step_cuda(const FlowStepParams& p, void* stream);

}  // namespace genfast
