// Reparameterized sample + KL on the GPU, forward and backward (math and layout: csrc/kl.h; the
// noise stream: csrc/philox.h, shared with the CPU kernel so both draw the same normals).
//
// Tiling: block b of the grid is tile t of row r (b = r * tiles + t); a tile is kThreads Philox
// groups of 4 consecutive elements, one group a thread, starting where the global element index
// r * cols + c is a multiple of 4 (the row's first tile starts (r * cols) % 4 columns early). So a
// thread makes one Philox call and uses all four words, and eps never touches memory.
// Loads: one 16-byte (fp32) or 8-byte (fp16/bf16) vector per tensor per thread when the column
// strides are 1 and the group's address is aligned, else 4 guarded scalar loads (any strides).
// Per-row KL: each block reduces its tile (dev::block_sum) into partial[r, t], then a second tiny
// kernel (one warp per row, fixed order) sums the tiles: deterministic, no atomics.
// (seed, offset) are read on the device from p.in.seed: CUDA-graph replays see fresh values.
//
// Checked without a GPU (DESIGN.md §8):
//   nvcc -std=c++17 -arch=sm_90 --resource-usage -Icsrc -c csrc/cuda/kl.cu -o /tmp/kl.o
//   g++ -x c++ -std=c++17 -DGENFAST_EMULATE -fno-strict-aliasing -pthread -Icsrc -c csrc/cuda/kl.cu -o /tmp/kl_emu.o
#include "cuda/common.cuh"

#include "kl.h"
#include "philox.h"

