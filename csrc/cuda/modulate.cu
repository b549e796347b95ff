// adaLN modulate and gated residual on the GPU, forward and fused backward (math and layout:
// csrc/modulate.h).
//
//  - modulate forward and backward, C <= 2048 (forward) / 1536 (backward): one warp per row, the
//    row in registers, statistics by warp shuffles, 16-byte loads/stores where C and the
//    pointers allow (csrc/cuda/modulate_warp.cuh, which also describes the per-sample sums).
//    fp16 / bf16 forward with per-sample scale / shift and C <= 1280 (DiT-XL's 1152): the
//    streaming kernel, a warp taking several rows with the next row's loads in flight
//    (rows_per_warp; GENFAST_MODULATE_FWD_ROWS=1 keeps the one-row kernel, for GPU A/B timings), or
//    the asynchronous one (cp.async into shared memory, 3 rows in flight a warp) where the rows fill
//    several waves of the streaming kernel (fwd_async, timed on an H200); the
//    per-sample backward's warps likewise load a row ahead where the grid fits one wave (stream_bwd).
//  - wider rows: one block (128 threads) per row, block reductions, x re-read from L1/L2 in each
//    pass; per sample, one block per (row chunk, sample) that walks its rows and accumulates in
//    its own fp32 partial row in global memory (only this block touches it).
//  - per-sample gradients: partial rows [B, nchunks, 2, C], then a second kernel adds the chunks
//    in order. Fixed chunking, no atomics: the same bits on every run.
//  - gated residual (csrc/cuda/gated_kernels.cuh) forward: 16-byte packs, kGatedUnroll a thread
//    per step, where C and the pointers allow (vec_ok); else a grid-stride element kernel. Its
//    backward (a column, or a 16-byte pack of columns, a thread, walking a row chunk) sums g * y
//    per (row chunk, sample, column) the same deterministic way as modulate, and with a bias
//    gradient asked for, dy's column sums too; both paths give the same bits.
//
// Checked without a GPU (DESIGN.md §8):
//   nvcc -std=c++17 -arch=sm_80|sm_90 --resource-usage -Icsrc -c csrc/cuda/modulate.cu -o /tmp/m.o
//     (nvcc 13.0, both archs: no spills, no stack frame. Warp forward 45-128 registers (C = 1152
//     bf16: 76; 127-128 with the scale / shift preload, 3 -> 2 blocks an SM); the streaming forward
//     72-128 (fp16 / bf16, C <= 1280: 2 blocks an SM; it spilled at C <= 2048, so those rows keep
//     the one-row kernel); per-token warp backward 68-142, per-sample chunk backward 98-252 (the
//     16-byte 40/48-item instances without preloading ~212-252: loads and shared accumulators of a
//     whole row in flight; 4 warps a block; 154-168 with preloading, 205 a row ahead), the block kernels and the rest
//     26-56. IEEE divides and 1/sqrtf are subroutine calls that spilled on sm_80, hence __frcp_rn /
//     __fsqrt_rn and multiplies by 1/C. Session 9's 16-byte store (dev::store_pack as one
//     st.global.v4) moved these counts by a few registers, and the preloading chunk backward from
//     ~223-245 to ~154-168.)
//     Gated residual, 16-byte paths: forward 74-88 registers (32-bit indices; 84-88 with 64-bit),
//     3 blocks of 256 a SM; backward 94-123 with the bias sums (80-96 before; 64-thread blocks);
//     element kernels 28-48.
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
constexpr int kMaxStreamRows = 16;  // rows a warp of the streaming forward takes at most
constexpr int kMaxAsyncRows = 32;   // and of the asynchronous forward (its pipeline fills over kAsyncStages - 1 rows)

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
    q = fmaf(d, d, q);
  }
  // Correctly rounded sqrt and reciprocal as inline instructions (the IEEE 1/sqrtf path is a
  // subroutine call that cost a stack frame and a spill on sm_80); same values as the C++ kernel.
  const float rstd = __frcp_rn(__fsqrt_rn(dev::block_sum(q, scratch) * inv_c + p.eps));
  for (int64_t c = tid; c < C; c += kThreads) {
    dev::store_elem<DT>(out, c, dev::modulate_one(dev::load_elem<DT>(x, c), mean, rstd, dev::load_elem<DT>(scale, c),
                                                  shift ? dev::load_elem<DT>(shift, c) : 0.f, shift != nullptr));
  }
  if (tid == 0 && p.mean) {  // (null: an inference call, nothing saves them)
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
    const float gv = dev::load_elem<DT>(g, c), xh = __fmul_rn(dev::load_elem<DT>(x, c) - mean, rstd);
    const float dxh = __fmul_rn(gv, 1.f + dev::load_elem<DT>(scale, c)), gx = __fmul_rn(gv, xh);
    a += dxh;
    bs = fmaf(dxh, xh, bs);
    if (part_scale) part_scale[c] += gx;
    if (part_shift) part_shift[c] += gv;
    if (!p.per_sample && p.dscale) dev::store_elem<DT>(p.dscale, r * C + c, gx);
    if (!p.per_sample && p.dshift) dev::store_elem<DT>(p.dshift, r * C + c, gv);
  }
  if (!p.dx) return;
  const float inv_c = __frcp_rn(static_cast<float>(C));
  const float ma = p.rms ? 0.f : dev::block_sum(a, scratch) * inv_c;
  const float mb = dev::block_sum(bs, scratch) * inv_c;
  E<DT>* dx = static_cast<E<DT>*>(p.dx) + b * p.dx_sb + n * p.dx_sn;
  const E<DT>* add = p.addend ? static_cast<const E<DT>*>(p.addend) + b * p.dx_sb + n * p.dx_sn : nullptr;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const float xh = __fmul_rn(dev::load_elem<DT>(x, c) - mean, rstd);
    const float dxh = __fmul_rn(dev::load_elem<DT>(g, c), 1.f + dev::load_elem<DT>(scale, c));
    float v = dev::modulate_dx(dxh, xh, ma, mb, rstd);
    if (add) v = __fadd_rn(dev::round_to<DT>(v), dev::load_elem<DT>(add, c));  // as the warp kernels
    dev::store_elem<DT>(dx, c, v);
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

