// The fp32 "onednn" way of the CPU attention path (genfast/ops/attention_cpu_fp32.py): its backward
// works on transposed score blocks, so that every gradient GEMM reads a row-major operand (oneDNN's
// fp32 GEMM runs ~3x slower when its first operand is a transposed view). No PyTorch headers.
#pragma once
#include <cstdint>

namespace genfast {
struct AttnColsParams {
  int64_t nk, nq;        // one head's block: nk key rows of nq query columns (row-major)
  int64_t q0;            // global index of query column 0 (causal: query i sees keys 0..q0 + i)
  float scale;           // multiplies the raw scores
  int32_t causal;
  const uint8_t* mask;   // [nk] of this head's sample, 1 = attend; nullptr: none
  const float* lse;      // [nq] natural-log log-sum-exp of each query row (+inf: no key)
  const float* delta;    // [nq] rowsum(dout * out) of each query row
};
// st = k q^T (raw scores, transposed) becomes p^T = exp(scale st - lse) (0 where masked);
// dpt = v dout^T becomes ds^T = p^T (dpt - delta) scale. Elementwise: no reduction along a row.
void attn_softmax_bwd_cols_cpu(const AttnColsParams& a, float* st, float* dpt);
}  // namespace genfast
