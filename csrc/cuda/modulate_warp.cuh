// adaLN modulate, warp-per-row kernels (included by csrc/cuda/modulate.cu inside its anonymous
// namespace; math and layout: csrc/modulate.h).
//
// One warp owns one row: statistics by warp shuffles only (no block barrier per row), the row in
// registers, several rows (warps) per block. Lane `lane` owns the columns
//     c = (lane + 32 k) * V + j,   k < ITEMS / V,  j < V
// V = dev::kPack<DT> (16-byte loads/stores: 8 bf16/fp16 or 4 fp32) when VEC, else V = 1 (element
// loads, still coalesced). VEC needs C % V == 0 and every base pointer and row stride 16-byte
// aligned (checked on the host, vec_ok in modulate.cu): then a pack is either wholly inside the
// row or wholly past its end. C <= 32 * ITEMS.
//
// Per-sample backward: a block of kChunkWarps warps takes one (row chunk, sample); warp w walks
// its own contiguous share of the chunk's rows and adds g * xhat and g into its own accumulator
// in shared memory; after one barrier the warps' accumulators are added in warp order 0, 1, ...
// into the chunk's fp32 partial row. Fixed chunking, fixed order, no atomics: the same bits on
// every run. Accumulators are laid out by slot (k * V + j) * 32 + lane, so a warp's accesses hit
// 32 different banks for every V.
#pragma once

constexpr int kRowWarps = 8;    // rows (warps) per block: forward and per-token backward
constexpr int kChunkWarps = 4;  // warps sharing one per-sample row chunk (<= 48 KiB of accumulators)

template <int DT, bool VEC>
constexpr int kLaneVec = VEC ? dev::kPack<DT> : 1;

// v[0..V) = elements c0 .. c0 + V - 1 of row (c0 < C: the whole pack is inside the row when VEC).
template <int DT, bool VEC>
__device__ __forceinline__ void load_v(const E<DT>* row, int64_t c0, float (&v)[kLaneVec<DT, VEC>]) {
  if constexpr (VEC) dev::load_pack<DT>(row + c0, v);
  else v[0] = dev::load_elem<DT>(row, c0);
}
template <int DT, bool VEC>
__device__ __forceinline__ void store_v(E<DT>* row, int64_t c0, const float (&v)[kLaneVec<DT, VEC>]) {
  if constexpr (VEC) dev::store_pack<DT>(row + c0, v);
  else dev::store_elem<DT>(row, c0, v[0]);
}

// A warp's row statistics from its items v (0 past C): (mean, rstd). Shared by the forward kernels
// below so that they do the same arithmetic in the same order (the same bits).
template <int V, int ITEMS>
__device__ __forceinline__ float2 warp_row_stats(const float (&v)[ITEMS], int lane, int64_t C, float eps, int32_t rms) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) s += v[i];
  const float inv_c = __frcp_rn(static_cast<float>(C));  // as the block kernel: multiply by 1/C
  const float mean = rms ? 0.f : dev::warp_sum(s) * inv_c;
  float q = 0.f;  // mean((x - mean)^2), never E[x^2] - mean^2
#pragma unroll
  for (int k = 0; k < ITEMS / V; ++k) {
    const bool ok = static_cast<int64_t>(lane + 32 * k) * V < C;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float d = v[k * V + j] - mean;
      if (ok) q = fmaf(d, d, q);
    }
  }
  return make_float2(mean, __frcp_rn(__fsqrt_rn(dev::warp_sum(q) * inv_c + eps)));
}

// One output pack: (v - mean) * rstd * (1 + scale) (+ shift), every rounding spelled out (dev::modulate_one).
template <int V>
__device__ __forceinline__ void modulate_pack(const float* v, const float (&sc)[V], const float (&sh)[V],
                                              bool has_shift, float2 st, float (&o)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) o[j] = dev::modulate_one(v[j], st.x, st.y, sc[j], has_shift ? sh[j] : 0.f, has_shift);
}