#include "cuda/gated_kernels.cuh"
#include "cuda/modulate_warp.cuh"

// -------------------------------------------------------------------------------------- launches
int last_error() { return static_cast<int>(cudaGetLastError()); }

using dev::reduce_partials;  // csrc/cuda/common.cuh: shared with csrc/cuda/gelu.cu
using dev::vec_ok;

// The load-order switches below (all the same bits; for GPU A/B timings, benchmarks/gpu/NOTES.md), each
// read once: 0 or 1 when the variable starts with that digit, -1 when it is unset or anything else.
int env_switch(const char* name) {
  const char* s = std::getenv(name);
  return s && s[0] == '0' ? 0 : s && s[0] == '1' ? 1 : -1;
}
// GENFAST_MODULATE_FWD_PRELOAD=0 / GENFAST_MODULATE_BWD_PRELOAD=0 switch the forward's scale / shift
// preloading and the per-sample backward's row preloading off (the old load orders).
bool fwd_preload() {
  static const bool on = env_switch("GENFAST_MODULATE_FWD_PRELOAD") != 0;
  return on;
}
bool bwd_preload() {
  static const bool on = env_switch("GENFAST_MODULATE_BWD_PRELOAD") != 0;
  return on;
}
// GENFAST_MODULATE_BWD_STREAM: 0 = the per-sample backward's warps always load one row at a time
// (preloaded or not, as above), 1 = always a row ahead, unset = by stream_bwd() (benchmarks/gpu/profile.py modab).
int bwd_stream_env() {
  static const int v = env_switch("GENFAST_MODULATE_BWD_STREAM");
  return v;
}
// A row ahead only while the grid fits one wave of the streaming kernel's resident blocks. H200, bf16,
// C = 1152 (session 17, profile.py modab): 256 blocks (8192 rows) 46-49 us a row ahead vs 55-60 a row
// at a time; 1024 blocks (32768 rows) 166 vs 142 us: past one wave the row-at-a-time kernel's third
// block an SM (205 vs 154-168 registers) hides more latency than the walk does.
// `cache`: one per kernel instance (every instance has the same function-pointer type, so a static
// here would be shared by all of them).
template <class Kernel>
bool stream_bwd(Kernel kernel, int64_t blocks, size_t max_smem, std::atomic<int>* cache) {
  if (const int env = bwd_stream_env(); env >= 0) return env == 1;
  return blocks <= dev::resident_blocks(kernel, kChunkWarps * 32, cache, max_smem);
}
// GENFAST_MODULATE_FWD_ROWS: rows a warp of the streaming / asynchronous forward takes (1: the one-row
// kernel; unset or 0: rows_per_warp() picks; it caps the count at the kernel's most), read once, for GPU
// A/B timings (benchmarks/gpu/profile.py modab / modfwd).
int fwd_rows_env() {
  static const int rows = [] {
    const char* s = std::getenv("GENFAST_MODULATE_FWD_ROWS");
    const int v = s ? std::atoi(s) : 0;
    return v < 0 ? 0 : v;
  }();
  return rows;
}
// GENFAST_MODULATE_FWD_ASYNC: 1 = the per-sample 16-bit forward always takes the asynchronous kernel
// (cp.async into shared memory, several rows in flight a warp), 0 = never (the streaming one); unset =
// by fwd_async() below. Read once, for GPU A/B timings (benchmarks/gpu/profile.py modfwd).
int fwd_async_env() {
  static const int v = env_switch("GENFAST_MODULATE_FWD_ASYNC");
  return v;
}
// The asynchronous forward where the streaming kernel's warps would take kAsyncFromRows rows or more
// each (a grid of several waves' worth of rows), the streaming one below. H200, bf16, C = 1152 (session
// 25, profile.py modfwd): 32768 rows (15.5 a streaming warp) 50.8 us async vs 55.4 streaming (76 vs 69 %
// of a same-size copy); 8192 rows (3.9 a warp) 36.7-38.8 vs 22.6-22.7. A forced row count alone
// (GENFAST_MODULATE_FWD_ROWS) keeps the streaming kernel, as before the rule.
constexpr int kAsyncFromRows = 8;
template <class Kernel>
bool fwd_async(Kernel stream_kernel, int64_t rows, std::atomic<int>* stream_cache) {
  if (const int env = fwd_async_env(); env >= 0) return env == 1;
  if (fwd_rows_env()) return false;
  return rows >= kAsyncFromRows * kRowWarps * dev::resident_blocks(stream_kernel, kRowWarps * 32, stream_cache);
}

