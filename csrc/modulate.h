// adaLN modulate and gated residual (DiT adaLN-Zero), shared by the CPU, CUDA and emulated-CUDA
// kernels. No PyTorch headers: the bindings fill these structs from Python ints.
//
//   modulate:        out = norm(x) * (1 + scale) + shift      norm over C, no affine, fp32 stats
//                    layer: xhat = (x - mean) * rstd, rstd = 1/sqrt(mean((x - mean)^2) + eps)
//                    rms:   xhat = x * rstd,          rstd = 1/sqrt(mean(x^2) + eps)   (mean = 0)
//   gated residual:  out = x + gate * y
//
// x, y, out, grad are [B, N, C] with row strides (sb, sn) and unit column stride; shift, scale and
// gate are [B, N, C] with (sb, sn) strides too, sn = 0 for a per-sample [B, C] tensor. Row r of
// the B*N rows is (b, n) = (r / N, r % N). All tensors share one dtype (DType); math in fp32.
//
// Per-sample gradients (dshift/dscale/dgate [B, C]) are sums over N, made deterministic without
// atomics: rows are cut into chunks of `chunk_rows` (chosen by the caller, independent of thread
// count), each chunk writes its fp32 partial sums to `partial` [B, nchunks, 2, C], and a second
// step adds the chunks in order and writes the [B, C] results in the tensors' dtype.
// The CPU kernels also take partial = nullptr: then the thread that owns a sample adds its chunks
// in the same order (same bits) inside the one parallel region (csrc/cpu/modulate.cpp, gated_residual.cpp).
#pragma once
#include <cstdint>

#include "flow_step.h"  // DType

namespace genfast {

struct ModulateParams {
  void* out;            // [B, N, C] strides (out_sb, out_sn, 1)
  const void* x;        // [B, N, C] strides (x_sb, x_sn, 1)
  const void* shift;    // nullptr: no shift
  const void* scale;
  float* mean;          // [B * N] fp32, written (0 for rms): saved for the backward; both null:
  float* rstd;          // [B * N] fp32, written                  not written (inference)
  int64_t B, N, C;
  int64_t out_sb, out_sn, x_sb, x_sn, shift_sb, shift_sn, scale_sb, scale_sn;
  float eps;
  int32_t rms;          // 1: RMS norm, 0: layer norm
  int32_t dtype;
};

struct ModulateBwdParams {
  void* dx;             // [B, N, C] strides (dx_sb, dx_sn, 1); nullptr: not needed
  void* dshift;         // per token: [B, N, C] contiguous; per sample: [B, C] contiguous; nullptr: not needed
  void* dscale;         // same layout as dshift
  float* partial;       // per sample only: [B, nchunks, 2, C] fp32 workspace (CPU: may be nullptr)
  // dx += addend, read with dx's strides (nullptr: none): a residual's gradient added in the same
  // pass, as dx rounded to the dtype plus the addend, rounded again: the bits of a separate add
  const void* addend;
  const void* grad;     // [B, N, C] strides (g_sb, g_sn, 1)
  const void* x;
  const void* scale;
  const float* mean;    // [B * N] from the forward
  const float* rstd;
  int64_t B, N, C;
  int64_t dx_sb, dx_sn, g_sb, g_sn, x_sb, x_sn, scale_sb, scale_sn;
  int64_t chunk_rows;   // per sample: rows of one partial sum; nchunks = ceil(N / chunk_rows)
  int32_t per_sample;   // 1: dshift/dscale are [B, C] sums over N; 0: [B, N, C] elementwise
  int32_t rms;
  int32_t dtype;
};

struct GatedResidualParams {
  void* out;            // [B, N, C] (out_sb, out_sn, 1); may be x exactly
  const void* x;
  const void* gate;     // gate_sn = 0: per sample
  const void* y;
  int64_t B, N, C;
  int64_t out_sb, out_sn, x_sb, x_sn, gate_sb, gate_sn, y_sb, y_sn;
  int32_t dtype;
};

// dx = grad is not computed (the caller passes grad on); dy = grad * gate, dgate = grad * y (per
// token) or its sum over N (per sample, same chunked partials as ModulateBwdParams).
// dbias: the column sums of dy over all B * N rows, of the values as stored (rounded to the dtype),
// i.e. the bias gradient of the Linear whose output y is (DiT's proj and fc2): saves the caller a
// second pass over dy. Chunk sums go to bias_partial[b, k, :] (fp32); each sample's chunks are added
// in order into bias_partial[B * nchunks + b, :], then the samples in order (two short sums with B *
// C / 128 and C / 128 column blocks, not one of B * nchunks terms with C / 128): the same bits on
// every backend whose dy bits agree. Per sample only, with dy.
struct GatedResidualBwdParams {
  void* dy;             // [B, N, C] contiguous; nullptr: not needed
  void* dgate;          // [B, N, C] or [B, C] contiguous; nullptr: not needed
  float* partial;       // per sample only: [B, nchunks, C] fp32 workspace (CPU: may be nullptr)
  void* dbias;          // [C]; nullptr: not needed (needs dy and per_sample)
  float* bias_partial;  // with dbias: [B * nchunks + B, C] fp32 workspace
  const void* grad;
  const void* gate;
  const void* y;
  int64_t B, N, C;
  int64_t g_sb, g_sn, gate_sb, gate_sn, y_sb, y_sn;
  int64_t chunk_rows;
  int32_t per_sample;
  int32_t dtype;
};

// csrc/cpu/modulate.cpp
void modulate_fwd_cpu(const ModulateParams& p);
void modulate_bwd_cpu(const ModulateBwdParams& p);
// csrc/cpu/gated_residual.cpp
void gated_residual_fwd_cpu(const GatedResidualParams& p);
void gated_residual_bwd_cpu(const GatedResidualBwdParams& p);
// fp32, CPU (the DiT block's fused path, genfast/ops/dit_block.py): out = x + gate * (y + bias),
// gate per sample (row b at gate + b * gate_sb, unit stride), bias [C], x, y, out [B, N, C]
// contiguous (out may be x); with keep_y, y + bias is written back into y (what a Linear with that
// bias makes, which the backward reads).
void gated_residual_bias_fp32_cpu(float* out, const float* x, const float* gate, int64_t gate_sb, float* y,
                                  const float* bias, int64_t B, int64_t N, int64_t C, bool keep_y);

// csrc/cuda/modulate.cu: launch on `stream`, return the cudaError_t as an int (see flow_step.h).
int modulate_fwd_cuda(const ModulateParams& p, void* stream);
int modulate_bwd_cuda(const ModulateBwdParams& p, void* stream);
int gated_residual_fwd_cuda(const GatedResidualParams& p, void* stream);
int gated_residual_bwd_cuda(const GatedResidualBwdParams& p, void* stream);

}  // namespace genfast
