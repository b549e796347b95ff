// Nearest-codebook lookup and per-code counts on the GPU (math, layout and NaN/tie rules: vq.h).
//
// A SIMT tiled kernel (the tensor-core version is owed; Triton's tl.dot kernel is the preferred
// GPU backend until measured otherwise):
//  - a block of 256 threads owns kRows = 64 rows of z and walks the codebook in tiles of kCodes =
//    64 codes; each D step stages a [kD = 16] slice of both tiles in shared memory (fp32,
//    transposed to [d][row] so a warp reads consecutive words), and every thread accumulates a
//    4 x 4 register tile: rows ty + 16 i, codes tx + 16 j (tx, ty in 0..15);
//  - the codes' squared norms accumulate beside the dot products, so the score needs no
//    precomputed pass; each thread keeps a running (min, argmin) for its 4 rows across tiles
//    (strict <, codes visited in increasing order: the lowest index wins a tie; a NaN score
//    never compares smaller);
//  - at the end the 16 threads sharing a row reduce (min, lowest index) with shuffles; one of
//    them writes the index and, if asked, the chosen code's distance recomputed directly.
// O(n) memory: nothing but the outputs is written.
//
// Checked without a GPU (DESIGN.md §8):
//   nvcc -std=c++17 -arch=sm_90 --resource-usage -Icsrc -c csrc/cuda/vq.cu -o /tmp/vq.o
//   g++ -x c++ -std=c++17 -DGENFAST_EMULATE -fno-strict-aliasing -pthread -Icsrc -c csrc/cuda/vq.cu
#include "cuda/common.cuh"

#include "vq.h"