// PRELOAD (16-byte rows only): the row's scale / shift packs are loaded right after x, before the
// statistics, and held raw (4 registers a pack). Otherwise they are loaded in the output loop, where
// each load follows the previous pack's store in program order and may not pass it (out could alias
// them, as far as the compiler knows): one L2 round trip per pack after the statistics.
template <int DT, bool VEC, int ITEMS, bool PRELOAD>
__global__ void __launch_bounds__(kRowWarps * 32) modulate_fwd_warp_kernel(const ModulateParams p) {
  static_assert(VEC || !PRELOAD, "preloading holds raw 16-byte packs");
  constexpr int V = kLaneVec<DT, VEC>;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (r >= p.B * p.N) return;  // the whole warp leaves together: no shuffle waits on it
  const int64_t b = r / p.N, n = r % p.N, C = p.C;
  const E<DT>* x = static_cast<const E<DT>*>(p.x) + b * p.x_sb + n * p.x_sn;
  const E<DT>* scale = static_cast<const E<DT>*>(p.scale) + b * p.scale_sb + n * p.scale_sn;
  const E<DT>* shift = p.shift ? static_cast<const E<DT>*>(p.shift) + b * p.shift_sb + n * p.shift_sn : nullptr;
  E<DT>* out = static_cast<E<DT>*>(p.out) + b * p.out_sb + n * p.out_sn;

  float v[ITEMS];
#pragma unroll
  for (int k = 0; k < ITEMS / V; ++k) {
    const int64_t c0 = static_cast<int64_t>(lane + 32 * k) * V;
    float t[V];
    if (c0 < C) load_v<DT, VEC>(x, c0, t);
#pragma unroll
    for (int j = 0; j < V; ++j) v[k * V + j] = c0 < C ? t[j] : 0.f;
  }
  constexpr int P = PRELOAD ? ITEMS / V : 1;
  uint4 sc_raw[P], sh_raw[P];
  if constexpr (PRELOAD) {
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t c0 = static_cast<int64_t>(lane + 32 * k) * V;
      if (c0 >= C) continue;
      sc_raw[k] = dev::load_pack_raw(scale + c0);
      if (shift) sh_raw[k] = dev::load_pack_raw(shift + c0);
    }
  }
  const float2 st = warp_row_stats<V, ITEMS>(v, lane, C, p.eps, p.rms);
#pragma unroll
  for (int k = 0; k < ITEMS / V; ++k) {
    const int64_t c0 = static_cast<int64_t>(lane + 32 * k) * V;
    if (c0 >= C) continue;
    float sc[V], sh[V], o[V];
    if constexpr (PRELOAD) {
      dev::unpack_pack<DT>(sc_raw[k], sc);
      if (shift) dev::unpack_pack<DT>(sh_raw[k], sh);
    } else {
      load_v<DT, VEC>(scale, c0, sc);
      if (shift) load_v<DT, VEC>(shift, c0, sh);
    }
    modulate_pack<V>(v + k * V, sc, sh, shift != nullptr, st, o);
    store_v<DT, VEC>(out, c0, o);
  }
  if (lane == 0 && p.mean) {  // (null: an inference call)
    p.mean[r] = st.x;
    p.rstd[r] = st.y;
  }
}

// A row's lane-owned 16-byte packs, raw (pack k: columns (lane + 32 k) * V ...; packs past C are not
// loaded): the rows the streaming kernels load a row ahead.
template <int DT, int P>
__device__ __forceinline__ void load_row_raw(const E<DT>* row, int lane, int64_t C, uint4 (&dst)[P]) {
  constexpr int V = dev::kPack<DT>;
#pragma unroll
  for (int k = 0; k < P; ++k) {
    const int64_t c0 = static_cast<int64_t>(lane + 32 * k) * V;
    if (c0 < C) dst[k] = dev::load_pack_raw(row + c0);
  }
}

