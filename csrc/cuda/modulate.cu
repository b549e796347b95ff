// adaLN modulate and gated residual on the GPU, forward and fused backward (math and layout:
// csrc/modulate.h).
//
//  - modulate forward and backward, C <= 2048 (forward) / 1536 (backward): one warp per row, the
//    row in registers, statistics by warp shuffles, 16-byte loads/stores where C and the
//    pointers allow (csrc/cuda/modulate_warp.cuh, which also describes the per-sample sums).
//  - wider rows: one block (128 threads) per row, block reductions, x re-read from L1/L2 in each
//    pass; per sample, one block per (row chunk, sample) that walks its rows and accumulates in
//    its own fp32 partial row in global memory (only this block touches it).
//  - per-sample gradients: partial rows [B, nchunks, 2, C], then a second kernel adds the chunks
//    in order. Fixed chunking, no atomics: the same bits on every run.
//  - gated residual forward: 16-byte packs, kGatedUnroll a thread per step, where C and the
//    pointers allow (vec_ok); else a grid-stride element kernel. Its backward (a column, or a
//    16-byte pack of columns, a thread, walking a row chunk) sums g * y per (row chunk, sample,
//    column) the same deterministic way as modulate; both paths give the same bits.
//
// Checked without a GPU (DESIGN.md §8):
//   nvcc -std=c++17 -arch=sm_80|sm_90 --resource-usage -Icsrc -c csrc/cuda/modulate.cu -o /tmp/m.o
//     (nvcc 13.0, both archs: no spills, no stack frame. Warp forward 40-128 registers (C = 1152
//     bf16: 68-71), per-token warp backward 63-138, per-sample chunk backward 96-249 (the
//     16-byte 40/48-item instances ~220-249: loads and shared accumulators of a whole row in
//     flight; 4 warps a block, so 2 blocks per SM), the block kernels and the rest 26-56. IEEE
//     divides and 1/sqrtf are subroutine calls that spilled on sm_80, hence __frcp_rn /
//     __fsqrt_rn and multiplies by 1/C.)
//     Gated residual, 16-byte paths: forward 74-80 registers (32-bit indices; 84-88 with 64-bit),
//     3 blocks of 256 a SM; backward 80-96 (64-thread blocks); element kernels 28-40.
//   g++ -x c++ -std=c++17 -DGENFAST_EMULATE -fno-strict-aliasing -pthread -Icsrc -c csrc/cuda/modulate.cu
#include "cuda/common.cuh"

#include <atomic>
#include <cstdlib>
#include <initializer_list>

#include "modulate.h"

