// Flash attention backward on tensor cores (FA2 split, no atomics); math: csrc/attention_flash.h.
//
// Two kernels, 4 warps each, every warp owning 16 rows of the tile it accumulates:
//   dk/dv: one CTA per (batch*head, 64-key tile); K and V stay in shared memory while query
//          tiles stream (64 queries for DP <= 64, 32 above: fewer live fragments, no spills).
//          Per warp: S^T = K Q^T, P^T = exp2(S^T scale log2e - lse log2e) (masked), dV += P^T dO,
//          dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
//   dq:    one CTA per (batch*head, 64-query tile); Q and dO stay, K/V tiles stream.
//          S = Q K^T, P, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
// The products are attn::mma_abt (A B^T, both operands through ldmatrix) and attn::mma_pb (a
// C-fragment operand times a tile through ldmatrix.trans). P and dS are rounded to the input dtype
// before their products, as FlashAttention does. Causal: the dk/dv kernel starts at the first
// query tile that can see its keys, the dq kernel stops at the last key tile its rows can see,
// and warps skip tiles that are entirely in their past / future. delta = rowsum(dO * O) comes from
// a first small kernel (one warp per row) when the caller passes o.
// Resources (nvcc 13.0 -O3, bf16; __launch_bounds__(128, 1): without the min-blocks hint ptxas
// capped some instantiations at 128-168 registers and spilled 8-20 bytes; with it, none spills):
//   DP               32      64      80      96     128
//   dk/dv regs 80/90 162/166 200/211 180/188 202/216 232/240   smem KiB 20.6 / 36.6 / 33.3 / 39.3 / 51.3
//   dq    regs 80/90 162/177 204/198 212/206 220/213 236/231   smem KiB 20.1 / 36.1 / 44.1 / 52.1 / 68.1
//   delta: 29-32 registers. (dk/dv query tile: 64 rows for DP <= 64, 32 above.)
// Checked as attention.cu is (nvcc --resource-usage for sm_80/sm_90, the emulated build, and
// tests/test_attention_cuda_emu.py against float64 gradients).
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/attention_tile.cuh"

#include "attention_flash.h"

