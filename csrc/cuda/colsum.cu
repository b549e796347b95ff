// Column sums of up to three [M, width_i] tensors in one pass (math and layout: csrc/gelu.h):
// the bias gradients of a fused qkv projection, whose q, k and v gradients arrive as three tensors
// (genfast/ops/dit_block.py). One launch reads all three at 16-byte packs where they allow; torch's
// sum(0) was three launches at ~1 TB/s over [8192, 1152] (H200, benchmarks/gpu/NOTES.md).
//  - grid (chunks, column blocks of all tensors): a block's columns lie in one tensor; each thread
//    walks its chunk's chunk_rows rows in order for its columns (kRows rows' loads issued together)
//    and writes fp32 sums to partial[chunk, offset + column];
//  - then the same two-level in-order sum as csrc/cuda/gelu.cu (groups of chunk_group chunks, the
//    chunks past M write zeros, then the groups), rounded to the dtype once: deterministic, the same
//    bits as the Triton kernels.
// Checked without a GPU (DESIGN.md §8): python -m genfast.devtools.gpu_compile --csrc csrc, and run
// through the emulation by tests/test_colsum.py. Not yet run on a GPU.
#include "cuda/common.cuh"

#include "gelu.h"

namespace genfast {
namespace {

constexpr int kThreads = 64;  // V columns a thread (C = 1152 bf16: 3 blocks a tensor a chunk)
constexpr int kRows = 4;      // rows whose loads are in flight together

template <int DT>
using E = dev::elem_t<DT>;

template <int DT, bool VEC>
__device__ __forceinline__ void load_row(const E<DT>* p, float (&v)[VEC ? dev::kPack<DT> : 1]) {
  if constexpr (VEC) dev::load_pack<DT>(p, v);
  else v[0] = dev::load_elem<DT>(p, 0);
}

template <int DT, bool VEC>
__global__ void __launch_bounds__(kThreads) colsum_kernel(const ColumnSumsParams p, int64_t total) {
  constexpr int V = VEC ? dev::kPack<DT> : 1;
  constexpr int64_t kPerBlock = int64_t{kThreads} * V;
  const int64_t k = blockIdx.x;
  // Which tensor this block's columns lie in. Constant indices only: a runtime index into the
  // parameter arrays made nvcc copy them to local memory and use generic (not global) loads.
  const int64_t nb0 = (p.width[0] + kPerBlock - 1) / kPerBlock, nb1 = (p.width[1] + kPerBlock - 1) / kPerBlock;
  int64_t y = blockIdx.y, off = 0, w = p.width[0];
  const void* base = p.src[0];
  if (p.n > 1 && y >= nb0) {
    y -= nb0, off = p.width[0], w = p.width[1], base = p.src[1];
    if (p.n > 2 && y >= nb1) y -= nb1, off += p.width[1], w = p.width[2], base = p.src[2];
  }
  const int64_t c = y * kPerBlock + static_cast<int64_t>(threadIdx.x) * V;
  if (c >= w) return;
  const E<DT>* src = static_cast<const E<DT>*>(base) + c;
  const int64_t m0 = k * p.chunk_rows, m1 = m0 + p.chunk_rows < p.M ? m0 + p.chunk_rows : p.M;
  float acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.f;
  int64_t m = m0;
  for (; m + kRows <= m1; m += kRows) {
    float v[kRows][V];
#pragma unroll
    for (int u = 0; u < kRows; ++u) load_row<DT, VEC>(src + (m + u) * w, v[u]);
#pragma unroll
    for (int u = 0; u < kRows; ++u)
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += v[u][j];  // rows in order per column
  }
  for (; m < m1; ++m) {
    float v[V];
    load_row<DT, VEC>(src + m * w, v);
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] += v[j];
  }
  float* part = p.partial + k * total + off + c;
#pragma unroll
  for (int j = 0; j < V; ++j) part[j] = acc[j];
}

template <int DT>
int column_sums_typed(const ColumnSumsParams& p, void* stream) {
  bool vec = true;
  int64_t total = 0;
  for (int t = 0; t < p.n; ++t) {
    vec = vec && dev::vec_ok<DT>(p.width[t], {p.src[t]}, {});
    total += p.width[t];
  }
  const int64_t per_block = int64_t{kThreads} * (vec ? dev::kPack<DT> : 1);
  int64_t blocks = 0;
  for (int t = 0; t < p.n; ++t) blocks += (p.width[t] + per_block - 1) / per_block;
  const int64_t ngroups = ((p.M + p.chunk_rows - 1) / p.chunk_rows + p.chunk_group - 1) / p.chunk_group;
  const int64_t nchunks = ngroups * p.chunk_group;  // the chunks past M write zero sums
  if (nchunks > 0x7fffffff || blocks > 65535) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>(nchunks), static_cast<unsigned>(blocks));
  if (vec) {
    auto kern = &colsum_kernel<DT, true>;
    GENFAST_LAUNCH(kern, grid, kThreads, 0, stream, p, total);
  } else {
    auto kern = &colsum_kernel<DT, false>;
    GENFAST_LAUNCH(kern, grid, kThreads, 0, stream, p, total);
  }
  if (const int e = static_cast<int>(cudaGetLastError())) return e;
  return dev::reduce_groups<DT>(p.out, p.partial, ngroups, p.chunk_group, total, stream);
}
template <int DT> struct Run { static int run(const ColumnSumsParams& p, void* s) { return column_sums_typed<DT>(p, s); } };

}  // namespace

int column_sums_cuda(const ColumnSumsParams& p, void* stream) {
  if (p.n < 1 || p.n > 3 || p.chunk_rows < 1 || p.chunk_group < 1) return static_cast<int>(cudaErrorInvalidValue);
  if (p.M <= 0) return 0;  // the caller fills the empty case
  return dev::by_dtype<Run>(p, stream);
}

}  // namespace genfast
