// adaLN modulate and gated residual on the GPU, forward and fused backward (math and layout:
// csrc/modulate.h).
//
//  - modulate forward: one block (128 threads) per row; a row of C <= kThreads * kItems (1536)
//    elements is held in registers between the two block reductions (mean, then
//    mean((x - mean)^2)) and the modulated store, so x is read from memory once; wider rows
//    re-read x (from L1/L2) in each pass.
//  - modulate backward: per token, one block per row; per sample, one block per (row chunk,
//    sample) that walks its rows, keeps each thread's column sums of g * xhat and g in registers
//    and writes them as one fp32 partial row (rows wider than 1536: accumulated in that partial
//    row in global memory, which only this block touches); a second kernel adds the chunks in order. Fixed
//    chunking, no atomics: the same bits on every run.
//  - gated residual: a grid-stride elementwise kernel; its backward sums g * y per (row chunk,
//    sample, column) the same deterministic way.
// Loads are element-wise and coalesced (consecutive threads, consecutive channels); 16-byte
// packs (dev::load_pack) are a GPU-measured refinement still to do.
//
// Checked without a GPU (DESIGN.md §8):
//   nvcc -std=c++17 -arch=sm_80|sm_90 --resource-usage -Icsrc -c csrc/cuda/modulate.cu -o /tmp/m.o
//     (nvcc 13.0: no spills, no stack frame; forward 30-52 registers, backward 107-126, the
//     others 26-56. IEEE divides and 1/sqrtf are subroutine calls that spilled on sm_80, hence
//     __frcp_rn / __fsqrt_rn and multiplies by 1/C.)
//   g++ -x c++ -std=c++17 -DGENFAST_EMULATE -fno-strict-aliasing -pthread -Icsrc -c csrc/cuda/modulate.cu
#include "cuda/common.cuh"

#include "modulate.h"

namespace genfast {
namespace {

constexpr int kThreads = 128;  // per row: 4 warps; C = 1152 is 9 elements a thread
constexpr int kItems = 12;     // register-cached elements per thread (C <= 1536)
constexpr int kColBlock = 128;  // columns per block in the column-sum kernels

template <int DT>
using E = dev::elem_t<DT>;

// -------------------------------------------------------------------------------------- forward
template <int DT, int ITEMS>
__global__ void __launch_bounds__(kThreads) modulate_fwd_kernel(const ModulateParams p) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const int64_t b = r / p.N, n = r % p.N;
  const int tid = threadIdx.x;
  const int64_t C = p.C;
  const E<DT>* x = static_cast<const E<DT>*>(p.x) + b * p.x_sb + n * p.x_sn;
  const E<DT>* scale = static_cast<const E<DT>*>(p.scale) + b * p.scale_sb + n * p.scale_sn;
  const E<DT>* shift = p.shift ? static_cast<const E<DT>*>(p.shift) + b * p.shift_sb + n * p.shift_sn : nullptr;
  E<DT>* out = static_cast<E<DT>*>(p.out) + b * p.out_sb + n * p.out_sn;

  float v[ITEMS > 0 ? ITEMS : 1];
  float s = 0.f;
  if constexpr (ITEMS > 0) {
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t c = tid + static_cast<int64_t>(k) * kThreads;
      v[k] = c < C ? dev::load_elem<DT>(x, c) : 0.f;
      s += v[k];
    }
  } else {
    for (int64_t c = tid; c < C; c += kThreads) s += dev::load_elem<DT>(x, c);
  }
  const float inv_c = __frcp_rn(static_cast<float>(C));  // multiply, not divide: no div subroutine
  const float mean = p.rms ? 0.f : dev::block_sum(s, scratch) * inv_c;
  float q = 0.f;  // mean((x - mean)^2), never E[x^2] - mean^2
  if constexpr (ITEMS > 0) {
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t c = tid + static_cast<int64_t>(k) * kThreads;
      const float d = v[k] - mean;
      q += c < C ? d * d : 0.f;
    }
  } else {
    for (int64_t c = tid; c < C; c += kThreads) {
      const float d = dev::load_elem<DT>(x, c) - mean;
      q += d * d;
    }
  }
  // Correctly rounded sqrt and reciprocal as inline instructions (the IEEE 1/sqrtf path is a
  // subroutine call that cost a stack frame and a spill on sm_80); same values as the C++ kernel.
  const float rstd = __frcp_rn(__fsqrt_rn(dev::block_sum(q, scratch) * inv_c + p.eps));
  if constexpr (ITEMS > 0) {
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t c = tid + static_cast<int64_t>(k) * kThreads;
      if (c < C) {
        const float o = (v[k] - mean) * rstd * (1.f + dev::load_elem<DT>(scale, c));
        dev::store_elem<DT>(out, c, shift ? o + dev::load_elem<DT>(shift, c) : o);
      }
    }
  } else {
    for (int64_t c = tid; c < C; c += kThreads) {
      const float o = (dev::load_elem<DT>(x, c) - mean) * rstd * (1.f + dev::load_elem<DT>(scale, c));
      dev::store_elem<DT>(out, c, shift ? o + dev::load_elem<DT>(shift, c) : o);
    }
  }
  if (tid == 0) {
    p.mean[r] = mean;
    p.rstd[r] = rstd;
  }
}