namespace genfast {
namespace {

constexpr int kTile = 64;  // keys per dk/dv CTA, queries per dq CTA, keys per dq K/V tile
constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float pos_inf() { return __uint_as_float(0x7f800000u); }

// flags: bit 0..3: q, k, v, dout rows 16-byte aligned; bit 4..6: dq, dk, dv rows 4-byte aligned.
template <int DP> struct QueryTile { static constexpr int value = DP <= 64 ? 64 : 32; };

template <bool BF16, int DP>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_dkdv_kernel(const AttentionBwdParams p, int n_ktiles, int flags) {
  constexpr int LD = DP + 8, KSTEPS = DP / 16, DT = DP / 8, BQ = QueryTile<DP>::value, NT = BQ / 8;
  GENFAST_DYN_SHARED(uint16_t, sK);
  uint16_t* sV = sK + kTile * LD;
  uint16_t* sQ = sV + kTile * LD;
  uint16_t* sdO = sQ + BQ * LD;
  float* sLse = reinterpret_cast<float*>(sdO + BQ * LD);  // log2 units
  float* sDelta = sLse + BQ;
  uint8_t* sKeyOk = reinterpret_cast<uint8_t*>(sDelta + BQ);  // key exists and is not padding

  const int64_t tile = static_cast<int64_t>(blockIdx.x) % n_ktiles, bh = static_cast<int64_t>(blockIdx.x) / n_ktiles;
  const int64_t b = bh / p.H, h = bh % p.H, n0 = tile * kTile;
  const int D = static_cast<int>(p.D), nk_valid = static_cast<int>(p.Nk - n0 < kTile ? p.Nk - n0 : kTile);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_b + h * p.q_h;
  const uint16_t* dout = static_cast<const uint16_t*>(p.dout) + b * p.do_b + h * p.do_h;
  attn::load_tile<kTile, DP, LD, kThreads>(sK, static_cast<const uint16_t*>(p.k) + b * p.k_b + h * p.k_h + n0 * p.k_n,
                                           p.k_n, nk_valid, D, flags & 2);
  attn::load_tile<kTile, DP, LD, kThreads>(sV, static_cast<const uint16_t*>(p.v) + b * p.v_b + h * p.v_h + n0 * p.v_n,
                                           p.v_n, nk_valid, D, flags & 4);
  if (threadIdx.x < kTile) {
    const int c = static_cast<int>(threadIdx.x);
    sKeyOk[c] = c < nk_valid && (!p.mask || p.mask[b * p.mask_b + (n0 + c) * p.mask_n] != 0);
  }

  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int j = 0; j < DT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) dk[j][i] = dv[j][i] = 0.0f;
  const float sl2 = p.scale * kLog2e;
  const int kw = warp * 16;  // this warp's first key in the tile
  for (int64_t m0 = p.causal ? n0 / BQ * BQ : 0; m0 < p.Nq; m0 += BQ) {
    const int nq_valid = static_cast<int>(p.Nq - m0 < BQ ? p.Nq - m0 : BQ);
    __syncthreads();  // the previous query tile is consumed (and, the first time, sKeyOk is written)
    attn::load_tile<BQ, DP, LD, kThreads>(sQ, q + m0 * p.q_n, p.q_n, nq_valid, D, flags & 1);
    attn::load_tile<BQ, DP, LD, kThreads>(sdO, dout + m0 * p.do_n, p.do_n, nq_valid, D, flags & 8);
    if (threadIdx.x < BQ) {
      const int i = static_cast<int>(threadIdx.x);  // rows past Nq: lse +inf -> P = 0
      sLse[i] = i < nq_valid ? p.lse[bh * p.Nq + m0 + i] * kLog2e : pos_inf();
      sDelta[i] = i < nq_valid ? p.delta[bh * p.Nq + m0 + i] : 0.0f;
    }
    __syncthreads();
    if (p.causal && n0 + kw > m0 + BQ - 1) continue;  // every query of the tile precedes this warp's keys

    float st[NT][4];  // S^T: rows = this warp's 16 keys, columns = the tile's queries
#pragma unroll
    for (int j = 0; j < NT; ++j) st[j][0] = st[j][1] = st[j][2] = st[j][3] = 0.0f;
    attn::mma_abt<BF16, KSTEPS, NT, LD>(st, sK + kw * LD, sQ, lane);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int kl = kw + g + 8 * (i >> 1), qc = j * 8 + 2 * t + (i & 1);
        const bool ok = sKeyOk[kl] && (!p.causal || n0 + kl <= m0 + qc);
        st[j][i] = ok ? exp2f(st[j][i] * sl2 - sLse[qc]) : 0.0f;
      }
    attn::mma_pb<BF16, BQ / 16, DT, LD>(dv, st, sdO, lane);
    float dpt[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) dpt[j][0] = dpt[j][1] = dpt[j][2] = dpt[j][3] = 0.0f;
    attn::mma_abt<BF16, KSTEPS, NT, LD>(dpt, sV + kw * LD, sdO, lane);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) dpt[j][i] = st[j][i] * (dpt[j][i] - sDelta[j * 8 + 2 * t + (i & 1)]);
    attn::mma_pb<BF16, BQ / 16, DT, LD>(dk, dpt, sQ, lane);
  }

  uint16_t* dkp = static_cast<uint16_t*>(p.dk) + b * p.dk_b + h * p.dk_h;
  uint16_t* dvp = static_cast<uint16_t*>(p.dv) + b * p.dv_b + h * p.dv_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t key = n0 + kw + g + 8 * r;
    if (key >= p.Nk) continue;
    attn::store_row<BF16, DT>(dkp + key * p.dk_n, dk, r, p.scale, D, flags & 32, t);
    attn::store_row<BF16, DT>(dvp + key * p.dv_n, dv, r, 1.0f, D, flags & 64, t);
  }
}

