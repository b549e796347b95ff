// Tile helpers shared by the flash-attention kernels (attention.cu, attention_bwd.cu): staging a
// [rows, D] slice of a strided [N, D] matrix in shared memory, and the two warp-level products the
// kernels are made of, on mma.sync m16n8k16 (layouts: cuda/mma.cuh). Include after cuda/mma.cuh.
// Shared-memory tiles are row-major 16-bit [rows][LD], LD = DP + 8: the 16-byte pad puts the eight
// rows an ldmatrix reads in different banks.
#pragma once

#include <stdint.h>

#include <type_traits>

namespace genfast {
namespace attn {

// ROWS x DP tile of a matrix with row stride `rs` elements (head dim contiguous) into `dst`;
// rows >= nrows and columns >= D are zeros (pad rows are multiplied by P = 0, and 0 * NaN is not
// 0). VEC: every row start is 16-byte aligned (one 16-byte load per 8 elements). ASYNC: those
// 16-byte loads go through cp.async (the other chunks are stored at once).
template <int ROWS, int DP, int LD, int NTHREADS, bool ASYNC = false>
__device__ __forceinline__ void load_tile(uint16_t* dst, const uint16_t* src, int64_t rs, int nrows, int D, bool vec) {
  constexpr int kChunks = DP / 8;
  for (int c = threadIdx.x; c < ROWS * kChunks; c += NTHREADS) {
    const int row = c / kChunks, col = (c % kChunks) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (row < nrows) {
      const uint16_t* s = src + row * rs + col;
      if (vec && col + 8 <= D) {
        if (ASYNC) {  // lands by the caller's cp_async_wait_all + __syncthreads
          dev::cp_async16(dst + row * LD + col, s);
          continue;
        }
        val = *reinterpret_cast<const uint4*>(s);
      } else {
        uint16_t e[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) e[i] = col + i < D ? s[i] : uint16_t(0);
        val = make_uint4(e[0] | (uint32_t(e[1]) << 16), e[2] | (uint32_t(e[3]) << 16), e[4] | (uint32_t(e[5]) << 16),
                         e[6] | (uint32_t(e[7]) << 16));
      }
    }
    *reinterpret_cast<uint4*>(dst + row * LD + col) = val;
  }
}

// acc (16 x 8NT, C fragments) += A B^T over K = 16 KSTEPS, where A is 16 rows of a tile at `a`
// and B is 8NT rows of a tile at `b`, both [row][k] in shared memory (S = Q K^T, dP = dO V^T).
template <bool BF16, int KSTEPS, int NT, int LD>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const uint16_t* a, const uint16_t* b, int lane) {
  static_assert(NT % 2 == 0, "n-tiles go in pairs (one ldmatrix.x4)");
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    uint32_t af[4];  // matrices (rows 0-7, k lo), (rows 8-15, k lo), (rows 0-7, k hi), (rows 8-15, k hi)
    dev::ldmatrix<4>(af, a + ((lane & 7) + 8 * ((lane >> 3) & 1)) * LD + kk * 16 + 8 * (lane >> 4));
#pragma unroll
    for (int j = 0; j < NT; j += 2) {  // matrices (n 8j.., k lo), (k hi), (n 8j+8.., k lo), (k hi)
      uint32_t bf[4];
      dev::ldmatrix<4>(bf, b + (j * 8 + (lane & 7) + 8 * (lane >> 4)) * LD + kk * 16 + 8 * ((lane >> 3) & 1));
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      dev::mma_16816<BF16>(acc[j], af, b0);
      dev::mma_16816<BF16>(acc[j + 1], af, b1);
    }
  }
}