// One row of the per-sample forward (16-byte rows) from its raw packs: raw(k) is this lane's pack k,
// asked only for packs inside the row. Statistics, output (scale / shift read here: a sample's packs
// stay in L1 for its rows), mean / rstd of row r = (b, n). The one-row kernel's arithmetic, in the
// same order: the same bits. Shared by the streaming and the asynchronous kernels.
template <int DT, int ITEMS, class Raw>
__device__ __forceinline__ void fwd_row_per_sample(const ModulateParams& p, Raw raw, int lane, int64_t r, int64_t b,
                                                   int64_t n) {
  constexpr int V = dev::kPack<DT>, P = ITEMS / V;
  const int64_t C = p.C;
  float v[ITEMS];
#pragma unroll
  for (int k = 0; k < P; ++k) {
    const bool ok = static_cast<int64_t>(lane + 32 * k) * V < C;
    float t[V];
    if (ok) dev::unpack_pack<DT>(raw(k), t);
#pragma unroll
    for (int j = 0; j < V; ++j) v[k * V + j] = ok ? t[j] : 0.f;
  }
  const float2 st = warp_row_stats<V, ITEMS>(v, lane, C, p.eps, p.rms);
  const E<DT>* scale = static_cast<const E<DT>*>(p.scale) + b * p.scale_sb;
  const E<DT>* shift = p.shift ? static_cast<const E<DT>*>(p.shift) + b * p.shift_sb : nullptr;
  E<DT>* out = static_cast<E<DT>*>(p.out) + b * p.out_sb + n * p.out_sn;
#pragma unroll
  for (int k = 0; k < P; ++k) {
    const int64_t c0 = static_cast<int64_t>(lane + 32 * k) * V;
    if (c0 >= C) continue;
    float sc[V], sh[V], o[V];
    dev::load_pack<DT>(scale + c0, sc);
    if (shift) dev::load_pack<DT>(shift + c0, sh);
    modulate_pack<V>(v + k * V, sc, sh, shift != nullptr, st, o);
    dev::store_pack<DT>(out + c0, o);
  }
  if (lane == 0 && p.mean) {  // (null: an inference call)
    p.mean[r] = st.x;
    p.rstd[r] = st.y;
  }
}

// (b, n) of row r, advanced row by row without a 64-bit division (tens of instructions on a GPU).
struct RowPos {
  int64_t b, n;
  __device__ __forceinline__ RowPos(int64_t r, int64_t N) : b(r / N), n(r - (r / N) * N) {}
  __device__ __forceinline__ void next(int64_t N) {
    if (++n == N) n = 0, ++b;
  }
};

// Streaming forward (16-byte rows, scale / shift per sample): a warp takes `rows` consecutive rows
// and loads the next row's x (raw packs) before the current row's statistics, so that it always has
// a row of loads in flight while it reduces and stores (the one-row kernel waits for its loads once
// a row with nothing else in flight). scale / shift are read in the output loop (fwd_row_per_sample):
// holding them in registers too would spill (176-254 registers at 40-64 items with them).
template <int DT, int ITEMS>
__global__ void __launch_bounds__(kRowWarps * 32, 2) modulate_fwd_stream_kernel(const ModulateParams p, int rows) {
  constexpr int P = ITEMS / dev::kPack<DT>;
  const int lane = threadIdx.x & 31;
  const int64_t total = p.B * p.N, C = p.C;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5)) * rows;
  if (first >= total) return;  // whole warps only
  const int64_t end = first + rows < total ? first + rows : total;
  const E<DT>* x = static_cast<const E<DT>*>(p.x);
  uint4 cur[P], nxt[P];
  RowPos at(first, p.N), ahead = at;  // the row reduced, the row loaded next
  load_row_raw<DT, P>(x + ahead.b * p.x_sb + ahead.n * p.x_sn, lane, C, cur);
  ahead.next(p.N);
  for (int64_t r = first; r < end; ++r) {
    if (r + 1 < end) {
      load_row_raw<DT, P>(x + ahead.b * p.x_sb + ahead.n * p.x_sn, lane, C, nxt);
      ahead.next(p.N);
    }
    fwd_row_per_sample<DT, ITEMS>(p, [&](int k) { return cur[k]; }, lane, r, at.b, at.n);
    at.next(p.N);
#pragma unroll
    for (int k = 0; k < P; ++k) cur[k] = nxt[k];
  }
}

// Asynchronous forward (16-byte rows, scale / shift per sample, 16-bit types; where the rows fill several
// waves of the streaming kernel, modulate.cu's fwd_async()):
// the streaming kernel's walk with x copied into shared memory by cp.async, kAsyncStages row slots
// a warp, so that kAsyncStages - 1 rows are in flight while the warp reduces and stores one (the
// streaming kernel has one row ahead, in registers). A lane reads back only the packs it copied
// itself, so its own wait_group orders the slots: no barrier. The slot a copy goes to was read by the
// same lane for the previous row (its values already consumed).
constexpr int kAsyncWarps = 4;   // warps a block (40 KiB of slots at 40 items: static shared memory)
constexpr int kAsyncStages = 4;  // row slots a warp