template <bool BF16, int DP>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_dq_kernel(const AttentionBwdParams p, int n_qtiles, int flags) {
  constexpr int LD = DP + 8, KSTEPS = DP / 16, DT = DP / 8, NT = kTile / 8;
  GENFAST_DYN_SHARED(uint16_t, sQ);
  uint16_t* sdO = sQ + kTile * LD;
  uint16_t* sK = sdO + kTile * LD;
  uint16_t* sV = sK + kTile * LD;
  uint8_t* sKeyOk = reinterpret_cast<uint8_t*>(sV + kTile * LD);

  const int64_t tile = n_qtiles - 1 - static_cast<int64_t>(blockIdx.x) % n_qtiles;  // longest causal rows first
  const int64_t bh = static_cast<int64_t>(blockIdx.x) / n_qtiles, b = bh / p.H, h = bh % p.H, q0 = tile * kTile;
  const int D = static_cast<int>(p.D), nq_valid = static_cast<int>(p.Nq - q0 < kTile ? p.Nq - q0 : kTile);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  attn::load_tile<kTile, DP, LD, kThreads>(sQ, static_cast<const uint16_t*>(p.q) + b * p.q_b + h * p.q_h + q0 * p.q_n,
                                           p.q_n, nq_valid, D, flags & 1);
  attn::load_tile<kTile, DP, LD, kThreads>(
      sdO, static_cast<const uint16_t*>(p.dout) + b * p.do_b + h * p.do_h + q0 * p.do_n, p.do_n, nq_valid, D, flags & 8);
  const uint16_t* k = static_cast<const uint16_t*>(p.k) + b * p.k_b + h * p.k_h;
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + b * p.v_b + h * p.v_h;

  const int64_t row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lse2[r] = row[r] < p.Nq ? p.lse[bh * p.Nq + row[r]] * kLog2e : pos_inf();
    delta[r] = row[r] < p.Nq ? p.delta[bh * p.Nq + row[r]] : 0.0f;
  }
  float dq[DT][4];
#pragma unroll
  for (int j = 0; j < DT; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.0f;
  const float sl2 = p.scale * kLog2e;
  const int64_t warp_last_row = q0 + warp * 16 + 15;
  const int64_t kv_end = p.causal && q0 + kTile < p.Nk ? q0 + kTile : p.Nk;
  for (int64_t n0 = 0; n0 < kv_end; n0 += kTile) {
    const int nk_valid = static_cast<int>(p.Nk - n0 < kTile ? p.Nk - n0 : kTile);
    __syncthreads();
    attn::load_tile<kTile, DP, LD, kThreads>(sK, k + n0 * p.k_n, p.k_n, nk_valid, D, flags & 2);
    attn::load_tile<kTile, DP, LD, kThreads>(sV, v + n0 * p.v_n, p.v_n, nk_valid, D, flags & 4);
    if (threadIdx.x < kTile) {
      const int c = static_cast<int>(threadIdx.x);
      sKeyOk[c] = c < nk_valid && (!p.mask || p.mask[b * p.mask_b + (n0 + c) * p.mask_n] != 0);
    }
    __syncthreads();
    if (p.causal && n0 > warp_last_row) continue;

    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[j][i] = dp[j][i] = 0.0f;
    attn::mma_abt<BF16, KSTEPS, NT, LD>(s, sQ + warp * 16 * LD, sK, lane);
    attn::mma_abt<BF16, KSTEPS, NT, LD>(dp, sdO + warp * 16 * LD, sV, lane);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = j * 8 + 2 * t + (i & 1), r = i >> 1;
        const bool ok = sKeyOk[c] && (!p.causal || n0 + c <= row[r]);
        const float pij = ok ? exp2f(s[j][i] * sl2 - lse2[r]) : 0.0f;
        s[j][i] = pij * (dp[j][i] - delta[r]);  // dS
      }
    attn::mma_pb<BF16, kTile / 16, DT, LD>(dq, s, sK, lane);
  }
  uint16_t* dqp = static_cast<uint16_t*>(p.dq) + b * p.dq_b + h * p.dq_h;
#pragma unroll
  for (int r = 0; r < 2; ++r)
    if (row[r] < p.Nq) attn::store_row<BF16, DT>(dqp + row[r] * p.dq_n, dq, r, p.scale, D, flags & 16, t);
}