// acc (16 x 8DT, C fragments) += P B, where P (16 x 16KT) is held as C fragments p[2KT][4] (fp32,
// rounded to 16 bits here) and B is a [16KT][DP] tile at `b` in shared memory, read through
// ldmatrix.trans (O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K).
template <bool BF16, int KT, int DT, int LD>
__device__ __forceinline__ void mma_pb(float (&acc)[DT][4], const float (&p)[2 * KT][4], const uint16_t* b, int lane) {
  static_assert(DT % 2 == 0, "d-tiles go in pairs (one ldmatrix.x4)");
#pragma unroll
  for (int kt = 0; kt < KT; ++kt) {
    // the C fragments of n-tiles 2kt and 2kt+1 are the A fragment of k step kt
    const uint32_t pa[4] = {dev::pack2<BF16>(p[2 * kt][0], p[2 * kt][1]), dev::pack2<BF16>(p[2 * kt][2], p[2 * kt][3]),
                            dev::pack2<BF16>(p[2 * kt + 1][0], p[2 * kt + 1][1]),
                            dev::pack2<BF16>(p[2 * kt + 1][2], p[2 * kt + 1][3])};
#pragma unroll
    for (int dn = 0; dn < DT; dn += 2) {  // matrices (k lo, d dn), (k hi, d dn), (k lo, dn+1), (k hi, dn+1)
      uint32_t bf[4];
      dev::ldmatrix<4, true>(bf, b + (kt * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD + (dn + (lane >> 4)) * 8);
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      dev::mma_16816<BF16>(acc[dn], pa, b0);
      dev::mma_16816<BF16>(acc[dn + 1], pa, b1);
    }
  }
}

// Row r (0: g, 1: g + 8) of C fragments acc (16 x 8DT) times `mul`, to the 16-bit row `dst`
// (columns >= D dropped). AL4: dst is 4-byte aligned (one 32-bit store per element pair).
template <bool BF16, int DT>
__device__ __forceinline__ void store_row(uint16_t* dst, const float (&acc)[DT][4], int r, float mul, int D, bool al4,
                                          int t) {
#pragma unroll
  for (int j = 0; j < DT; ++j) {
    const int c = j * 8 + 2 * t;
    const uint32_t w = dev::pack2<BF16>(acc[j][2 * r] * mul, acc[j][2 * r + 1] * mul);
    if (al4 && c + 1 < D) {
      *reinterpret_cast<uint32_t*>(dst + c) = w;
    } else {
      if (c < D) dst[c] = static_cast<uint16_t>(w & 0xffffu);
      if (c + 1 < D) dst[c + 1] = static_cast<uint16_t>(w >> 16);
    }
  }
}

// Rows of 16-bit elements start 16-byte aligned for every (b, h, n).
__host__ __device__ __forceinline__ bool rows4(const void* base, int64_t sb, int64_t sh, int64_t sn) {
  return (reinterpret_cast<uintptr_t>(base) & 3u) == 0 && sb % 2 == 0 && sh % 2 == 0 && sn % 2 == 0;
}
__host__ __device__ __forceinline__ bool rows16(const void* base, int64_t sb, int64_t sh, int64_t sn) {
  return (reinterpret_cast<uintptr_t>(base) & 15u) == 0 && sb % 8 == 0 && sh % 8 == 0 && sn % 8 == 0;
}

// Calls launch(std::integral_constant<bool, BF16>, std::integral_constant<int, DP>) for the
// dtype and the padded head dim DP (32, 64, 80, 96, 128) that serve head dim D: the forward and
// the backward instantiate the same set. Unsupported dtypes: cudaErrorInvalidValue.
template <typename Launch>
int by_dtype_and_head_dim(int32_t dtype, int64_t D, Launch&& launch) {
  auto dims = [&](auto bf16) {
    if (D <= 32) return launch(bf16, std::integral_constant<int, 32>{});
    if (D <= 64) return launch(bf16, std::integral_constant<int, 64>{});
    if (D <= 80) return launch(bf16, std::integral_constant<int, 80>{});
    if (D <= 96) return launch(bf16, std::integral_constant<int, 96>{});
    return launch(bf16, std::integral_constant<int, 128>{});
  };
  if (dtype == kBFloat16) return dims(std::true_type{});
  if (dtype == kFloat16) return dims(std::false_type{});
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace attn
}  // namespace genfast