template <int DT, int ITEMS>
__global__ void __launch_bounds__(kAsyncWarps * 32, 4) modulate_fwd_async_kernel(const ModulateParams p, int rows) {
  constexpr int V = dev::kPack<DT>, P = ITEMS / V;
  __shared__ uint4 ring[kAsyncWarps][kAsyncStages][P][32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t total = p.B * p.N, C = p.C;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kAsyncWarps + w) * rows;
  if (first >= total) return;  // whole warps only
  const int64_t count = (first + rows < total ? first + rows : total) - first;
  const E<DT>* x = static_cast<const E<DT>*>(p.x);
  RowPos at(first, p.N), ahead = at;  // the row reduced, the row copied next
  auto copy_next = [&](int64_t i) {  // row first + i into slot i % kAsyncStages
    const E<DT>* row = x + ahead.b * p.x_sb + ahead.n * p.x_sn;
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t c0 = static_cast<int64_t>(lane + 32 * k) * V;
      if (c0 < C) dev::cp_async16(&ring[w][i % kAsyncStages][k][lane], row + c0);
    }
    ahead.next(p.N);
  };
#pragma unroll
  for (int s = 0; s < kAsyncStages - 1; ++s) {
    if (s < count) copy_next(s);
    dev::cp_async_commit();  // empty groups too: the wait below counts groups
  }
  for (int64_t i = 0; i < count; ++i) {
    if (i + kAsyncStages - 1 < count) copy_next(i + kAsyncStages - 1);
    dev::cp_async_commit();
    dev::cp_async_wait<kAsyncStages - 1>();  // row i's group has landed
    const int slot = static_cast<int>(i % kAsyncStages);
    fwd_row_per_sample<DT, ITEMS>(p, [&](int k) { return ring[w][slot][k][lane]; }, lane, first + i, at.b, at.n);
    at.next(p.N);
  }
}

// One row of the backward by one warp: writes dx (when wanted) and per-token dscale / dshift;
// per sample (acc != nullptr) adds g * xhat to acc[slot] and g to acc[nslot + slot].
//   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = g * (1 + scale)
// How the backward's row function gets a row's g and x (same arithmetic, same order, same bits in
// every mode): loaded pack by pack where used; all the row's loads first (PRELOAD below); or given
// by the caller as raw 16-byte packs it loaded a row ahead (the streaming chunk walk).
constexpr int kLoadInLoop = 0, kLoadRowFirst = 1, kLoadGiven = 2;

