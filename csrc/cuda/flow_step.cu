// The rectified-flow Euler / CFG step on the GPU (math and layout: csrc/flow_step.h).
//
//   out[r, c] = x[r, c] - dt_r * ((1 + w_r) * vc[r, c] - w_r * vu[r, c])   (or x - dt_r * vc)
//
// A pure streaming kernel (3 reads + 1 write per element), so it is all about bytes in flight:
//  - fast path: every column stride 1 and every row start 16-byte aligned -> one 16-byte load
//    per tensor per thread (4 fp32 or 8 fp16/bf16), a scalar tail for cols % pack;
//  - generic path: any strides, one element per thread;
//  - 2-D blocks (tx threads along a row, ty rows): rows of a few elements still fill the block;
//    grid-stride loops on both axes (rows may exceed 65535, grid.y is capped), int64 indices;
//    at most kWaves full waves of resident blocks (occupancy API), so blocks finish together;
//  - rows collapse into one long row when dt / w are one value and the tensors are uniformly
//    strided, so a [65536, 4] input runs as well as a [1, 262144] one.
// x may be out (in place): each thread loads all its inputs before it stores. Plain (coherent)
// loads for that reason, no __ldg / __restrict__.
//
// Checked without a GPU (DESIGN.md §8):
//   nvcc -std=c++17 -arch=sm_80 --resource-usage -c csrc/cuda/flow_step.cu -Icsrc -o /tmp/x.o
//   nvcc -std=c++17 -arch=sm_90 --resource-usage -c csrc/cuda/flow_step.cu -Icsrc -o /tmp/x.o
//     (measured with nvcc 13.0: no spills, no stack frame, 30-48 registers on sm_80 and 30-56 on
//     sm_90; the 16-byte path compiles to ld/st.global.v4)
//   g++ -x c++ -std=c++17 -DGENFAST_EMULATE -fno-strict-aliasing -O2 -Icsrc -c csrc/cuda/flow_step.cu -o /tmp/y.o
#include "cuda/common.cuh"

#include <atomic>

#include "flow_step.h"