// delta[row] = sum_d dout[row, d] * o[row, d] in fp32, one warp per (b, h, i) row.
template <bool BF16>
__global__ void __launch_bounds__(kThreads) attention_bwd_delta_kernel(const AttentionBwdParams p) {
  const int64_t rows = p.B * p.H * p.Nq;
  const int lane = threadIdx.x % 32;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32; r < rows;
       r += static_cast<int64_t>(gridDim.x) * (kThreads / 32)) {
    const int64_t i = r % p.Nq, bh = r / p.Nq, b = bh / p.H, h = bh % p.H;
    const uint16_t* dor = static_cast<const uint16_t*>(p.dout) + b * p.do_b + h * p.do_h + i * p.do_n;
    const uint16_t* orow = static_cast<const uint16_t*>(p.o) + b * p.o_b + h * p.o_h + i * p.o_n;
    float acc = 0.0f;
    for (int64_t c = lane; c < p.D; c += 32)
      acc += dev::unpack_half<BF16>(dor[c], false) * dev::unpack_half<BF16>(orow[c], false);
    acc = dev::warp_sum(acc);
    if (lane == 0) p.delta[r] = acc;
  }
}

template <class Kernel>
int launch_one(Kernel kernel, int64_t tiles, int64_t bh, size_t smem, const AttentionBwdParams& p, int flags,
               void* stream) {
  if (tiles * bh == 0) return 0;
  if (tiles * bh > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  GENFAST_LAUNCH(kernel, dim3(static_cast<unsigned>(tiles * bh)), dim3(kThreads), smem, stream, p,
                 static_cast<int>(tiles), flags);
  return static_cast<int>(cudaGetLastError());
}

template <bool BF16, int DP>
int launch(const AttentionBwdParams& p, void* stream) {
  using attn::rows16;
  using attn::rows4;
  constexpr int LD = DP + 8, BQ = QueryTile<DP>::value;
  const int flags = rows16(p.q, p.q_b, p.q_h, p.q_n) | rows16(p.k, p.k_b, p.k_h, p.k_n) << 1 |
                    rows16(p.v, p.v_b, p.v_h, p.v_n) << 2 | rows16(p.dout, p.do_b, p.do_h, p.do_n) << 3 |
                    rows4(p.dq, p.dq_b, p.dq_h, p.dq_n) << 4 | rows4(p.dk, p.dk_b, p.dk_h, p.dk_n) << 5 |
                    rows4(p.dv, p.dv_b, p.dv_h, p.dv_n) << 6;
  const int64_t bh = p.B * p.H;
  if (p.o && bh * p.Nq > 0) {
    const int64_t blocks = (bh * p.Nq + kThreads / 32 - 1) / (kThreads / 32);
    auto delta = &attention_bwd_delta_kernel<BF16>;
    GENFAST_LAUNCH(delta, dim3(static_cast<unsigned>(blocks < 65536 * 8 ? blocks : 65536 * 8)), dim3(kThreads), 0,
                   stream, p);
    const int err = static_cast<int>(cudaGetLastError());
    if (err) return err;
  }
  const size_t smem_kv = static_cast<size_t>(2 * kTile + 2 * BQ) * LD * 2 + 2 * BQ * sizeof(float) + kTile;
  auto dkdv = &attention_bwd_dkdv_kernel<BF16, DP>;
  int err = launch_one(dkdv, (p.Nk + kTile - 1) / kTile, bh, smem_kv, p, flags, stream);
  if (err) return err;
  const size_t smem_q = static_cast<size_t>(4 * kTile) * LD * 2 + kTile;
  auto dqk = &attention_bwd_dq_kernel<BF16, DP>;
  return launch_one(dqk, (p.Nq + kTile - 1) / kTile, bh, smem_q, p, flags, stream);
}

}  // namespace

int attention_bwd_cuda(const AttentionBwdParams& p, void* stream) {
  if (p.B < 0 || p.H < 0 || p.Nq < 0 || p.Nk < 0 || p.D < 1 || p.D > 128) return static_cast<int>(cudaErrorInvalidValue);
  return attn::by_dtype_and_head_dim(p.dtype, p.D, [&](auto bf16, auto dp) {
    return launch<decltype(bf16)::value, decltype(dp)::value>(p, stream);
  });
}

}  // namespace genfast