template <int DT, bool VEC, int ITEMS, int LOAD>
__device__ __forceinline__ void modulate_bwd_warp_row(const ModulateBwdParams& p, int64_t b, int64_t n, int lane,
                                                      float* acc, int64_t nslot, const uint4* graw = nullptr,
                                                      const uint4* xraw = nullptr) {
  static_assert(LOAD != kLoadGiven || VEC, "given rows are raw 16-byte packs");
  constexpr bool PRELOAD = LOAD != kLoadInLoop;  // the row's g and x are in dxh / xh before the math
  constexpr int V = kLaneVec<DT, VEC>;
  const int64_t C = p.C, r = b * p.N + n;
  const E<DT>* g = static_cast<const E<DT>*>(p.grad) + b * p.g_sb + n * p.g_sn;
  const E<DT>* x = static_cast<const E<DT>*>(p.x) + b * p.x_sb + n * p.x_sn;
  const E<DT>* scale = static_cast<const E<DT>*>(p.scale) + b * p.scale_sb + n * p.scale_sn;
  const float mean = p.mean[r], rstd = p.rstd[r];
  const bool token_sums = !p.per_sample && (p.dscale || p.dshift);
  // PRELOAD: first every load of the row's g and x (raw values parked in dxh / xh), so that they are in
  // flight together. Interleaved with the accumulator stores below, the compiler keeps them in program
  // order (it cannot tell the shared-memory stores from the global loads): one DRAM round trip per
  // pack (sm_90 SASS: the LDG.128 of pack k + 1 after the STS of pack k). Same arithmetic, same order,
  // same bits either way. The per-sample chunk kernel preloads (ITEMS <= 40); the per-token kernel does
  // not (122 -> 167 registers on sm_90 would halve its blocks per SM: to be measured on a GPU first).
  float xh[ITEMS], dxh[ITEMS];
  if constexpr (PRELOAD) {
#pragma unroll
    for (int k = 0; k < ITEMS / V; ++k) {
      const int64_t c0 = static_cast<int64_t>(lane + 32 * k) * V;
      float gv[V], xv[V];
      if (c0 < C) {
        if constexpr (LOAD == kLoadGiven) {
          dev::unpack_pack<DT>(graw[k], gv);
          dev::unpack_pack<DT>(xraw[k], xv);
        } else {
          load_v<DT, VEC>(g, c0, gv);
          load_v<DT, VEC>(x, c0, xv);
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        dxh[k * V + j] = c0 < C ? gv[j] : 0.f;
        xh[k * V + j] = c0 < C ? xv[j] : 0.f;
      }
    }
  }
  float a = 0.f, bs = 0.f;
#pragma unroll
  for (int k = 0; k < ITEMS / V; ++k) {
    const int64_t c0 = static_cast<int64_t>(lane + 32 * k) * V;
    if (c0 >= C) {
      if constexpr (!PRELOAD) {
#pragma unroll
        for (int j = 0; j < V; ++j) xh[k * V + j] = dxh[k * V + j] = 0.f;
      }
      continue;
    }
    float gv[V], xv[V], sc[V], gx[V];
    if constexpr (PRELOAD) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        gv[j] = dxh[k * V + j];
        xv[j] = xh[k * V + j];
      }
    } else {
      load_v<DT, VEC>(g, c0, gv);
      load_v<DT, VEC>(x, c0, xv);
    }
    load_v<DT, VEC>(scale, c0, sc);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int i = k * V + j;
      xh[i] = __fmul_rn(xv[j] - mean, rstd);
      dxh[i] = __fmul_rn(gv[j], 1.f + sc[j]);
      a += dxh[i];
      bs = fmaf(dxh[i], xh[i], bs);
      gx[j] = __fmul_rn(gv[j], xh[i]);
      if (acc) {
        const int64_t slot = static_cast<int64_t>(i) * 32 + lane;
        acc[slot] += gx[j];
        acc[nslot + slot] += gv[j];
      }
    }
    if (token_sums && p.dscale) store_v<DT, VEC>(static_cast<E<DT>*>(p.dscale) + r * C, c0, gx);
    if (token_sums && p.dshift) store_v<DT, VEC>(static_cast<E<DT>*>(p.dshift) + r * C, c0, gv);
  }
  if (!p.dx) return;  // uniform across the warp: no lane skips the shuffles below alone
  const float inv_c = __frcp_rn(static_cast<float>(C));
  const float ma = p.rms ? 0.f : dev::warp_sum(a) * inv_c;
  const float mb = dev::warp_sum(bs) * inv_c;
  E<DT>* dx = static_cast<E<DT>*>(p.dx) + b * p.dx_sb + n * p.dx_sn;
  const E<DT>* add = p.addend ? static_cast<const E<DT>*>(p.addend) + b * p.dx_sb + n * p.dx_sn : nullptr;
#pragma unroll
  for (int k = 0; k < ITEMS / V; ++k) {
    const int64_t c0 = static_cast<int64_t>(lane + 32 * k) * V;
    if (c0 >= C) continue;
    float o[V];
#pragma unroll
    for (int j = 0; j < V; ++j) o[j] = dev::modulate_dx(dxh[k * V + j], xh[k * V + j], ma, mb, rstd);
    if (add) {  // dx as stored plus the addend (__fadd_rn: never contracted into an FMA): a separate add's bits
      float av[V];
      load_v<DT, VEC>(add, c0, av);
#pragma unroll
      for (int j = 0; j < V; ++j) o[j] = __fadd_rn(dev::round_to<DT>(o[j]), av[j]);
    }
    store_v<DT, VEC>(dx, c0, o);
  }
}

// Per token: one warp per row, kRowWarps rows per block. (The explicit 1 block/SM in the launch
// bounds: without it ptxas 13.0 capped the bf16 16-item instance at 64 registers and spilled 8 bytes
// on sm_90; with it, 69 registers and no spill.)
template <int DT, bool VEC, int ITEMS>
__global__ void __launch_bounds__(kRowWarps * 32, 1) modulate_bwd_token_warp_kernel(const ModulateBwdParams p) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (r >= p.B * p.N) return;
  modulate_bwd_warp_row<DT, VEC, ITEMS, kLoadInLoop>(p, r / p.N, r % p.N, threadIdx.x & 31, nullptr, 0);
}

// Slots per accumulator: the lane-owned columns rounded up to whole (k) steps of 32 * V.
template <int DT, bool VEC>
__host__ __device__ __forceinline__ int64_t chunk_slots(int64_t C) {
  constexpr int64_t step = 32 * kLaneVec<DT, VEC>;
  return (C + step - 1) / step * step;
}
// Dynamic shared memory of the per-sample chunk kernel for rows C wide (its warps' two accumulators).
template <int DT, bool VEC>
inline size_t chunk_smem(int64_t C) {
  return sizeof(float) * kChunkWarps * 2 * static_cast<size_t>(chunk_slots<DT, VEC>(C));
}

