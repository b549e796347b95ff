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

namespace genfast {
// The fp32 "small" way (the default fp32 CPU way on AVX-512): one C++ call for all heads, OpenMP
// over (batch, head), each head's GEMMs single-threaded through an AVX-512 register-blocked
// micro-kernel, query rows in blocks of bq so a thread's score blocks stay near its L2.
struct AttnHeadIn {   // a [B, H, N, D] tensor of the call's dtype, any strides (elements)
  const void* p;
  int64_t bs, hs, ns, ds;
};
struct AttnHeadOut {  // a [B, H, N, D] tensor of the call's dtype with a unit last stride
  void* p;
  int64_t bs, hs, ns;
};
struct AttnSmallParams {
  int64_t b, h, nq, nk, d;
  int64_t bq;  // query rows per block: a thread's scratch is 2 * bq * nk floats (+ B panels)
  float scale;
  int32_t causal;
  const uint8_t* mask;  // [B, nk] (stride mask_bs), 1 = attend; nullptr: none
  int64_t mask_bs;
  AttnHeadIn q, k, v, dout;  // dout: backward only
  AttnHeadIn o;              // backward (fp32): the forward's out (unit last stride), for delta = rowsum(dout * out)
  float* lse;                // [B * H, nq]: written by the forward, read by the backward
  AttnHeadOut out, dq, dk, dv;
  // p [B * H, nq, nk] contiguous in the call's dtype, kept by the forward (written when not null)
  // and read by the backward instead of recomputing q k^T and the exponentials (when not null).
  void* p_keep;
  int32_t amx;  // bf16: run on AMX tiles where attn_amx_supported() (attention_bf16_amx.cpp)
};
// Forward: out and lse (+inf on rows with no key; their out rows are 0).
void attn_small_forward_cpu(const AttnSmallParams& a);
// Backward: dq, dk, dv from lse and o (delta = rowsum(dout * o), each query block's rows in turn).
void attn_small_backward_cpu(const AttnSmallParams& a);
bool attn_small_supported();  // the CPU has AVX-512 (else the caller takes another way)

// The bf16 "small" way (csrc/cpu/attention_bf16_small.cpp): the same structure on AVX-512 BF16
// dot products (vdpbf16ps): q, k, v, dout, out, dq, dk, dv bf16 with unit last strides and an even
// head dim; scores, softmax and the dk / dv sums in fp32, p and ds rounded to bf16 for their GEMMs.
// The backward takes delta from its own rows (rowsum(p dp)); a.o is not read.
void attn_small16_forward_cpu(const AttnSmallParams& a);
void attn_small16_backward_cpu(const AttnSmallParams& a);
// The same on AMX tiles (csrc/cpu/attention_bf16_amx.cpp), called by the two above when a.amx is
// set and the CPU (and the OS) give this process AMX-BF16.
bool attn_amx_supported();
void attn_small16_amx_forward_cpu(const AttnSmallParams& a);
void attn_small16_amx_backward_cpu(const AttnSmallParams& a);
}  // namespace genfast