namespace genfast {
namespace {

constexpr int kThreads = 256;
constexpr int kWaves = 4;  // grid = 4 full waves of resident blocks: equal work per block, no tail

template <int DT, bool GUIDED>
__device__ __forceinline__ void step_one(const FlowStepParams& p, void* out, const void* x, const void* vc,
                                         const void* vu, int64_t c, float dt, float w) {
  float v = dev::load_elem<DT>(vc, c * p.vc_cs);
  if (GUIDED) v = (1.0f + w) * v - w * dev::load_elem<DT>(vu, c * p.vu_cs);
  const float xv = dev::load_elem<DT>(x, c * p.x_cs);
  dev::store_elem<DT>(out, c * p.out_cs, xv - dt * v);
}

// VEC > 1: the fast path (unit column strides, aligned rows); nvec = ceil(cols / VEC).
// VEC == 1: the generic path; nvec = cols.
template <int DT, int VEC, bool GUIDED>
__global__ void __launch_bounds__(kThreads) flow_step_kernel(const FlowStepParams p, int64_t nvec) {
  using T = dev::elem_t<DT>;
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < p.rows; r += row_step) {
    if (col0 >= nvec) break;  // this thread has no column in any row
    const float dt = p.dt ? p.dt[r * p.dt_stride] : p.dt_value;
    const float w = GUIDED ? (p.w ? p.w[r * p.w_stride] : p.w_value) : 0.0f;
    T* out = static_cast<T*>(p.out) + r * p.out_rs;
    const T* x = static_cast<const T*>(p.x) + r * p.x_rs;
    const T* vc = static_cast<const T*>(p.vc) + r * p.vc_rs;
    const T* vu = GUIDED ? static_cast<const T*>(p.vu) + r * p.vu_rs : nullptr;
    for (int64_t v = col0; v < nvec; v += col_step) {
      if constexpr (VEC > 1) {
        const int64_t c = v * VEC;
        if (c + VEC <= p.cols) {
          float fx[VEC], fc[VEC], fu[VEC];
          dev::load_pack<DT>(x + c, fx);
          dev::load_pack<DT>(vc + c, fc);
          if (GUIDED) dev::load_pack<DT>(vu + c, fu);
          const float a = 1.0f + w;
#pragma unroll
          for (int i = 0; i < VEC; ++i) fx[i] -= dt * (GUIDED ? a * fc[i] - w * fu[i] : fc[i]);
          dev::store_pack<DT>(out + c, fx);
        } else {  // the row's last cols % VEC elements (unit strides here)
          for (int64_t j = c; j < c + VEC && j < p.cols; ++j) {
            float f = dev::load_elem<DT>(vc, j);
            if (GUIDED) f = (1.0f + w) * f - w * dev::load_elem<DT>(vu, j);
            dev::store_elem<DT>(out, j, dev::load_elem<DT>(x, j) - dt * f);
          }
        }
      } else {
        step_one<DT, GUIDED>(p, out, x, vc, vu, v, dt, w);
      }
    }
  }
}

// Blocks of `kernel` the whole device holds at once, times kWaves (dev::resident_blocks).
template <class Kernel>
int64_t grid_cap(Kernel kernel, std::atomic<int>* cache) {
  return dev::resident_blocks(kernel, kThreads, cache) * kWaves;
}

bool is_aligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <int DT, bool GUIDED>
int launch(FlowStepParams p, void* stream) {
  constexpr int VEC = dev::kPack<DT>;
  // One value of dt (and w) for every row and uniformly strided tensors: one long row.
  const bool per_row = (p.dt && p.dt_stride != 0) || (GUIDED && p.w && p.w_stride != 0);
  const bool flat = p.out_rs == p.cols * p.out_cs && p.x_rs == p.cols * p.x_cs && p.vc_rs == p.cols * p.vc_cs &&
                    (!GUIDED || p.vu_rs == p.cols * p.vu_cs);
  if (!per_row && flat && p.rows > 1) {
    p.cols *= p.rows;
    p.rows = 1;
  }
  auto row_ok = [&](const void* base, int64_t rs) { return is_aligned(base) && (p.rows == 1 || rs % VEC == 0); };
  const bool vec = p.out_cs == 1 && p.x_cs == 1 && p.vc_cs == 1 && (!GUIDED || p.vu_cs == 1) &&
                   row_ok(p.out, p.out_rs) && row_ok(p.x, p.x_rs) && row_ok(p.vc, p.vc_rs) &&
                   (!GUIDED || row_ok(p.vu, p.vu_rs));
  const int64_t nvec = vec ? (p.cols + VEC - 1) / VEC : p.cols;

  static std::atomic<int> cap_vec[64], cap_any[64];  // per instantiation: occupancy differs
  auto flow_step_kernel_fn = vec ? &flow_step_kernel<DT, VEC, GUIDED> : &flow_step_kernel<DT, 1, GUIDED>;
  const int64_t cap = grid_cap(flow_step_kernel_fn, vec ? cap_vec : cap_any);

  int tx = 1;  // threads along a row: a power of two covering the row, at most the whole block
  while (tx < kThreads && tx < nvec) tx *= 2;
  const int ty = kThreads / tx;
  int64_t gy = (p.rows + ty - 1) / ty;
  gy = gy < 65535 ? gy : 65535;
  gy = gy < cap ? gy : cap;
  int64_t gx = (nvec + tx - 1) / tx;
  const int64_t gx_cap = cap / gy > 1 ? cap / gy : 1;
  gx = gx < gx_cap ? gx : gx_cap;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), block(tx, ty);
  GENFAST_LAUNCH(flow_step_kernel_fn, grid, block, 0, stream, p, nvec);
  return static_cast<int>(cudaGetLastError());
}

template <int DT>
int dispatch_guided(const FlowStepParams& p, void* stream) {
  return p.vu ? launch<DT, true>(p, stream) : launch<DT, false>(p, stream);
}

}  // namespace

int flow_step_cuda(const FlowStepParams& p, void* stream) {
  if (p.rows < 0 || p.cols < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (p.rows == 0 || p.cols == 0) return 0;
  switch (p.dtype) {
    case kFloat32: return dispatch_guided<kFloat32>(p, stream);
    case kFloat16: return dispatch_guided<kFloat16>(p, stream);
    case kBFloat16: return dispatch_guided<kBFloat16>(p, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace genfast