// Per sample: grid = (nchunks, B); dynamic shared memory kChunkWarps * 2 * nslot floats.
// LOAD == kLoadGiven (16-byte rows): the warp walks its rows a row ahead, loading row n + 1's g and x
// (raw packs) before row n's math, so that a row of loads is in flight while it computes (at 256
// tokens a DiT-XL/2 backward has ~2 blocks an SM: few warps, each waiting for its row). 205
// registers at 40 items (2 blocks an SM, against 3 for the row-at-a-time preload); capped at 168 for 3
// blocks it spilled ~100 bytes (nvcc 13.0, sm_80 / sm_90).
template <int DT, bool VEC, int ITEMS, int LOAD>
__global__ void __launch_bounds__(kChunkWarps * 32) modulate_bwd_chunk_warp_kernel(const ModulateBwdParams p) {
  constexpr int V = kLaneVec<DT, VEC>;
  GENFAST_DYN_SHARED(float, acc_all);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t nslot = chunk_slots<DT, VEC>(p.C);
  const bool sums = p.partial && (p.dscale || p.dshift);
  float* acc = sums ? acc_all + warp * 2 * nslot : nullptr;
  if (acc) {  // each lane zeroes (and later adds to) only its own slots: no barrier needed
    for (int64_t s = lane; s < 2 * nslot; s += 32) acc[s] = 0.f;
  }
  const int64_t k = blockIdx.x, b = blockIdx.y, nchunks = gridDim.x;
  const int64_t n0 = k * p.chunk_rows, n1 = n0 + p.chunk_rows < p.N ? n0 + p.chunk_rows : p.N;
  const int64_t per_warp = (p.chunk_rows + kChunkWarps - 1) / kChunkWarps;
  const int64_t w0 = n0 + warp * per_warp, w1 = w0 + per_warp < n1 ? w0 + per_warp : n1;
  if constexpr (LOAD == kLoadGiven) {
    constexpr int P = ITEMS / V;
    uint4 g_cur[P], x_cur[P], g_nxt[P], x_nxt[P];
    auto load_row = [&](int64_t n, uint4 (&gr)[P], uint4 (&xr)[P]) {
      load_row_raw<DT, P>(static_cast<const E<DT>*>(p.grad) + b * p.g_sb + n * p.g_sn, lane, p.C, gr);
      load_row_raw<DT, P>(static_cast<const E<DT>*>(p.x) + b * p.x_sb + n * p.x_sn, lane, p.C, xr);
    };
    if (w0 < w1) load_row(w0, g_cur, x_cur);
    for (int64_t n = w0; n < w1; ++n) {
      if (n + 1 < w1) load_row(n + 1, g_nxt, x_nxt);
      modulate_bwd_warp_row<DT, VEC, ITEMS, LOAD>(p, b, n, lane, acc, nslot, g_cur, x_cur);
#pragma unroll
      for (int kk = 0; kk < P; ++kk) {
        g_cur[kk] = g_nxt[kk];
        x_cur[kk] = x_nxt[kk];
      }
    }
  } else {
    for (int64_t n = w0; n < w1; ++n) modulate_bwd_warp_row<DT, VEC, ITEMS, LOAD>(p, b, n, lane, acc, nslot);
  }
  if (!sums) return;
  __syncthreads();
  float* part = p.partial + (b * nchunks + k) * 2 * p.C;
  for (int64_t s = threadIdx.x; s < nslot; s += kChunkWarps * 32) {
    // slot s = (kk * V + j) * 32 + l  <->  column (l + 32 kk) * V + j
    const int64_t l = s % 32, i = s / 32, kk = i / V, j = i % V;
    const int64_t c = (l + 32 * kk) * V + j;
    if (c >= p.C) continue;
    float ssc = acc_all[s], ssh = acc_all[nslot + s];
    for (int w = 1; w < kChunkWarps; ++w) {  // fixed order: warp 0, 1, 2, ...
      ssc += acc_all[w * 2 * nslot + s];
      ssh += acc_all[w * 2 * nslot + nslot + s];
    }
    part[c] = ssc;
    part[p.C + c] = ssh;
  }
}
