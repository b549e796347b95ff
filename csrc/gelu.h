// GELU with the tanh approximation (DiT's MLP activation), forward and backward, over contiguous
// buffers (genfast/ops/gelu.py). torch 2.13's CPU kernel for approximate="tanh" is several times
// slower than this one pass in bf16 (measured 4.1 vs 1.4 ms over 2048 x 1536, one thread).
//   y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
//   dy/dx = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
#pragma once
#include <cstdint>

namespace genfast {

// y[i] = gelu(x[i]); y may alias x. dtype: DType code (fp32 / fp16 / bf16); math in fp32.
void gelu_tanh_cpu(const void* x, void* y, int64_t n, int32_t dtype);
// fp32, [rows, cols] contiguous: h = x + bias per row, written back into x (the pre-activation of a
// Linear with that bias, which the backward reads), and y = gelu(h); y may alias x (then y only).
// The DiT block's fused CPU path: fc1 as a GEMM without bias (genfast/ops/dit_block.py).
void gelu_tanh_bias_fp32_cpu(float* x, float* y, const float* bias, int64_t rows, int64_t cols);
// dx[i] = g[i] * gelu'(x[i]); dx may alias g.
void gelu_tanh_backward_cpu(const void* g, const void* x, void* dx, int64_t n, int32_t dtype);

// The MLP backward's fused pass (genfast/ops/gelu.py gelu_tanh_backward_bias): over contiguous
// [M, K] grad and h, dh = grad * gelu'(h) rounded to the dtype, and dbias[k] = the column sums of
// those rounded dh values. The sums are deterministic and device independent: rows are cut into
// chunks of chunk_rows (the caller's constant), each chunk's fp32 sums go to partial[chunk, K]; the
// chunks are added in groups of chunk_group (in order; the chunks past M count as zeros) into
// partial[nchunks_padded + group, K], then the groups in order, rounded to the dtype once. (Two short
// sums: one sum of M / chunk_rows terms over K / 128 column blocks was latency-bound.)
struct GeluBiasBwdParams {
  void* dh;             // [M, K] contiguous, written
  void* dbias;          // [K], written
  float* partial;       // [ngroups * chunk_group + ngroups, K] fp32 workspace, ngroups = ceil(M / chunk_rows / chunk_group)
  const void* grad;     // [M, K] contiguous
  const void* h;        // [M, K] contiguous: the pre-activation
  int64_t M, K;
  int64_t chunk_rows;
  int64_t chunk_group;  // chunks a first-level sum adds
  int32_t dtype;        // DType code, one for all tensors but partial; math in fp32
};

// csrc/cpu/gelu.cpp (the DiT block's fused CPU backward: fc1's bias gradient without a second pass
// over dh) and csrc/cuda/gelu.cu (launch on `stream`, return the cudaError_t as an int: flow_step.h).
void gelu_tanh_backward_bias_cpu(const GeluBiasBwdParams& p);
int gelu_tanh_backward_bias_cuda(const GeluBiasBwdParams& p, void* stream);

// The bias gradients of a fused qkv projection (genfast/ops/gelu.py column_sums): out = the column
// sums of [src0 | src1 | src2] (n of them, each [M, width_i] contiguous), fp32 sums in the same chunks
// and groups as GeluBiasBwdParams, rounded to the dtype once.
struct ColumnSumsParams {
  const void* src[3];
  int64_t width[3];
  int32_t n;            // 1..3
  void* out;            // [sum of widths], written
  float* partial;       // [ngroups * chunk_group + ngroups, sum of widths] fp32 workspace
  int64_t M;
  int64_t chunk_rows, chunk_group;
  int32_t dtype;
};

// csrc/cpu/gelu.cpp, csrc/cuda/colsum.cu
void column_sums_cpu(const ColumnSumsParams& p);
int column_sums_cuda(const ColumnSumsParams& p, void* stream);

}  // namespace genfast