// Rows per warp for a walking forward kernel (warps_per_block warps a block), or 0 for the one-row
// kernel: one wave of warps (the device's resident blocks), each with at least two rows so that a
// load of the next row overlaps the current one, at most max_rows. `cache`: one per kernel instance.
template <class Kernel>
int rows_per_warp(Kernel kernel, int warps_per_block, int64_t rows, int max_rows, std::atomic<int>* cache) {
  if (const int env = fwd_rows_env()) return env > 1 ? (env < max_rows ? env : max_rows) : 0;
  const int64_t warps = dev::resident_blocks(kernel, warps_per_block * 32, cache) * warps_per_block;
  const int64_t per_warp = (rows + warps - 1) / warps;
  return per_warp < 2 ? 0 : static_cast<int>(per_warp < max_rows ? per_warp : max_rows);
}

template <int DT, int ITEMS>
void launch_fwd_warp(const ModulateParams& p, bool vec, void* stream) {
  const int64_t rows = p.B * p.N;
  const bool per_sample = p.scale_sn == 0 && (!p.shift || p.shift_sn == 0);
  // 16-bit types up to 40 items (C <= 1280): two rows of raw packs fit 128 registers (2 blocks an SM);
  // at 64 items the streaming kernel spills (sm_80 / sm_90, nvcc 13.0)
  if constexpr (dev::kPack<DT> == 8 && ITEMS <= 40) {
    auto fwd_stream = &modulate_fwd_stream_kernel<DT, ITEMS>;
    static std::atomic<int> stream_cache[64];  // this instance's resident blocks, per device
    if (vec && per_sample && fwd_async(fwd_stream, rows, stream_cache)) {
      auto fwd_async_k = &modulate_fwd_async_kernel<DT, ITEMS>;
      static std::atomic<int> cache[64];
      if (const int per_warp = rows_per_warp(fwd_async_k, kAsyncWarps, rows, kMaxAsyncRows, cache)) {
        const int64_t rows_per_block = int64_t{kAsyncWarps} * per_warp;
        GENFAST_LAUNCH(fwd_async_k, dim3(static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block)),
                       kAsyncWarps * 32, 0, stream, p, per_warp);
        return;
      }
    } else if (vec && per_sample) {
      if (const int per_warp = rows_per_warp(fwd_stream, kRowWarps, rows, kMaxStreamRows, stream_cache)) {
        const int64_t rows_per_block = int64_t{kRowWarps} * per_warp;
        GENFAST_LAUNCH(fwd_stream, dim3(static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block)),
                       kRowWarps * 32, 0, stream, p, per_warp);
        return;
      }
    }
  }
  const dim3 grid(static_cast<unsigned>((rows + kRowWarps - 1) / kRowWarps));
  if (vec && fwd_preload()) {
    auto k = &modulate_fwd_warp_kernel<DT, true, ITEMS, true>;
    GENFAST_LAUNCH(k, grid, kRowWarps * 32, 0, stream, p);
  } else if (vec) {
    auto k = &modulate_fwd_warp_kernel<DT, true, ITEMS, false>;
    GENFAST_LAUNCH(k, grid, kRowWarps * 32, 0, stream, p);
  } else {
    auto k = &modulate_fwd_warp_kernel<DT, false, ITEMS, false>;
    GENFAST_LAUNCH(k, grid, kRowWarps * 32, 0, stream, p);
  }
}