// ------------------------------------------------------------------------------------- backward
// One row of the backward, for the columns c = tid + k * kThreads: returns nothing, writes dx
// (when wanted) and per-token dscale, and adds g * xhat and g to acc_scale / acc_shift.
//   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = g * (1 + scale)
template <int DT, int ITEMS>
__device__ __forceinline__ void modulate_bwd_row(const ModulateBwdParams& p, int64_t b, int64_t n, float* scratch,
                                                 float (&acc_scale)[ITEMS], float (&acc_shift)[ITEMS]) {
  const int tid = threadIdx.x;
  const int64_t C = p.C, r = b * p.N + n;
  const E<DT>* g = static_cast<const E<DT>*>(p.grad) + b * p.g_sb + n * p.g_sn;
  const E<DT>* x = static_cast<const E<DT>*>(p.x) + b * p.x_sb + n * p.x_sn;
  const E<DT>* scale = static_cast<const E<DT>*>(p.scale) + b * p.scale_sb + n * p.scale_sn;
  const float mean = p.mean[r], rstd = p.rstd[r];
  float gv[ITEMS], xh[ITEMS], dxh[ITEMS];
  float a = 0.f, bs = 0.f;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t c = tid + static_cast<int64_t>(k) * kThreads;
    const bool ok = c < C;
    gv[k] = ok ? dev::load_elem<DT>(g, c) : 0.f;
    xh[k] = ok ? (dev::load_elem<DT>(x, c) - mean) * rstd : 0.f;
    dxh[k] = ok ? gv[k] * (1.f + dev::load_elem<DT>(scale, c)) : 0.f;
    a += dxh[k];
    bs += dxh[k] * xh[k];
    acc_scale[k] += gv[k] * xh[k];
    acc_shift[k] += gv[k];
  }
  if (!p.per_sample && p.dscale) {
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t c = tid + static_cast<int64_t>(k) * kThreads;
      if (c < C) dev::store_elem<DT>(p.dscale, r * C + c, gv[k] * xh[k]);
    }
  }
  if (!p.per_sample && p.dshift) {
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t c = tid + static_cast<int64_t>(k) * kThreads;
      if (c < C) dev::store_elem<DT>(p.dshift, r * C + c, gv[k]);
    }
  }
  if (!p.dx) return;  // uniform across the block: no thread skips the reductions below alone
  const float inv_c = __frcp_rn(static_cast<float>(C));
  const float ma = p.rms ? 0.f : dev::block_sum(a, scratch) * inv_c;
  const float mb = dev::block_sum(bs, scratch) * inv_c;
  E<DT>* dx = static_cast<E<DT>*>(p.dx) + b * p.dx_sb + n * p.dx_sn;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t c = tid + static_cast<int64_t>(k) * kThreads;
    if (c < C) dev::store_elem<DT>(dx, c, rstd * (dxh[k] - ma - xh[k] * mb));
  }
}

// The same for rows wider than kThreads * kItems: x, g and scale are re-read (from L1/L2) in a
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

// Per token: grid.x = rows. Per sample: grid = (nchunks, B), partial[b, chunk, {scale, shift}, C].
// ITEMS * kThreads >= C here (wider rows: modulate_bwd_wide_kernel).
template <int DT, int ITEMS>
__global__ void __launch_bounds__(kThreads) modulate_bwd_kernel(const ModulateBwdParams p) {
  __shared__ float scratch[32];
  float acc_scale[ITEMS] = {}, acc_shift[ITEMS] = {};
  if (!p.per_sample) {
    const int64_t r = blockIdx.x;
    modulate_bwd_row<DT, ITEMS>(p, r / p.N, r % p.N, scratch, acc_scale, acc_shift);
    return;
  }
  const int64_t k = blockIdx.x, b = blockIdx.y, nchunks = gridDim.x;
  const int64_t n0 = k * p.chunk_rows, n1 = n0 + p.chunk_rows < p.N ? n0 + p.chunk_rows : p.N;
  for (int64_t n = n0; n < n1; ++n) modulate_bwd_row<DT, ITEMS>(p, b, n, scratch, acc_scale, acc_shift);
  if (!p.dscale && !p.dshift) return;
  float* part = p.partial + (b * nchunks + k) * 2 * p.C;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(i) * kThreads;
    if (c < p.C) {
      part[c] = acc_scale[i];
      part[p.C + c] = acc_shift[i];
    }
  }
}