namespace genfast {
namespace {

constexpr int kRows = 64, kCodes = 64, kD = 16, kThreads = 256;
constexpr int kTile = 4;  // rows and codes per thread

__device__ __forceinline__ int64_t z_row(const VqParams& p, int64_t r) {
  return (r / p.z_inner) * p.z_os + (r % p.z_inner) * p.z_rs;
}

// (v, i) better than (bv, bi): smaller score, or the same score at a lower index.
__device__ __forceinline__ bool better(float v, int64_t i, float bv, int64_t bi) {
  return v < bv || (v == bv && i < bi);
}

__global__ void __launch_bounds__(kThreads) vq_nearest_kernel(const VqParams p) {
  __shared__ float zs[kD][kRows];
  __shared__ float cs[kD][kCodes];
  __shared__ float csq[kCodes];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;

  float best[kTile];
  int64_t best_idx[kTile];
#pragma unroll
  for (int i = 0; i < kTile; ++i) {
    best[i] = __int_as_float(0x7f800000);  // +inf
    best_idx[i] = 0;
  }
  // Each thread stages 4 (row or code, d) pairs of a 64 x 16 tile: element e = tid + 256 s.
  for (int64_t k0 = 0; k0 < p.k; k0 += kCodes) {
    float acc[kTile][kTile] = {};
    for (int64_t d0 = 0; d0 < p.d; d0 += kD) {
      __syncthreads();  // everyone is done with the previous slice (and the previous tile's csq)
#pragma unroll
      for (int s = 0; s < (kRows * kD) / kThreads; ++s) {
        const int e = threadIdx.x + kThreads * s, r = e / kD, j = e % kD;
        const int64_t row = row0 + r, code = k0 + r, col = d0 + j;
        zs[j][r] = (row < p.n && col < p.d) ? dev::load_elem(p.z, z_row(p, row) + col * p.z_cs, p.z_dtype) : 0.0f;
        cs[j][r] = (code < p.k && col < p.d) ? dev::load_elem(p.codebook, code * p.c_rs + col * p.c_cs, p.c_dtype)
                                             : 0.0f;
      }
      __syncthreads();
      if (threadIdx.x < kCodes) {
        float s = d0 == 0 ? 0.0f : csq[threadIdx.x];  // a new tile starts from 0
#pragma unroll
        for (int j = 0; j < kD; ++j) s = fmaf(cs[j][threadIdx.x], cs[j][threadIdx.x], s);
        csq[threadIdx.x] = s;
      }
#pragma unroll
      for (int j = 0; j < kD; ++j) {
        float a[kTile], b[kTile];
#pragma unroll
        for (int t = 0; t < kTile; ++t) {
          a[t] = zs[j][ty + 16 * t];
          b[t] = cs[j][tx + 16 * t];
        }
#pragma unroll
        for (int i = 0; i < kTile; ++i)
#pragma unroll
          for (int c = 0; c < kTile; ++c) acc[i][c] = fmaf(a[i], b[c], acc[i][c]);
      }
    }
    __syncthreads();  // csq complete
#pragma unroll
    for (int c = 0; c < kTile; ++c) {
      const int64_t code = k0 + tx + 16 * c;
      if (code >= p.k) break;
      const float sq = csq[tx + 16 * c];
      const float inv = p.metric == kVqCosine ? -1.0f / fmaxf(sqrtf(sq), kVqNormEps) : 0.0f;
#pragma unroll
      for (int i = 0; i < kTile; ++i) {
        const float s = p.metric == kVqCosine ? acc[i][c] * inv : sq - 2.0f * acc[i][c];
        if (s < best[i]) {  // NaN: false
          best[i] = s;
          best_idx[i] = code;
        }
      }
    }
  }
  // The 16 threads of a row are lanes tx = 0..15 of one half-warp: butterfly within it.
#pragma unroll
  for (int i = 0; i < kTile; ++i) {
    float v = best[i];
    int64_t idx = best_idx[i];
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, o);
      const long long oi = __shfl_xor_sync(0xffffffffu, static_cast<long long>(idx), o);
      if (better(ov, oi, v, idx)) {
        v = ov;
        idx = oi;
      }
    }
    const int64_t row = row0 + ty + 16 * i;
    if (tx == 0 && row < p.n) {
      p.indices[row] = idx;
      if (p.distance) {  // direct: no cancellation (two passes for cosine: norms first)
        const int64_t zo = z_row(p, row), co = idx * p.c_rs;
        float zz = 0.0f, cc = 0.0f, sq = 0.0f;
        for (int64_t j = 0; j < p.d; ++j) {
          const float zv = dev::load_elem(p.z, zo + j * p.z_cs, p.z_dtype);
          const float cv = dev::load_elem(p.codebook, co + j * p.c_cs, p.c_dtype);
          zz = fmaf(zv, zv, zz);
          cc = fmaf(cv, cv, cc);
          sq = fmaf(zv - cv, zv - cv, sq);
        }
        if (p.metric == kVqCosine) {
          const float iz = 1.0f / fmaxf(sqrtf(zz), kVqNormEps), ic = 1.0f / fmaxf(sqrtf(cc), kVqNormEps);
          sq = 0.0f;
          for (int64_t j = 0; j < p.d; ++j) {
            const float diff = dev::load_elem(p.z, zo + j * p.z_cs, p.z_dtype) * iz -
                               dev::load_elem(p.codebook, co + j * p.c_cs, p.c_dtype) * ic;
            sq = fmaf(diff, diff, sq);
          }
        }
        p.distance[row] = sq;
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) vq_zero_kernel(int64_t* counts, int64_t k) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < k;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    counts[i] = 0;
}

// One global atomic per index (codebooks are large, so contention is low); out of range: skipped.
__global__ void __launch_bounds__(kThreads) vq_counts_kernel(const VqCountsParams p) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t v = p.indices[i * p.idx_stride];
    if (v >= 0 && v < p.k) atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + v), 1ull);
  }
}

int grid_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

}  // namespace

int vq_nearest_cuda(const VqParams& p, void* stream) {
  if (p.n < 0 || p.d < 1 || p.k < 1 || p.z_inner < 1) return static_cast<int>(cudaErrorInvalidValue);
  if (p.n == 0) return 0;
  const int64_t blocks = (p.n + kRows - 1) / kRows;
  if (blocks > 2147483647LL) return static_cast<int>(cudaErrorInvalidValue);
  auto kernel = &vq_nearest_kernel;
  GENFAST_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, p);
  return static_cast<int>(cudaGetLastError());
}

int vq_counts_cuda(const VqCountsParams& p, void* stream) {
  if (p.n < 0 || p.k < 1) return static_cast<int>(cudaErrorInvalidValue);
  auto zero = &vq_zero_kernel;
  GENFAST_LAUNCH(zero, dim3(grid_for(p.k)), dim3(kThreads), 0, stream, p.counts, p.k);
  if (const int err = static_cast<int>(cudaGetLastError())) return err;
  if (p.n == 0) return 0;
  auto kernel = &vq_counts_kernel;
  GENFAST_LAUNCH(kernel, dim3(grid_for(p.n)), dim3(kThreads), 0, stream, p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace genfast