namespace genfast {
namespace {

constexpr int kThreads = 128;  // wide rows: one block of 4 warps per row
constexpr int kColBlock = 128;  // columns per block in the column-sum kernels

template <int DT>
using E = dev::elem_t<DT>;

// -------------------------------------------------------------------------------------- forward
// Rows wider than the warp kernels hold (C > 2048): one block per row, x re-read (from L1/L2) in
// each of the three passes.
template <int DT>
__global__ void __launch_bounds__(kThreads) modulate_fwd_wide_kernel(const ModulateParams p) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const int64_t b = r / p.N, n = r % p.N;
  const int tid = threadIdx.x;
  const int64_t C = p.C;
  const E<DT>* x = static_cast<const E<DT>*>(p.x) + b * p.x_sb + n * p.x_sn;
  const E<DT>* scale = static_cast<const E<DT>*>(p.scale) + b * p.scale_sb + n * p.scale_sn;
  const E<DT>* shift = p.shift ? static_cast<const E<DT>*>(p.shift) + b * p.shift_sb + n * p.shift_sn : nullptr;
  E<DT>* out = static_cast<E<DT>*>(p.out) + b * p.out_sb + n * p.out_sn;
  float s = 0.f;
  for (int64_t c = tid; c < C; c += kThreads) s += dev::load_elem<DT>(x, c);
  const float inv_c = __frcp_rn(static_cast<float>(C));  // multiply, not divide: no div subroutine
  const float mean = p.rms ? 0.f : dev::block_sum(s, scratch) * inv_c;
  float q = 0.f;  // mean((x - mean)^2), never E[x^2] - mean^2
  for (int64_t c = tid; c < C; c += kThreads) {
    const float d = dev::load_elem<DT>(x, c) - mean;
    q += d * d;
  }
  // Correctly rounded sqrt and reciprocal as inline instructions (the IEEE 1/sqrtf path is a
  // subroutine call that cost a stack frame and a spill on sm_80); same values as the C++ kernel.
  const float rstd = __frcp_rn(__fsqrt_rn(dev::block_sum(q, scratch) * inv_c + p.eps));
  for (int64_t c = tid; c < C; c += kThreads) {
    const float o = (dev::load_elem<DT>(x, c) - mean) * rstd * (1.f + dev::load_elem<DT>(scale, c));
    dev::store_elem<DT>(out, c, shift ? o + dev::load_elem<DT>(shift, c) : o);
  }
  if (tid == 0) {
    p.mean[r] = mean;
    p.rstd[r] = rstd;
  }
}

// ------------------------------------------------------------------------------------- backward
// Rows wider than the warp kernels hold (C > 1536): x, g and scale are re-read (from L1/L2) in a
// second pass, and per-sample sums go straight to this block's own partial row (part_scale /
// part_shift, zeroed by the caller; no other block touches it, so no atomics).
template <int DT>
__device__ void modulate_bwd_row_wide(const ModulateBwdParams& p, int64_t b, int64_t n, float* scratch,
                                      float* part_scale, float* part_shift) {
  const int64_t C = p.C, r = b * p.N + n;
  const E<DT>* g = static_cast<const E<DT>*>(p.grad) + b * p.g_sb + n * p.g_sn;
  const E<DT>* x = static_cast<const E<DT>*>(p.x) + b * p.x_sb + n * p.x_sn;
  const E<DT>* scale = static_cast<const E<DT>*>(p.scale) + b * p.scale_sb + n * p.scale_sn;
  const float mean = p.mean[r], rstd = p.rstd[r];
  float a = 0.f, bs = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const float gv = dev::load_elem<DT>(g, c), xh = (dev::load_elem<DT>(x, c) - mean) * rstd;
    const float dxh = gv * (1.f + dev::load_elem<DT>(scale, c));
    a += dxh;
    bs += dxh * xh;
    if (part_scale) part_scale[c] += gv * xh;
    if (part_shift) part_shift[c] += gv;
    if (!p.per_sample && p.dscale) dev::store_elem<DT>(p.dscale, r * C + c, gv * xh);
    if (!p.per_sample && p.dshift) dev::store_elem<DT>(p.dshift, r * C + c, gv);
  }
  if (!p.dx) return;
  const float inv_c = __frcp_rn(static_cast<float>(C));
  const float ma = p.rms ? 0.f : dev::block_sum(a, scratch) * inv_c;
  const float mb = dev::block_sum(bs, scratch) * inv_c;
  E<DT>* dx = static_cast<E<DT>*>(p.dx) + b * p.dx_sb + n * p.dx_sn;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const float xh = (dev::load_elem<DT>(x, c) - mean) * rstd;
    const float dxh = dev::load_elem<DT>(g, c) * (1.f + dev::load_elem<DT>(scale, c));
    dev::store_elem<DT>(dx, c, rstd * (dxh - ma - xh * mb));
  }
}

template <int DT>
__global__ void __launch_bounds__(kThreads) modulate_bwd_wide_kernel(const ModulateBwdParams p) {
  __shared__ float scratch[32];
  if (!p.per_sample) {
    const int64_t r = blockIdx.x;
    modulate_bwd_row_wide<DT>(p, r / p.N, r % p.N, scratch, nullptr, nullptr);
    return;
  }
  const int64_t k = blockIdx.x, b = blockIdx.y, nchunks = gridDim.x;
  const int64_t n0 = k * p.chunk_rows, n1 = n0 + p.chunk_rows < p.N ? n0 + p.chunk_rows : p.N;
  float* part = p.partial ? p.partial + (b * nchunks + k) * 2 * p.C : nullptr;
  if (part) {
    for (int64_t c = threadIdx.x; c < p.C; c += kThreads) part[c] = part[p.C + c] = 0.f;  // the columns it owns
  }
  // Each thread reads back only the partial columns it wrote itself: no barrier needed.
  for (int64_t n = n0; n < n1; ++n)
    modulate_bwd_row_wide<DT>(p, b, n, scratch, part && p.dscale ? part : nullptr, part && p.dshift ? part + p.C : nullptr);
}

