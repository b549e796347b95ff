// Flash attention forward, shared by the CUDA and emulated-CUDA kernels (csrc/cuda/attention.cu).
// No PyTorch headers: the bindings fill this struct from Python ints.
//
//   o = softmax(q k^T * scale + mask) v        q [B, H, Nq, D], k/v [B, H, Nk, D], o [B, H, Nq, D]
//   lse[b, h, i] = log(sum_j exp(q_i . k_j * scale))   (natural log, fp32, masked keys left out)
//
// Any batch / head / token strides (in elements), so q/k/v may be strided views of one fused qkv
// projection; the head dim is contiguous (stride 1). Masks: causal is top-left aligned (query i
// sees keys 0..i, also when Nq != Nk, as torch's SDPA is_causal); key_padding_mask [B, Nk] uint8
// or bool, nonzero = attend. A query row left with no key gives o = 0 and lse = +inf, so that the
// backward's exp(s - lse) is 0 there (the convention of genfast/ops/attention.py).
#pragma once
#include <cstdint>

#include "flow_step.h"  // genfast::DType

namespace genfast {

struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;           // [B, H, Nq] contiguous fp32; nullptr: not written
  const uint8_t* mask;  // [B, Nk] (bool or uint8); nullptr: no key padding mask
  int64_t q_b, q_h, q_n, k_b, k_h, k_n, v_b, v_h, v_n, o_b, o_h, o_n;  // element strides
  int64_t mask_b, mask_n;
  int64_t B, H, Nq, Nk, D;
  float scale;
  int32_t causal;
  int32_t dtype;  // kFloat16 or kBFloat16 (fp32 is not supported by this kernel)
};

// The backward (FA2): recomputes P = exp(q k^T * scale - lse) tile by tile from the forward's lse.
//   dv = P^T do,  dS = P * (do v^T - delta),  dq = scale dS k,  dk = scale dS^T q
// delta[b, h, i] = sum_d do[b, h, i, d] * o[b, h, i, d] (fp32 [B, H, Nq] contiguous): computed by a
// first kernel into `delta` (caller-provided workspace) when o is given, else read from it.
// Masks and lse as in the forward (lse = +inf rows get zero gradients).
struct AttentionBwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  const float* lse;    // [B, H, Nq] contiguous
  float* delta;        // [B, H, Nq] contiguous
  const void* o;       // the forward's output, for delta; nullptr: delta is given
  int64_t o_b, o_h, o_n;
  void* dq;
  void* dk;
  void* dv;
  const uint8_t* mask;
  int64_t q_b, q_h, q_n, k_b, k_h, k_n, v_b, v_h, v_n, do_b, do_h, do_n;
  int64_t dq_b, dq_h, dq_n, dk_b, dk_h, dk_n, dv_b, dv_h, dv_n;
  int64_t mask_b, mask_n;
  int64_t B, H, Nq, Nk, D;
  float scale;
  int32_t causal;
  int32_t dtype;
};

// csrc/cuda/attention.cu: launches on `stream` and returns the cudaError_t as an int
// (cudaErrorInvalidValue = 1 for a case the kernel does not support: fp32, D > 128).
int attention_fwd_cuda(const AttentionParams& p, void* stream);
// csrc/cuda/attention_bwd.cu: two kernels (dk/dv per key tile, dq per query tile; no atomics).
int attention_bwd_cuda(const AttentionBwdParams& p, void* stream);

}  // namespace genfast
