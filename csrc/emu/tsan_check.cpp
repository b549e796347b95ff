// ThreadSanitizer check of the CUDA emulation (DESIGN.md §8): with one OS thread per CUDA thread,
// a missing __syncthreads is a data race TSan reports. Run by tests/test_cuda_emu.py; by hand:
//   g++ -std=c++17 -O1 -g -fsanitize=thread -DGENFAST_EMULATE -fno-strict-aliasing -pthread -Icsrc
//       csrc/emu/tsan_check.cpp -x c++ csrc/cuda/flow_step.cu -o /tmp/tsan_check
//   /tmp/tsan_check correct     # block reductions with the barriers they need: no report
//   /tmp/tsan_check broken      # the same without the __syncthreads before the cross-warp read:
//                               # TSan reports a data race on the __shared__ partial sums
//   /tmp/tsan_check flow_step   # csrc/cuda/flow_step.cu under TSan: no report
// Each mode prints "<mode>: results ok|wrong" and exits 0 when its results are right (TSan's
// own exit code, 66 by default, replaces that when it reported something).
#include <cmath>
#include <cstring>
#include <vector>

#include "cuda/common.cuh"
#include "flow_step.h"

namespace {

// One partial sum per block: shuffles within each warp, then warp 0 combines the warps'
// results through __shared__ memory. Without the barrier, warp 0 may read a slot before the
// other warp's lane 0 wrote it.
template <bool kSync>
__global__ void block_reduce(const float* in, float* out, int n) {
  __shared__ float partial[32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  float v = 0.f;
  for (int i = blockIdx.x * blockDim.x + tid; i < n; i += gridDim.x * blockDim.x) v += in[i];
  v = genfast::dev::warp_sum(v);
  if (lane == 0) partial[warp] = v;
  if (kSync) __syncthreads();
  if (warp == 0) {
    v = genfast::dev::warp_sum(lane < nwarps ? partial[lane] : 0.f);
    if (lane == 0) out[blockIdx.x] = v;
  }
}

// The shared helper, called twice on the same scratch (its leading barrier makes that safe).
__global__ void block_sum_twice(const float* in, float* out, int n) {
  __shared__ float scratch[32];
  float v = 0.f;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v += in[i];
  const float s = genfast::dev::block_sum(v, scratch);
  const float m = genfast::dev::block_max(v, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = s + 0.0f * m;
}

bool run_reduce(bool sync) {
  const int n = 3000, blocks = 3, threads = 128;
  std::vector<float> in(n), out(blocks, -1.f), out2(blocks, -1.f);
  for (int i = 0; i < n; ++i) in[i] = static_cast<float>(i % 7) - 3.f;
  if (sync) {
    auto k = &block_reduce<true>;
    GENFAST_LAUNCH(k, blocks, threads, 0, nullptr, in.data(), out.data(), n);
  } else {
    auto k = &block_reduce<false>;
    GENFAST_LAUNCH(k, blocks, threads, 0, nullptr, in.data(), out.data(), n);
  }
  if (cudaGetLastError() != cudaSuccess) return false;
  if (!sync) return true;  // the broken kernel's numbers depend on the schedule
  GENFAST_LAUNCH(block_sum_twice, blocks, threads, 0, nullptr, in.data(), out2.data(), n);
  if (cudaGetLastError() != cudaSuccess) return false;
  for (int b = 0; b < blocks; ++b) {
    double want = 0;
    for (int i = b * threads; i < n; i += blocks * threads)
      for (int j = i; j < i + threads && j < n; ++j) want += in[j];
    if (std::fabs(out[b] - want) > 1e-3 || std::fabs(out2[b] - want) > 1e-3) return false;
  }
  return true;
}

bool run_flow_step() {
  // two rows of 515 in rows padded to 516: fast path plus a 3-element tail; 2 blocks of 256
  const int rows = 2, cols = 515, rs = 516, n = rows * rs;
  std::vector<float> x(n), v(2 * n), dt = {0.25f, 0.5f};
  for (int i = 0; i < n; ++i) x[i] = 0.001f * i;
  for (int i = 0; i < 2 * n; ++i) v[i] = std::sin(0.01f * i);
  const std::vector<float> x0 = x;
  genfast::FlowStepParams p;
  std::memset(&p, 0, sizeof p);
  p.out = x.data();  // in place
  p.x = x.data();
  p.vc = v.data();
  p.vu = v.data() + n;
  p.rows = rows;
  p.cols = cols;
  p.out_rs = p.x_rs = p.vc_rs = p.vu_rs = rs;
  p.out_cs = p.x_cs = p.vc_cs = p.vu_cs = 1;
  p.dt = dt.data();
  p.dt_stride = 1;
  p.w_value = 3.0f;
  p.dtype = genfast::kFloat32;
  if (genfast::flow_step_cuda(p, nullptr) != 0) return false;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < rs; ++c) {
      const int i = r * rs + c;
      const float want = c < cols ? x0[i] - dt[r] * (4.0f * v[i] - 3.0f * v[i + n]) : x0[i];
      if (std::fabs(x[i] - want) > 1e-5f * (1.0f + std::fabs(want))) return false;
    }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "correct";
  genfast_emu::set_runner(genfast_emu::Runner::kThreads);
  bool ok;
  if (!std::strcmp(mode, "correct")) ok = run_reduce(true);
  else if (!std::strcmp(mode, "broken")) ok = run_reduce(false);
  else if (!std::strcmp(mode, "flow_step")) ok = run_flow_step();
  else {
    fprintf(stderr, "usage: %s correct|broken|flow_step\n", argv[0]);
    return 2;
  }
  printf("%s: results %s\n", mode, ok ? "ok" : "wrong");
  return ok ? 0 : 1;
}
