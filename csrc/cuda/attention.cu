// Flash attention forward on tensor cores (mma.sync m16n8k16, sm_80+, also runs on Hopper);
// math, layout and masks: csrc/attention_flash.h.
//
// One CTA of 4 warps per (batch*head, 64-row query tile); each warp owns 16 query rows. The Q
// tile is staged in shared memory once and kept in registers as A fragments; K and V stream in
// 64-key tiles through shared memory. Per K/V tile and warp:
//   S = Q K^T           mma, K rows through ldmatrix (a K row is a column of the B operand)
//   masks               key tail (any Nk), causal, key padding mask -> -inf
//   online softmax      fp32 registers, exp2 with scale * log2(e) folded into one multiply;
//                       row max / sum over the 4 lanes of a quad (they share a row)
//   P -> A fragments    the C fragments of two 8-key n-tiles are one k16 A fragment, repacked
//   O += P V            V through ldmatrix.trans (a V column is a column of the B operand)
// then O / l and the fp32 log-sum-exp for the backward (attention_bwd.cu). A row that sees no
// key (key padding, causal) ends with l = 0: zeros out, lse = +inf.
//
// Head dims: the kernel is a template on the padded head dim DP (a multiple of 16: one mma k
// step) with five instantiations, 32, 64, 80, 96, 128. D = 72 (DiT-XL/2, PixArt) runs DP = 80,
// five k16 steps instead of 128's eight: 80/64 = 1.25x the tensor-core work of D = 64 and
// 80/72 = 1.11x its own useful work, the pad columns being zeros written to shared memory only
// (global loads stop at D). Shared-memory rows are padded by 16 bytes (DP + 8 elements) so the
// eight 16-byte rows an ldmatrix reads fall in different banks.
// K/V loads are cp.async (16-byte chunks of aligned rows), overlapped as FlashAttention-2 does:
// V_j streams in during S = Q K_j^T and the softmax, K_{j+1} during O += P V_j, one buffer each.
// Not here (yet): head dims > 128, fp32 inputs (no fp32 mma: dispatch sends those to Triton / CPU).
//
// Resources (nvcc 13.0 -O3, bf16 and f16 alike within a few registers; 128 threads; no spill, no
// stack frame in any instantiation; smem = (64 + 2 * 64) rows * (DP + 8) * 2 B + 64 B mask):
//   DP            32      64      80      96     128
//   regs sm_80   106     121     128     155     167
//   regs sm_90   103     125     132     156     173
//   smem KiB    15.1    27.1    33.1    39.1    51.1   (> 48 KiB: opted in at launch)
// attention_bwd.cu lists the backward's.
// Checked without a GPU (DESIGN.md §8):
//   nvcc -std=c++17 -O3 -arch=sm_80 --resource-usage -Icsrc -c csrc/cuda/attention.cu -o /tmp/a.o
//   nvcc -std=c++17 -O3 -arch=sm_90 --resource-usage -Icsrc -c csrc/cuda/attention.cu -o /tmp/a.o
//   g++ -x c++ -std=c++17 -DGENFAST_EMULATE -fno-strict-aliasing -pthread -Icsrc -c csrc/cuda/attention.cu
// and run through the emulation by tests/test_attention_cuda_emu.py.
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/attention_tile.cuh"

#include "attention_flash.h"