namespace genfast {
namespace {

constexpr int kThreads = 256;            // one Philox group (4 elements) a thread
constexpr int64_t kTile = 4 * kThreads;  // elements a block covers in its row

struct Group {
  int64_t c;     // first column of the thread's 4 elements (may be < 0 in a row's first tile)
  bool full;     // all 4 columns inside the row
  uint64_t grp;  // Philox counter
};

__device__ __forceinline__ Group group_of(int64_t r, int64_t t, int64_t cols) {
  const int64_t shift = (r * cols) & 3;
  Group g;
  g.c = t * kTile - shift + 4 * static_cast<int64_t>(threadIdx.x);
  g.full = g.c >= 0 && g.c + 4 <= cols;
  g.grp = static_cast<uint64_t>((r * cols - shift) / 4 + t * kThreads + threadIdx.x);
  return g;
}

// The 4 elements of a group from the row starting at `row` with column stride cs (0 outside).
template <int DT>
__device__ __forceinline__ void load4(const void* row, int64_t cs, const Group& g, int64_t cols, float (&v)[4]) {
  using T = dev::elem_t<DT>;
  const T* p = static_cast<const T*>(row) + g.c * cs;
  if (g.full && cs == 1 && (reinterpret_cast<uintptr_t>(p) & (4 * sizeof(T) - 1)) == 0) {
    if constexpr (DT == kFloat32) {
      const float4 f = *reinterpret_cast<const float4*>(p);
      v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
    } else {
      const uint2 u = *reinterpret_cast<const uint2*>(p);
      T h[4];
      memcpy(h, &u, sizeof u);
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = dev::load_elem<DT>(h, i);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t c = g.c + i;
    v[i] = (c >= 0 && c < cols) ? dev::load_elem<DT>(row, c * cs) : 0.0f;
  }
}

template <int DT>
__device__ __forceinline__ void store4(void* row, int64_t cs, const Group& g, int64_t cols, const float (&v)[4]) {
  using T = dev::elem_t<DT>;
  T* p = static_cast<T*>(row) + g.c * cs;
  if (g.full && cs == 1 && (reinterpret_cast<uintptr_t>(p) & (4 * sizeof(T) - 1)) == 0) {
    if constexpr (DT == kFloat32) {
      *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      T h[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) dev::store_elem<DT>(h, i, v[i]);
      uint2 u;
      memcpy(&u, h, sizeof u);
      *reinterpret_cast<uint2*>(p) = u;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t c = g.c + i;
    if (c >= 0 && c < cols) dev::store_elem<DT>(row, c * cs, v[i]);
  }
}

__device__ __forceinline__ void noise4(const KLCommon& in, const Group& g, float (&eps)[4]) {
  philox::normals4(g.grp, static_cast<uint64_t>(in.seed[0]), static_cast<uint64_t>(in.seed[1]), eps[0], eps[1],
                   eps[2], eps[3]);
}

__device__ __forceinline__ float clamp_lv(float l, const KLCommon& in) {
  return kl_clamp(l, in.clamp, in.clamp_lo, in.clamp_hi);  // csrc/kl.h: NaN stays NaN
}

template <int DT>
__global__ void __launch_bounds__(kThreads) kl_forward_kernel(const KLForwardParams p, int64_t tiles) {
  using T = dev::elem_t<DT>;
  __shared__ float scratch[32];
  const KLCommon& in = p.in;
  const int64_t r = static_cast<int64_t>(blockIdx.x) / tiles, t = static_cast<int64_t>(blockIdx.x) % tiles;
  const Group g = group_of(r, t, in.cols);
  float m[4], l[4], eps[4], z[4], kl[4];
  load4<DT>(static_cast<const T*>(in.mu) + r * in.mu_rs, in.mu_cs, g, in.cols, m);
  load4<DT>(static_cast<const T*>(in.logvar) + r * in.lv_rs, in.lv_cs, g, in.cols, l);
  if (in.noise) load4<DT>(static_cast<const T*>(in.noise) + r * in.n_rs, in.n_cs, g, in.cols, eps);
  else noise4(in, g, eps);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float lv = clamp_lv(l[i], in);
    const float s = philox::exp_any(0.5f * lv);
    z[i] = m[i] + eps[i] * s;
    kl[i] = 0.5f * (m[i] * m[i] + s * s - 1.0f - lv);
    const int64_t c = g.c + i;
    sum += (c >= 0 && c < in.cols) ? kl[i] : 0.0f;
  }
  store4<DT>(static_cast<T*>(p.z) + r * p.z_rs, p.z_cs, g, in.cols, z);
  if (p.kl_per_row) {
    sum = dev::block_sum(sum, scratch);
    if (threadIdx.x == 0) p.partial[r * p.row_blocks + t] = sum;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t c = g.c + i;
      if (c >= 0 && c < in.cols) p.kl[r * p.kl_rs + c * p.kl_cs] = kl[i];
    }
  }
}

// One warp per row: lane j adds tiles j, j + 32, ... in order, then a fixed butterfly.
__global__ void __launch_bounds__(kThreads) kl_row_sum_kernel(const float* partial, int64_t tiles, int64_t rows,
                                                               float* kl, int64_t kl_rs) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  float s = 0.0f;
  if (r < rows)
    for (int64_t j = lane; j < tiles; j += 32) s += partial[r * tiles + j];
  s = dev::warp_sum(s);  // whole warps only: r is uniform across a warp
  if (r < rows && lane == 0) kl[r * kl_rs] = s;
}

template <int DT>
__global__ void __launch_bounds__(kThreads) kl_backward_kernel(const KLBackwardParams p, int64_t tiles) {
  using T = dev::elem_t<DT>;
  const KLCommon& in = p.in;
  const int64_t r = static_cast<int64_t>(blockIdx.x) / tiles, t = static_cast<int64_t>(blockIdx.x) % tiles;
  const Group g = group_of(r, t, in.cols);
  float m[4], l[4], d[4] = {0, 0, 0, 0}, eps[4] = {0, 0, 0, 0}, gk[4] = {0, 0, 0, 0}, dmu[4], dlv[4];
  load4<DT>(static_cast<const T*>(in.mu) + r * in.mu_rs, in.mu_cs, g, in.cols, m);
  load4<DT>(static_cast<const T*>(in.logvar) + r * in.lv_rs, in.lv_cs, g, in.cols, l);
  if (p.dz) {
    load4<DT>(static_cast<const T*>(p.dz) + r * p.dz_rs, p.dz_cs, g, in.cols, d);
    if (in.noise) load4<DT>(static_cast<const T*>(in.noise) + r * in.n_rs, in.n_cs, g, in.cols, eps);
    else noise4(in, g, eps);
  }
  if (p.gkl) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t c = g.c + i;
      gk[i] = (c >= 0 && c < in.cols) ? p.gkl[r * p.gkl_rs + c * p.gkl_cs] : 0.0f;
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float s = philox::exp_any(0.5f * clamp_lv(l[i], in));
    dmu[i] = d[i] + gk[i] * m[i];
    dlv[i] = kl_dlogvar(l[i], in.clamp, in.clamp_lo, in.clamp_hi, s, d[i], eps[i], gk[i], p.dz != nullptr,
                        p.gkl != nullptr);
  }
  store4<DT>(static_cast<T*>(p.dmu) + r * p.dmu_rs, p.dmu_cs, g, in.cols, dmu);
  store4<DT>(static_cast<T*>(p.dlogvar) + r * p.dlv_rs, p.dlv_cs, g, in.cols, dlv);
}