// ------------------------------------------------------------------------------ gated residual
// Element path (any C, any alignment): a grid-stride loop over elements.
template <int DT>
__global__ void __launch_bounds__(256) gated_fwd_kernel(const GatedResidualParams p) {
  const int64_t total = p.B * p.N * p.C;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % p.C, r = i / p.C, b = r / p.N, n = r % p.N;
    const float v = dev::load_elem<DT>(p.x, b * p.x_sb + n * p.x_sn + c) +
                    dev::load_elem<DT>(p.gate, b * p.gate_sb + n * p.gate_sn + c) *
                        dev::load_elem<DT>(p.y, b * p.y_sb + n * p.y_sn + c);
    dev::store_elem<DT>(p.out, b * p.out_sb + n * p.out_sn + c, v);  // out may be x: read first
  }
}

// 16-byte path (vec_ok: C % V == 0, every pointer and row stride 16-byte aligned, so a pack never
// straddles a row). The [B, N, C] tensors are `packs` = B * N * C / V packs, row-major; thread t
// of the G launched takes packs t, t + G, t + 2G, ... (consecutive threads, consecutive packs:
// coalesced), kGatedUnroll of them per step: all loads of a step are issued before the first
// store and held raw (widened to fp32 only at the math), so each thread keeps kGatedUnroll * 48
// bytes (x, gate, y) in flight. The
// grid is one wave of resident blocks, so every thread's share is within one pack of the others'.
// A per-sample gate row (gate_sn = 0) is re-read for every token: L1/L2 hits. Same math as the
// element path, x + gate * y in fp32. I: uint32_t when 2 * packs fits (cheap 32-bit divisions),
// else int64_t.
constexpr int kGatedThreads = 256;
constexpr int kGatedUnroll = 4;

template <int DT, class I>
__global__ void __launch_bounds__(kGatedThreads) gated_fwd_pack_kernel(const GatedResidualParams p, I packs,
                                                                       I row_packs) {
  constexpr int V = dev::kPack<DT>;
  const I N = static_cast<I>(p.N);
  const I G = static_cast<I>(gridDim.x) * kGatedThreads;
  const E<DT>* x = static_cast<const E<DT>*>(p.x);
  const E<DT>* gate = static_cast<const E<DT>*>(p.gate);
  const E<DT>* y = static_cast<const E<DT>*>(p.y);
  E<DT>* out = static_cast<E<DT>*>(p.out);
  for (I base = static_cast<I>(blockIdx.x) * kGatedThreads + threadIdx.x; base < packs; base += kGatedUnroll * G) {
    uint4 xr[kGatedUnroll], gr[kGatedUnroll], yr[kGatedUnroll];  // raw: 12 registers a pack in flight
    int64_t o[kGatedUnroll];
#pragma unroll
    for (int u = 0; u < kGatedUnroll; ++u) {
      const I i = base + u * G;
      if (i >= packs) continue;
      const I r = i / row_packs, b = r / N, n = r - b * N;
      const int64_t c = static_cast<int64_t>(i - r * row_packs) * V;
      const int64_t bb = static_cast<int64_t>(b), nn = static_cast<int64_t>(n);
      xr[u] = dev::load_pack_raw(x + (bb * p.x_sb + nn * p.x_sn + c));
      gr[u] = dev::load_pack_raw(gate + (bb * p.gate_sb + nn * p.gate_sn + c));
      yr[u] = dev::load_pack_raw(y + (bb * p.y_sb + nn * p.y_sn + c));
      o[u] = bb * p.out_sb + nn * p.out_sn + c;
    }
#pragma unroll
    for (int u = 0; u < kGatedUnroll; ++u) {
      if (base + u * G >= packs) continue;
      float xv[V], gv[V], yv[V], v[V];
      dev::unpack_pack<DT>(xr[u], xv);
      dev::unpack_pack<DT>(gr[u], gv);
      dev::unpack_pack<DT>(yr[u], yv);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = xv[j] + gv[j] * yv[j];
      dev::store_pack<DT>(out + o[u], v);  // out may be x: this thread read that pack above
    }
  }
}

