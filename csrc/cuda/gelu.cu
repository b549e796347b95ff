// GELU(tanh) backward fused with the bias gradient on the GPU (math and layout: csrc/gelu.h).
//
// In a DiT MLP backward dh = da * gelu'(h) and then db1 = dh.sum(0) would read the whole [M, K]
// dh again; here one pass writes dh and the column sums of its rounded values:
//  - grid (nchunks, column blocks): each thread walks its chunk's chunk_rows rows for its columns
//    (rows in order, so the fp32 sums are the same on every launch), writes dh and adds the dh
//    value as stored (rounded to the dtype) to its fp32 accumulators, then its partial row.
//  - 16-byte path (vec_ok: K a multiple of the pack, pointers 16-byte aligned): a pack of V columns
//    a thread, kRows rows' loads issued before the first store (as gated_bwd_pack_kernel);
//    otherwise one column a thread. Both paths give the same bits.
//  - dev::reduce_groups adds the chunks in groups of chunk_group (fp32; launched chunks past M write
//    zeros), then the groups, into dbias.
// dh = grad * gelu'(h) is an explicit __fmul_rn: nvcc may not contract it into the accumulation
// (that would sum unrounded products in fp32), so the sums are of the stored values in every dtype.
//
// Checked without a GPU (DESIGN.md §8): python -m genfast.devtools.gpu_compile --csrc csrc (nvcc 13.0,
// sm_80 and sm_90: element kernel 26-30 registers, pack kernel 56, reduce_partials 26-30; no spills,
// no stack frame), and run through the emulation by tests/test_gelu_bias.py. Not yet run on a GPU.
#include "cuda/common.cuh"

#include "gelu.h"

namespace genfast {
namespace {

constexpr float kAlpha = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kBeta = 0.044715f;
constexpr int kThreads = 128;     // element kernel: one column a thread
constexpr int kPackThreads = 64;  // pack kernel: V columns a thread (K = 4608 bf16: 9 blocks a chunk)
constexpr int kRows = 4;          // pack kernel: rows whose loads are in flight together

template <int DT>
using E = dev::elem_t<DT>;

// gelu'(x) in fp32. tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|) <= 1: never overflows
// (as csrc/cpu/gelu.cpp); 1 + e lies in [1, 2], where __fdividef is accurate.
__device__ __forceinline__ float gelu_grad(float x) {
  const float u = kAlpha * (x + kBeta * x * x * x);
  const float e = expf(-2.0f * fabsf(u));
  const float a = __fdividef(1.0f - e, 1.0f + e);
  const float t = u < 0.0f ? -a : a;
  return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kAlpha * (1.0f + 3.0f * kBeta * x * x);
}

using dev::round_to;  // v as the dtype will store it, back in fp32

__device__ __forceinline__ int64_t chunk_end(const GeluBiasBwdParams& p, int64_t m0) {
  return m0 + p.chunk_rows < p.M ? m0 + p.chunk_rows : p.M;
}

template <int DT>
__global__ void __launch_bounds__(kThreads) gelu_bias_kernel(const GeluBiasBwdParams p) {
  const int64_t k = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (c >= p.K) return;
  const int64_t m0 = k * p.chunk_rows, m1 = chunk_end(p, m0);
  float acc = 0.f;
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t i = m * p.K + c;
    const float v = round_to<DT>(__fmul_rn(dev::load_elem<DT>(p.grad, i), gelu_grad(dev::load_elem<DT>(p.h, i))));
    dev::store_elem<DT>(p.dh, i, v);  // exact: v is representable
    acc += v;
  }
  p.partial[k * p.K + c] = acc;
}

template <int DT>
__global__ void __launch_bounds__(kPackThreads) gelu_bias_pack_kernel(const GeluBiasBwdParams p) {
  constexpr int V = dev::kPack<DT>;
  const int64_t k = blockIdx.x;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * kPackThreads + threadIdx.x) * V;
  if (c >= p.K) return;
  const int64_t m0 = k * p.chunk_rows, m1 = chunk_end(p, m0);
  const E<DT>* grad = static_cast<const E<DT>*>(p.grad) + c;
  const E<DT>* h = static_cast<const E<DT>*>(p.h) + c;
  E<DT>* dh = static_cast<E<DT>*>(p.dh) + c;
  float acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.f;
  for (int64_t m = m0; m < m1; m += kRows) {
    uint4 gr[kRows], hr[kRows];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      if (m + u >= m1) continue;
      gr[u] = dev::load_pack_raw(grad + (m + u) * p.K);
      hr[u] = dev::load_pack_raw(h + (m + u) * p.K);
    }
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      if (m + u >= m1) continue;
      float gv[V], hv[V];
      dev::unpack_pack<DT>(gr[u], gv);
      dev::unpack_pack<DT>(hr[u], hv);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        gv[j] = round_to<DT>(__fmul_rn(gv[j], gelu_grad(hv[j])));
        acc[j] += gv[j];  // rows in order per column, as the element kernel: the same bits
      }
      dev::store_pack<DT>(dh + (m + u) * p.K, gv);  // exact: the values are representable
    }
  }
  float* part = p.partial + k * p.K + c;
#pragma unroll
  for (int j = 0; j < V; ++j) part[j] = acc[j];
}

template <int DT>
int gelu_bias_typed(const GeluBiasBwdParams& p, void* stream) {
  const int64_t ngroups = ((p.M + p.chunk_rows - 1) / p.chunk_rows + p.chunk_group - 1) / p.chunk_group;
  const int64_t nchunks = ngroups * p.chunk_group;  // the chunks past M write zero sums
  // Chunks on grid.x (up to 2^31 - 1); column blocks on grid.y (<= 65535: K up to 4M elements).
  const bool vec = dev::vec_ok<DT>(p.K, {p.dh, p.grad, p.h}, {});
  const int64_t per_block = vec ? int64_t{kPackThreads} * dev::kPack<DT> : kThreads;
  const int64_t col_blocks = (p.K + per_block - 1) / per_block;
  if (nchunks > 0x7fffffff || col_blocks > 65535) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>(nchunks), static_cast<unsigned>(col_blocks));
  if (vec) {
    auto kern = &gelu_bias_pack_kernel<DT>;
    GENFAST_LAUNCH(kern, grid, kPackThreads, 0, stream, p);
  } else {
    auto kern = &gelu_bias_kernel<DT>;
    GENFAST_LAUNCH(kern, grid, kThreads, 0, stream, p);
  }
  const int err = static_cast<int>(cudaGetLastError());
  if (err) return err;
  return dev::reduce_groups<DT>(p.dbias, p.partial, ngroups, p.chunk_group, p.K, stream);
}
template <int DT> struct Run { static int run(const GeluBiasBwdParams& p, void* s) { return gelu_bias_typed<DT>(p, s); } };

}  // namespace

int gelu_tanh_backward_bias_cuda(const GeluBiasBwdParams& p, void* stream) {
  if (p.M <= 0 || p.K <= 0) return 0;  // the caller fills empty outputs
  if (p.chunk_rows < 1 || p.chunk_group < 1) return static_cast<int>(cudaErrorInvalidValue);
  return dev::by_dtype<Run>(p, stream);
}

}  // namespace genfast