int64_t tiles_of(int64_t cols) { return (cols + 3 + kTile - 1) / kTile; }

template <int DT>
int forward(const KLForwardParams& p, void* stream) {
  const int64_t tiles = tiles_of(p.in.cols);
  auto fk = &kl_forward_kernel<DT>;
  GENFAST_LAUNCH(fk, dim3(static_cast<unsigned>(p.in.rows * tiles)), dim3(kThreads), 0, stream, p, tiles);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !p.kl_per_row) return static_cast<int>(err);
  const int64_t blocks = (p.in.rows + kThreads / 32 - 1) / (kThreads / 32);
  auto sk = &kl_row_sum_kernel;
  GENFAST_LAUNCH(sk, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, p.partial, tiles, p.in.rows,
                 p.kl, p.kl_rs);
  return static_cast<int>(cudaGetLastError());
}

template <int DT>
int backward(const KLBackwardParams& p, void* stream) {
  const int64_t tiles = tiles_of(p.in.cols);
  auto bk = &kl_backward_kernel<DT>;
  GENFAST_LAUNCH(bk, dim3(static_cast<unsigned>(p.in.rows * tiles)), dim3(kThreads), 0, stream, p, tiles);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int64_t kl_cuda_row_blocks(int64_t cols) { return tiles_of(cols); }

int kl_forward_cuda(const KLForwardParams& p, void* stream) {
  if (p.in.rows < 0 || p.in.cols < 0 || (p.kl_per_row && p.row_blocks < tiles_of(p.in.cols)))
    return static_cast<int>(cudaErrorInvalidValue);
  if (p.in.rows == 0 || p.in.cols == 0) return 0;  // the ops layer zero-fills the KL
  if (p.in.rows * tiles_of(p.in.cols) > 0x7FFFFFFFLL) return static_cast<int>(cudaErrorInvalidValue);
  switch (p.in.dtype) {
    case kFloat32: return forward<kFloat32>(p, stream);
    case kFloat16: return forward<kFloat16>(p, stream);
    case kBFloat16: return forward<kBFloat16>(p, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

int kl_backward_cuda(const KLBackwardParams& p, void* stream) {
  if (p.in.rows < 0 || p.in.cols < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (p.in.rows == 0 || p.in.cols == 0) return 0;
  if (p.in.rows * tiles_of(p.in.cols) > 0x7FFFFFFFLL) return static_cast<int>(cudaErrorInvalidValue);
  switch (p.in.dtype) {
    case kFloat32: return backward<kFloat32>(p, stream);
    case kFloat16: return backward<kFloat16>(p, stream);
    case kBFloat16: return backward<kBFloat16>(p, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace genfast