template <int DT, bool VEC, int ITEMS>
void launch_bwd_warp_v(const ModulateBwdParams& p, int64_t nchunks, void* stream) {
  if (!p.per_sample) {
    auto k = &modulate_bwd_token_warp_kernel<DT, VEC, ITEMS>;
    GENFAST_LAUNCH(k, dim3(static_cast<unsigned>((p.B * p.N + kRowWarps - 1) / kRowWarps)), kRowWarps * 32, 0,
                   stream, p);
    return;
  }
  const size_t smem = chunk_smem<DT, VEC>(p.C);
  const dim3 grid(static_cast<unsigned>(nchunks), static_cast<unsigned>(p.B));
  // Row loads (modulate_bwd_warp_row), all the same bits, switchable for GPU A/B timings (benchmarks/gpu/
  // profile.py chunks / fusions): fp16 / bf16 16-byte rows up to 40 items a row ahead (the streaming
  // walk, while the grid fits one wave: stream_bwd), else 16-byte rows up to 40 items preloaded a row at a time
  // (GENFAST_MODULATE_BWD_PRELOAD=0 off: the old order, each pack's loads where used). Not at 48 items
  // (it would spill) nor on the element path (misaligned tensors: it spilled 16 bytes on sm_80, fp32,
  // 40 items, at 128 registers); fp32 rows are twice the raw registers, so they are not streamed.
  if constexpr (ITEMS <= 40 && VEC) {
    if constexpr (dev::kPack<DT> == 8) {
      auto bwd_stream_k = &modulate_bwd_chunk_warp_kernel<DT, VEC, ITEMS, kLoadGiven>;
      const size_t max_smem = chunk_smem<DT, VEC>(32 * ITEMS);  // this instance's widest rows
      static std::atomic<int> cache[64];  // this instance's resident blocks, per device
      if (stream_bwd(bwd_stream_k, nchunks * p.B, max_smem, cache)) {
        GENFAST_LAUNCH(bwd_stream_k, grid, kChunkWarps * 32, smem, stream, p);
        return;
      }
    }
    if (bwd_preload()) {
      auto k = &modulate_bwd_chunk_warp_kernel<DT, VEC, ITEMS, kLoadRowFirst>;
      GENFAST_LAUNCH(k, grid, kChunkWarps * 32, smem, stream, p);
      return;
    }
  }
  auto k = &modulate_bwd_chunk_warp_kernel<DT, VEC, ITEMS, kLoadInLoop>;
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
  const bool vec = vec_ok<DT>(p.C, {p.dx, p.dshift, p.dscale, p.addend, p.grad, p.x, p.scale},
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
  if (err || !p.per_sample) return err;
  if (p.dgate && (err = reduce_partials<DT>(p.dgate, p.partial, p.B, nchunks, p.C, p.C, stream))) return err;
  // dbias: each sample's chunks in order (fp32), then the samples in order
  return p.dbias ? dev::reduce_groups<DT>(p.dbias, p.bias_partial, p.B, nchunks, p.C, stream) : 0;
}

using dev::by_dtype;
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