// dy = g * gate everywhere; dgate = g * y per token (elementwise) or, per sample, its column sums
// over a row chunk into partial[b, chunk, C]. grid = (ceil(C / kColBlock), nchunks, B), one column
// per thread, so the chunk's rows are walked in order.
template <int DT>
__global__ void __launch_bounds__(kColBlock) gated_bwd_kernel(const GatedResidualBwdParams p, int64_t rows_per_block) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColBlock + threadIdx.x;
  const int64_t k = blockIdx.y, b = blockIdx.z;
  if (c >= p.C) return;
  const int64_t n0 = k * rows_per_block, n1 = n0 + rows_per_block < p.N ? n0 + rows_per_block : p.N;
  float acc = 0.f;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t r = b * p.N + n;
    const float g = dev::load_elem<DT>(p.grad, b * p.g_sb + n * p.g_sn + c);
    const float y = dev::load_elem<DT>(p.y, b * p.y_sb + n * p.y_sn + c);
    if (p.dy) dev::store_elem<DT>(p.dy, r * p.C + c, g * dev::load_elem<DT>(p.gate, b * p.gate_sb + n * p.gate_sn + c));
    if (p.per_sample) acc = fmaf(g, y, acc);  // explicit: nvcc may contract or not per kernel
    else if (p.dgate) dev::store_elem<DT>(p.dgate, r * p.C + c, g * y);
  }
  if (p.per_sample && p.dgate) p.partial[(b * gridDim.y + k) * p.C + c] = acc;
}

// 16-byte backward (vec_ok over grad, gate, y, dy, dgate): the same walk with a pack of V columns
// a thread, kGatedBwdRows rows' loads issued before the first store. Per-sample sums keep the
// element kernel's order (rows n0, n1, ... one after the other per column): the same bits.
constexpr int kGatedBwdThreads = 64;  // pack columns a block (C = 1152 bf16: 144 packs, 3 blocks)
constexpr int kGatedBwdRows = 4;
constexpr int kGatedTokenRows = 8;  // per token: rows a block (any split is exact there)

template <int DT>
__global__ void __launch_bounds__(kGatedBwdThreads) gated_bwd_pack_kernel(const GatedResidualBwdParams p,
                                                                          int64_t rows_per_block) {
  constexpr int V = dev::kPack<DT>;
  constexpr int R = kGatedBwdRows;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kGatedBwdThreads + threadIdx.x) * V;
  const int64_t k = blockIdx.y, b = blockIdx.z;
  if (c >= p.C) return;
  const int64_t n0 = k * rows_per_block, n1 = n0 + rows_per_block < p.N ? n0 + rows_per_block : p.N;
  const E<DT>* grad = static_cast<const E<DT>*>(p.grad) + b * p.g_sb + c;
  const E<DT>* gate = static_cast<const E<DT>*>(p.gate) + b * p.gate_sb + c;
  const E<DT>* y = static_cast<const E<DT>*>(p.y) + b * p.y_sb + c;
  const bool want_y = p.dgate != nullptr;
  float acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.f;
  for (int64_t n = n0; n < n1; n += R) {
    uint4 gr[R], tr[R], yr[R];
#pragma unroll
    for (int u = 0; u < R; ++u) {
      if (n + u >= n1) continue;
      gr[u] = dev::load_pack_raw(grad + (n + u) * p.g_sn);
      if (p.dy) tr[u] = dev::load_pack_raw(gate + (n + u) * p.gate_sn);
      if (want_y) yr[u] = dev::load_pack_raw(y + (n + u) * p.y_sn);
    }
#pragma unroll
    for (int u = 0; u < R; ++u) {
      if (n + u >= n1) continue;
      const int64_t r = b * p.N + n + u;
      float gv[V], t[V], o[V];
      dev::unpack_pack<DT>(gr[u], gv);
      if (p.dy) {
        dev::unpack_pack<DT>(tr[u], t);
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] = gv[j] * t[j];
        dev::store_pack<DT>(static_cast<E<DT>*>(p.dy) + r * p.C + c, o);
      }
      if (!want_y) continue;
      dev::unpack_pack<DT>(yr[u], t);
      if (p.per_sample) {
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = fmaf(gv[j], t[j], acc[j]);  // as the element kernel
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] = gv[j] * t[j];
        dev::store_pack<DT>(static_cast<E<DT>*>(p.dgate) + r * p.C + c, o);
      }
    }
  }
  if (p.per_sample && want_y) {
    float* part = p.partial + (b * gridDim.y + k) * p.C + c;
#pragma unroll
    for (int j = 0; j < V; ++j) part[j] = acc[j];
  }
}