// out[b, c] = sum over chunks k, in order, of partial[(b * nchunks + k) * stride_k + c].
// grid = (ceil(C / kColBlock), B).
template <int DT>
__global__ void __launch_bounds__(kColBlock) reduce_partials_kernel(void* out, const float* partial, int64_t nchunks,
                                                                    int64_t stride_k, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColBlock + threadIdx.x, b = blockIdx.y;
  if (c >= C) return;
  const float* src = partial + b * nchunks * stride_k + c;
  float s = 0.f;
  for (int64_t k = 0; k < nchunks; ++k) s += src[k * stride_k];
  dev::store_elem<DT>(out, b * C + c, s);
}

// ------------------------------------------------------------------------------ gated residual
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
    if (p.per_sample) acc += g * y;
    else if (p.dgate) dev::store_elem<DT>(p.dgate, r * p.C + c, g * y);
  }
  if (p.per_sample && p.dgate) p.partial[(b * gridDim.y + k) * p.C + c] = acc;
}

// -------------------------------------------------------------------------------------- launches
int last_error() { return static_cast<int>(cudaGetLastError()); }

template <int DT>
int modulate_fwd(const ModulateParams& p, void* stream) {
  const dim3 grid(static_cast<unsigned>(p.B * p.N));
  if (p.C <= kThreads * kItems) {
    auto k = &modulate_fwd_kernel<DT, kItems>;
    GENFAST_LAUNCH(k, grid, kThreads, 0, stream, p);
  } else {
    auto k = &modulate_fwd_kernel<DT, 0>;
    GENFAST_LAUNCH(k, grid, kThreads, 0, stream, p);
  }
  return last_error();
}

template <int DT>
int reduce_partials(void* out, const float* partial, int64_t B, int64_t nchunks, int64_t stride_k, int64_t C,
                    void* stream) {
  const dim3 grid(static_cast<unsigned>((C + kColBlock - 1) / kColBlock), static_cast<unsigned>(B));
  auto k = &reduce_partials_kernel<DT>;
  GENFAST_LAUNCH(k, grid, kColBlock, 0, stream, out, partial, nchunks, stride_k, C);
  return last_error();
}

template <int DT>
int modulate_bwd(const ModulateBwdParams& p, void* stream) {
  const int64_t nchunks = p.per_sample ? (p.N + p.chunk_rows - 1) / p.chunk_rows : 0;
  if (p.per_sample && (nchunks > 65535 || p.B > 65535)) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid = p.per_sample ? dim3(static_cast<unsigned>(nchunks), static_cast<unsigned>(p.B))
                                 : dim3(static_cast<unsigned>(p.B * p.N));
  if (p.C <= kThreads * kItems) {
    auto k = &modulate_bwd_kernel<DT, kItems>;
    GENFAST_LAUNCH(k, grid, kThreads, 0, stream, p);
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

template <int DT>
int gated_fwd(const GatedResidualParams& p, void* stream) {
  const int64_t total = p.B * p.N * p.C;
  const int64_t blocks = (total + 255) / 256;
  auto k = &gated_fwd_kernel<DT>;
  GENFAST_LAUNCH(k, dim3(static_cast<unsigned>(blocks < 65536 ? blocks : 65536)), 256, 0, stream, p);
  return last_error();
}

template <int DT>
int gated_bwd(const GatedResidualBwdParams& p, void* stream) {
  // Per token the rows are cut the same way (any split is exact there); per sample the chunk
  // size is the caller's, so the partial sums do not depend on the device.
  const int64_t rows_per_block = p.per_sample ? p.chunk_rows : 32;
  const int64_t nchunks = (p.N + rows_per_block - 1) / rows_per_block;
  if (nchunks > 65535 || p.B > 65535) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>((p.C + kColBlock - 1) / kColBlock), static_cast<unsigned>(nchunks),
                  static_cast<unsigned>(p.B));
  auto k = &gated_bwd_kernel<DT>;
  GENFAST_LAUNCH(k, grid, kColBlock, 0, stream, p, rows_per_block);
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
