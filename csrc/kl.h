// Reparameterized Gaussian sample and its KL to N(0, 1), forward and backward, shared by the CPU,
// CUDA and emulated-CUDA kernels. No PyTorch headers: the bindings fill these structs from ints.
//
// Forward, per element (math in fp32, lv = clamp(logvar, lo, hi) when clamp is on):
//   s = exp(lv / 2),  z = mu + eps * s,  kl = 0.5 * (mu^2 + s^2 - 1 - lv)
//   kl_per_row: kl_out[r] = sum over the row (fp32 per block, rows reduced in a fixed order)
//   else:       kl_out[r, c] = kl (fp32, strides kl_rs / kl_cs)
// Backward, with dz and gk = dL/dkl[r, c] (fp32; a per-row gradient is a column stride of 0):
//   dmu = dz + gk * mu,  dlogvar = [lo <= logvar <= hi] * 0.5 * (dz * eps * s + gk * (s^2 - 1))
// eps is regenerated from (seed, offset) with csrc/philox.h (the stream is defined there) unless
// an explicit noise tensor is given. Every tensor is a 2-D strided view [rows, cols] (rows = the
// batch), so the two chunks of one encoder output are read in place. Strides count elements.
#pragma once
#include <cstdint>

#include "flow_step.h"  // DType
#include "philox.h"     // GENFAST_HD

namespace genfast {

struct KLCommon {
  const void* mu;
  const void* logvar;
  const void* noise;  // nullptr: Philox noise from seed
  // [2] int64 on the kernel's device: seed, offset. Read there (no host sync; CUDA-graph safe).
  const int64_t* seed;
  int64_t rows, cols;
  int64_t mu_rs, mu_cs, lv_rs, lv_cs, n_rs, n_cs;
  float clamp_lo, clamp_hi;
  int32_t clamp;  // 0: no clamp (lo/hi ignored)
  int32_t dtype;  // DType of mu, logvar, noise, z, dz, dmu, dlogvar
};

struct KLForwardParams {
  KLCommon in;
  void* z;
  int64_t z_rs, z_cs;
  float* kl;  // fp32: [rows] when kl_per_row, else [rows, cols] with strides kl_rs, kl_cs
  int64_t kl_rs, kl_cs;
  int32_t kl_per_row;
  // Per-row sums need a [rows, row_blocks] fp32 scratch on the CUDA side (filled, then summed
  // in a fixed order by a second tiny kernel): deterministic. The CPU kernel ignores it.
  float* partial;
  int64_t row_blocks;
};

struct KLBackwardParams {
  KLCommon in;
  const void* dz;  // nullptr: z unused (dz = 0)
  int64_t dz_rs, dz_cs;
  const float* gkl;  // nullptr: kl unused; else fp32 with strides gkl_rs, gkl_cs (cs 0: per row)
  int64_t gkl_rs, gkl_cs;
  void* dmu;
  void* dlogvar;
  int64_t dmu_rs, dmu_cs, dlv_rs, dlv_cs;
};

// One element of the formulas above, shared by the CPU and CUDA kernels so that they cannot drift apart
// (the CUDA clamp once used fminf / fmaxf, which turn a NaN logvar into lo and hide a diverged encoder).
// clamp(logvar, lo, hi) by torch.clamp's rule: NaN stays NaN.
GENFAST_HD float kl_clamp(float l, bool clamp, float lo, float hi) {
  return clamp ? (l < lo ? lo : (l > hi ? hi : l)) : l;
}

// dlogvar from logvar before the clamp (l0) and s = exp(clamp(l0) / 2). A term whose output had no
// gradient (has_dz / has_g false) is left out, not multiplied by 0: exp may be inf without a clamp, and
// 0 * inf is NaN where autograd's own formula has no such term (a loss through z alone at logvar > 88).
GENFAST_HD float kl_dlogvar(float l0, bool clamp, float lo, float hi, float s, float dz, float eps, float gk,
                            bool has_dz, bool has_g) {
  const bool pass = !clamp | ((l0 >= lo) & (l0 <= hi));  // bitwise, no branches: the CPU loop vectorises
  const float tz = has_dz ? dz * eps * s : 0.0f, tk = has_g ? gk * (s * s - 1.0f) : 0.0f;
  return pass ? 0.5f * (tz + tk) : 0.0f;
}

// csrc/cpu/kl.cpp
void kl_forward_cpu(const KLForwardParams& p);
void kl_backward_cpu(const KLBackwardParams& p);

// csrc/cuda/kl.cu: launch on `stream`, return the cudaError_t of the launches as an int.
int kl_forward_cuda(const KLForwardParams& p, void* stream);
int kl_backward_cuda(const KLBackwardParams& p, void* stream);
// Column blocks per row the CUDA forward uses (sizes the partial scratch).
int64_t kl_cuda_row_blocks(int64_t cols);

}  // namespace genfast