#include "cuda/modulate_warp.cuh"

// -------------------------------------------------------------------------------------- launches
int last_error() { return static_cast<int>(cudaGetLastError()); }

using dev::reduce_partials;  // csrc/cuda/common.cuh: shared with csrc/cuda/gelu.cu
using dev::vec_ok;

template <int DT, int ITEMS>
void launch_fwd_warp(const ModulateParams& p, bool vec, void* stream) {
  const dim3 grid(static_cast<unsigned>((p.B * p.N + kRowWarps - 1) / kRowWarps));
  if (vec) {
    auto k = &modulate_fwd_warp_kernel<DT, true, ITEMS>;
    GENFAST_LAUNCH(k, grid, kRowWarps * 32, 0, stream, p);
  } else {
    auto k = &modulate_fwd_warp_kernel<DT, false, ITEMS>;
    GENFAST_LAUNCH(k, grid, kRowWarps * 32, 0, stream, p);
  }
}

// Read once: GENFAST_MODULATE_BWD_PRELOAD=0 switches the per-sample backward's row preloading off.
bool bwd_preload() {
  static const bool on = [] {
    const char* s = std::getenv("GENFAST_MODULATE_BWD_PRELOAD");
    return !(s && s[0] == '0');
  }();
  return on;
}

template <int DT, bool VEC, int ITEMS>
void launch_bwd_warp_v(const ModulateBwdParams& p, int64_t nchunks, void* stream) {
  if (!p.per_sample) {
    auto k = &modulate_bwd_token_warp_kernel<DT, VEC, ITEMS>;
    GENFAST_LAUNCH(k, dim3(static_cast<unsigned>((p.B * p.N + kRowWarps - 1) / kRowWarps)), kRowWarps * 32, 0,
                   stream, p);
    return;
  }
  const size_t smem = sizeof(float) * kChunkWarps * 2 * static_cast<size_t>(chunk_slots<DT, VEC>(p.C));
  const dim3 grid(static_cast<unsigned>(nchunks), static_cast<unsigned>(p.B));
  // Row preloading (modulate_bwd_warp_row): registers 222 -> 245 at ITEMS = 40 on sm_90, still 2 blocks an
  // SM; it would spill at 48. GENFAST_MODULATE_BWD_PRELOAD=0 runs the old load order, for a GPU A/B
  // (benchmarks/gpu/profile.py chunks); same bits either way.
  if constexpr (ITEMS <= 40) {
    if (bwd_preload()) {
      auto k = &modulate_bwd_chunk_warp_kernel<DT, VEC, ITEMS, true>;
      GENFAST_LAUNCH(k, grid, kChunkWarps * 32, smem, stream, p);
      return;
    }
  }
  auto k = &modulate_bwd_chunk_warp_kernel<DT, VEC, ITEMS, false>;
  GENFAST_LAUNCH(k, grid, kChunkWarps * 32, smem, stream, p);
}

template <int DT, int ITEMS>
void launch_bwd_warp(const ModulateBwdParams& p, int64_t nchunks, bool vec, void* stream) {
  if (vec) launch_bwd_warp_v<DT, true, ITEMS>(p, nchunks, stream);
  else launch_bwd_warp_v<DT, false, ITEMS>(p, nchunks, stream);
}

