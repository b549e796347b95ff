// Row kernels of the CPU attention path (genfast/ops/attention_cpu.py). The GEMMs q k^T, p v and
// the backward's stay torch's own (oneDNN; bf16 on the AVX-512 BF16 units); these fuse everything
// between them into one pass over each block of scores, which is where the plain path loses its
// time (a scale pass, a softmax pass and, for a backward, a log-sum-exp pass over Nq x Nk).
// No PyTorch headers: the bindings fill these structs from Python ints.
//
// Scores come as G = B*H stacked blocks [G, rows, nk] (contiguous, the GEMM's output) for query
// rows q0 .. q0 + rows of every head; head g belongs to sample g / heads.
#pragma once
#include <cstdint>

#include "flow_step.h"  // DType

namespace genfast {

struct AttnRowsParams {
  int64_t groups, rows, nk;  // G = B*H, query rows in this block, keys
  int64_t heads;             // H (g / heads = the sample, for the key padding mask)
  int64_t q0;                // index of the block's first query row (causal: row i sees keys 0..i)
  float scale;               // multiplies the raw scores
  int32_t causal;
  const uint8_t* mask;  // [B, nk] 1 = attend, stride mask_bs between samples; nullptr: none
  int64_t mask_bs;
  float* lse;  // [G, rows] at lse + g * lse_gs + r (natural log; +inf for a row with no key)
  int64_t lse_gs;
  int32_t dtype;  // of s / p / dp / ds
  int32_t from_p;  // backward only: s already holds the probabilities (kept by the forward)
};

// Forward: p = softmax(scale * s + mask) row by row, and lse. p may alias s.
void attn_softmax_rows_cpu(const AttnRowsParams& a, const void* s, void* p);

// Backward: p = exp(scale * s + mask - lse) (lse read), ds = p * (dp - rowsum(p * dp)) * scale.
// p may alias s and ds may alias dp. With from_p, s is p itself (masked entries already 0) and p
// is not written (may be null).
void attn_softmax_bwd_rows_cpu(const AttnRowsParams& a, const void* s, const void* dp, void* p, void* ds);

}  // namespace genfast