namespace genfast {
namespace {

constexpr int kBM = 64;  // query rows per CTA (4 warps x 16)
constexpr int kBN = 64;  // keys per K/V tile
constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }
__device__ __forceinline__ float pos_inf() { return __uint_as_float(0x7f800000u); }

// flags: bit 0/1/2: q/k/v rows 16-byte aligned; bit 3: o rows 4-byte aligned.
template <bool BF16, int DP>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const AttentionParams p, int n_qtiles, int flags) {
  constexpr int LD = DP + 8, KSTEPS = DP / 16, NT = kBN / 8, DT = DP / 8;
  GENFAST_DYN_SHARED(uint16_t, sQ);
  uint16_t* sK = sQ + kBM * LD;
  uint16_t* sV = sK + kBN * LD;
  uint8_t* sMask = reinterpret_cast<uint8_t*>(sV + kBN * LD);

  // Longest causal tiles first (the last query tiles see the most keys).
  const int64_t tile = n_qtiles - 1 - static_cast<int64_t>(blockIdx.x) % n_qtiles;
  const int64_t bh = static_cast<int64_t>(blockIdx.x) / n_qtiles;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t q0 = tile * kBM;
  const int D = static_cast<int>(p.D);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;

  const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_b + h * p.q_h + q0 * p.q_n;
  const uint16_t* k = static_cast<const uint16_t*>(p.k) + b * p.k_b + h * p.k_h;
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + b * p.v_b + h * p.v_h;
  const int64_t kv_end = p.causal && q0 + kBM < p.Nk ? q0 + kBM : p.Nk;
  // K/V pipeline (FA2): V_j lands while S = Q K_j^T and the softmax run, K_{j+1} while O += P V_j;
  // one buffer each, the barriers say when a buffer is free.
  auto load_k = [&](int64_t n0) {
    const int nvalid = static_cast<int>(p.Nk - n0 < kBN ? p.Nk - n0 : kBN);
    attn::load_tile<kBN, DP, LD, kThreads, true>(sK, k + n0 * p.k_n, p.k_n, nvalid, D, flags & 2);
    if (p.mask && threadIdx.x < kBN) {
      const int c = static_cast<int>(threadIdx.x);
      sMask[c] = c < nvalid ? p.mask[b * p.mask_b + (n0 + c) * p.mask_n] != 0 : 0;
    }
    dev::cp_async_commit();
  };
  attn::load_tile<kBM, DP, LD, kThreads, true>(sQ, q, p.q_n, static_cast<int>(p.Nq - q0 < kBM ? p.Nq - q0 : kBM), D,
                                               flags & 1);
  dev::cp_async_commit();  // Q's group (wait_group does not wait for uncommitted copies)
  if (kv_end > 0) load_k(0);
  dev::cp_async_wait_all();
  __syncthreads();
  uint32_t qf[KSTEPS][4];  // this warp's 16 rows of Q as A fragments, one per k16 step
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk)
    dev::ldmatrix<4>(qf[kk], sQ + (warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD + kk * 16 + 8 * (lane >> 4));

  float o[DT][4];
#pragma unroll
  for (int j = 0; j < DT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};  // rows g and g + 8 (log2 units)
  const float sl2 = p.scale * kLog2e;
  const int64_t row0 = q0 + warp * 16 + g, row1 = row0 + 8;
  const int64_t warp_last_row = q0 + warp * 16 + 15;

  for (int64_t n0 = 0; n0 < kv_end; n0 += kBN) {
    const int nvalid = static_cast<int>(p.Nk - n0 < kBN ? p.Nk - n0 : kBN);
    attn::load_tile<kBN, DP, LD, kThreads, true>(sV, v + n0 * p.v_n, p.v_n, nvalid, D, flags & 4);
    dev::cp_async_commit();
    // a warp whose rows all precede this tile's keys (causal) only takes part in the barriers
    const bool active = !(p.causal && n0 > warp_last_row);

    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
    if (active) {
#pragma unroll
      for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
        for (int j = 0; j < NT; j += 2) {  // matrices: (keys j*8.., d lo), (d hi), (keys j*8+8.., d lo), (d hi)
          uint32_t kb[4];
          dev::ldmatrix<4>(kb, sK + (j * 8 + (lane & 7) + 8 * (lane >> 4)) * LD + kk * 16 + 8 * ((lane >> 3) & 1));
          const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
          dev::mma_16816<BF16>(s[j], qf[kk], b0);
          dev::mma_16816<BF16>(s[j + 1], qf[kk], b1);
        }
      }

      // scale (log2 units) and masks; element i of n-tile j: row g + 8 (i / 2), key 8 j + 2 t + i % 2
      const bool need_mask = nvalid < kBN || p.mask || (p.causal && n0 + kBN - 1 > q0 + warp * 16);
      float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float x = s[j][i] * sl2;
          if (need_mask) {
            const int c = j * 8 + 2 * t + (i & 1);
            const bool ok = c < nvalid && (!p.mask || sMask[c]) && (!p.causal || n0 + c <= (i < 2 ? row0 : row1));
            x = ok ? x : neg_inf();
          }
          s[j][i] = x;
          mx[i >> 1] = fmaxf(mx[i >> 1], x);
        }
      float base[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        const float m_new = fmaxf(m[r], mx[r]);
        base[r] = m_new == neg_inf() ? 0.0f : m_new;  // no key yet: exp2(-inf - 0) = 0, never NaN
        const float alpha = exp2f(m[r] - base[r]);
        m[r] = m_new;
        l[r] *= alpha;
#pragma unroll
        for (int j = 0; j < DT; ++j) o[j][2 * r] *= alpha, o[j][2 * r + 1] *= alpha;
      }
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          s[j][i] = exp2f(s[j][i] - base[i >> 1]);
          l[i >> 1] += s[j][i];  // a lane's partial row sum; the quad is summed at the end
        }
    }
    dev::cp_async_wait_all();
    __syncthreads();  // V_j has landed; every warp is done with K_j and sMask
    if (n0 + kBN < kv_end) load_k(n0 + kBN);
    if (active) attn::mma_pb<BF16, kBN / 16, DT, LD>(o, s, sV, lane);
    dev::cp_async_wait_all();
    __syncthreads();  // K_{j+1} has landed; every warp is done with V_j
  }

  // epilogue: O / l, lse
  uint16_t* out = static_cast<uint16_t*>(p.o) + b * p.o_b + h * p.o_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int64_t row = r ? row1 : row0;
    if (row >= p.Nq) continue;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;  // no key at all: zeros
    attn::store_row<BF16, DT>(out + row * p.o_n, o, r, inv, D, flags & 8, t);
    if (p.lse && t == 0) p.lse[bh * p.Nq + row] = l[r] > 0.0f ? (m[r] + __log2f(l[r])) * kLn2 : pos_inf();
  }
}