template <int DT>
int modulate_fwd(const ModulateParams& p, void* stream) {
  const bool vec = vec_ok<DT>(p.C, {p.out, p.x, p.shift, p.scale},
                              {p.out_sb, p.out_sn, p.x_sb, p.x_sn, p.shift_sb, p.shift_sn, p.scale_sb, p.scale_sn});
  if (p.C <= 32 * 16) {
    launch_fwd_warp<DT, 16>(p, vec, stream);
  } else if (p.C <= 32 * 32) {
    launch_fwd_warp<DT, 32>(p, vec, stream);
  } else if (p.C <= 32 * 40) {  // DiT-XL's 1152: 5 packs of 8 halves a lane, no idle registers
    launch_fwd_warp<DT, 40>(p, vec, stream);
  } else if (p.C <= 32 * 64) {
    launch_fwd_warp<DT, 64>(p, vec, stream);
  } else {
    const dim3 grid(static_cast<unsigned>(p.B * p.N));
    auto k = &modulate_fwd_wide_kernel<DT>;
    GENFAST_LAUNCH(k, grid, kThreads, 0, stream, p);
  }
  return last_error();
}

template <int DT>
int modulate_bwd(const ModulateBwdParams& p, void* stream) {
  const int64_t nchunks = p.per_sample ? (p.N + p.chunk_rows - 1) / p.chunk_rows : 0;
  if (p.per_sample && (nchunks > 65535 || p.B > 65535)) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid = p.per_sample ? dim3(static_cast<unsigned>(nchunks), static_cast<unsigned>(p.B))
                                 : dim3(static_cast<unsigned>(p.B * p.N));
  const bool vec = vec_ok<DT>(p.C, {p.dx, p.dshift, p.dscale, p.grad, p.x, p.scale},
                              {p.dx_sb, p.dx_sn, p.g_sb, p.g_sn, p.x_sb, p.x_sn, p.scale_sb, p.scale_sn});
  if (p.C <= 32 * 16) {
    launch_bwd_warp<DT, 16>(p, nchunks, vec, stream);
  } else if (p.C <= 32 * 40) {
    launch_bwd_warp<DT, 40>(p, nchunks, vec, stream);
  } else if (p.C <= 32 * 48) {
    launch_bwd_warp<DT, 48>(p, nchunks, vec, stream);
  } else {
    auto k = &modulate_bwd_wide_kernel<DT>;
    GENFAST_LAUNCH(k, grid, kThreads, 0, stream, p);
  }
  int err = last_error();
  if (err || !p.per_sample) return err;
  if (p.dscale && (err = reduce_partials<DT>(p.dscale, p.partial, p.B, nchunks, 2 * p.C, p.C, stream))) return err;
  if (p.dshift) err = reduce_partials<DT>(p.dshift, p.partial + p.C, p.B, nchunks, 2 * p.C, p.C, stream);
  return err;
}

template <int DT, class I>
void launch_gated_pack(const GatedResidualParams& p, int64_t packs, int64_t row_packs, void* stream) {
  static std::atomic<int> cache[64];
  auto k = &gated_fwd_pack_kernel<DT, I>;
  const int64_t want = (packs + kGatedThreads * kGatedUnroll - 1) / (kGatedThreads * kGatedUnroll);
  const int64_t cap = dev::resident_blocks(k, kGatedThreads, cache);
  GENFAST_LAUNCH(k, dim3(static_cast<unsigned>(want < cap ? want : cap)), kGatedThreads, 0, stream, p,
                 static_cast<I>(packs), static_cast<I>(row_packs));
}

template <int DT>
int gated_fwd(const GatedResidualParams& p, void* stream) {
  if (vec_ok<DT>(p.C, {p.out, p.x, p.gate, p.y},
                 {p.out_sb, p.out_sn, p.x_sb, p.x_sn, p.gate_sb, p.gate_sn, p.y_sb, p.y_sn})) {
    const int64_t row_packs = p.C / dev::kPack<DT>, packs = p.B * p.N * row_packs;
    // 32-bit indices when base + kGatedUnroll * G (< 2 * packs + one step) cannot wrap.
    if (packs <= (int64_t{1} << 30)) launch_gated_pack<DT, uint32_t>(p, packs, row_packs, stream);
    else launch_gated_pack<DT, int64_t>(p, packs, row_packs, stream);
    return last_error();
  }
  const int64_t total = p.B * p.N * p.C;
  const int64_t blocks = (total + 255) / 256;
  auto k = &gated_fwd_kernel<DT>;
  GENFAST_LAUNCH(k, dim3(static_cast<unsigned>(blocks < 65536 ? blocks : 65536)), 256, 0, stream, p);
  return last_error();
}