template <bool BF16, int DP>
int launch(const AttentionParams& p, void* stream) {
  constexpr int LD = DP + 8;
  const size_t smem = static_cast<size_t>(kBM + 2 * kBN) * LD * sizeof(uint16_t) + kBN;
  auto kernel = &attention_fwd_kernel<BF16, DP>;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  using attn::rows16;
  const bool o4 = attn::rows4(p.o, p.o_b, p.o_h, p.o_n);
  const int flags = rows16(p.q, p.q_b, p.q_h, p.q_n) | rows16(p.k, p.k_b, p.k_h, p.k_n) << 1 |
                    rows16(p.v, p.v_b, p.v_h, p.v_n) << 2 | int(o4) << 3;
  const int64_t n_qtiles = (p.Nq + kBM - 1) / kBM, blocks = n_qtiles * p.B * p.H;
  if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  GENFAST_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), smem, stream, p,
                 static_cast<int>(n_qtiles), flags);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int attention_fwd_cuda(const AttentionParams& p, void* stream) {
  if (p.B < 0 || p.H < 0 || p.Nq < 0 || p.Nk < 0 || p.D < 1 || p.D > 128) return static_cast<int>(cudaErrorInvalidValue);
  if (p.B == 0 || p.H == 0 || p.Nq == 0) return 0;
  return attn::by_dtype_and_head_dim(p.dtype, p.D, [&](auto bf16, auto dp) {
    return launch<decltype(bf16)::value, decltype(dp)::value>(p, stream);
  });
}

}  // namespace genfast