template <int DT>
int gated_bwd(const GatedResidualBwdParams& p, void* stream) {
  const bool vec = vec_ok<DT>(p.C, {p.dy, p.dgate, p.grad, p.gate, p.y},
                              {p.g_sb, p.g_sn, p.gate_sb, p.gate_sn, p.y_sb, p.y_sn});
  // Per token the rows are cut the same way (any split is exact there); per sample the chunk
  // size is the caller's, so the partial sums do not depend on the device.
  int64_t rows_per_block = p.per_sample ? p.chunk_rows : 32;
  if (vec && !p.per_sample && (p.N + kGatedTokenRows - 1) / kGatedTokenRows <= 65535) rows_per_block = kGatedTokenRows;
  const int64_t nchunks = (p.N + rows_per_block - 1) / rows_per_block;
  if (nchunks > 65535 || p.B > 65535) return static_cast<int>(cudaErrorInvalidValue);
  if (vec) {
    const int64_t cols = p.C / dev::kPack<DT>;
    const dim3 grid(static_cast<unsigned>((cols + kGatedBwdThreads - 1) / kGatedBwdThreads),
                    static_cast<unsigned>(nchunks), static_cast<unsigned>(p.B));
    auto k = &gated_bwd_pack_kernel<DT>;
    GENFAST_LAUNCH(k, grid, kGatedBwdThreads, 0, stream, p, rows_per_block);
  } else {
    const dim3 grid(static_cast<unsigned>((p.C + kColBlock - 1) / kColBlock), static_cast<unsigned>(nchunks),
                    static_cast<unsigned>(p.B));
    auto k = &gated_bwd_kernel<DT>;
    GENFAST_LAUNCH(k, grid, kColBlock, 0, stream, p, rows_per_block);
  }
  int err = last_error();
  if (err || !p.per_sample || !p.dgate) return err;
  return reduce_partials<DT>(p.dgate, p.partial, p.B, nchunks, p.C, p.C, stream);
}

template <template <int> class Fn, class P>
int by_dtype(const P& p, void* stream) {
  switch (p.dtype) {
    case kFloat32: return Fn<kFloat32>::run(p, stream);
    case kFloat16: return Fn<kFloat16>::run(p, stream);
    case kBFloat16: return Fn<kBFloat16>::run(p, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
template <int DT> struct FwdFn { static int run(const ModulateParams& p, void* s) { return modulate_fwd<DT>(p, s); } };
template <int DT> struct BwdFn { static int run(const ModulateBwdParams& p, void* s) { return modulate_bwd<DT>(p, s); } };
template <int DT> struct GFwdFn { static int run(const GatedResidualParams& p, void* s) { return gated_fwd<DT>(p, s); } };
template <int DT> struct GBwdFn { static int run(const GatedResidualBwdParams& p, void* s) { return gated_bwd<DT>(p, s); } };

}  // namespace

int modulate_fwd_cuda(const ModulateParams& p, void* stream) {
  if (p.B * p.N == 0 || p.C == 0) return 0;
  return by_dtype<FwdFn>(p, stream);
}
int modulate_bwd_cuda(const ModulateBwdParams& p, void* stream) {
  if (p.B * p.N == 0 || p.C == 0) return 0;
  return by_dtype<BwdFn>(p, stream);
}
int gated_residual_fwd_cuda(const GatedResidualParams& p, void* stream) {
  if (p.B * p.N == 0 || p.C == 0) return 0;
  return by_dtype<GFwdFn>(p, stream);
}
int gated_residual_bwd_cuda(const GatedResidualBwdParams& p, void* stream) {
  if (p.B * p.N == 0 || p.C == 0) return 0;
  return by_dtype<GBwdFn>(p, stream);
}

}  // namespace genfast
