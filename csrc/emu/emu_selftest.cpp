// Self-test of the CUDA emulation (csrc/emu/cuda_emu.h), run by tests/test_cuda_emu.py under
// both runners. Kernels are written exactly as they would be for nvcc. Build and run by hand:
//   g++ -std=c++17 -O1 -DGENFAST_EMULATE -fno-strict-aliasing -pthread -Icsrc csrc/emu/emu_selftest.cpp
//       -x c++ csrc/cuda/flow_step.cu -o /tmp/emu_selftest && /tmp/emu_selftest [fibers] [fibers-ucontext] [threads]
// (flow_step.cu as a second translation unit also checks that the emulation's state links once.)
// Prints one line per check; exits 1 if any failed. The failure checks print the emulation's
// own "launch failed" messages on stderr: that is expected.
#include <stdlib.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "cuda/common.cuh"
#include "flow_step.h"

namespace {

int g_failures = 0;
void check(bool ok, const char* what) {
  printf("  %-58s %s\n", what, ok ? "ok" : "FAIL");
  if (!ok) ++g_failures;
}

// ---- shuffles -------------------------------------------------------------------------------------
__global__ void shuffles(int* out, float* fout, double* dout) {
  const int tid = threadIdx.x, lane = tid & 31;
  int* o = out + tid * 8;
  o[0] = __shfl_sync(0xffffffffu, tid * 10, 3);
  o[1] = __shfl_sync(0xffffffffu, tid, lane + 1, 8);
  o[2] = __shfl_xor_sync(0xffffffffu, tid, 5);
  o[3] = __shfl_up_sync(0xffffffffu, tid, 3, 16);
  o[4] = __shfl_down_sync(0xffffffffu, tid, 2, 8);
  int s = lane;
  for (int k = 16; k > 0; k >>= 1) s += __shfl_xor_sync(0xffffffffu, s, k);
  o[5] = s;
  o[6] = __shfl_xor_sync(0xffffffffu, tid, 16, 16);  // width 16: later group -> own value
  // two half-warps in disjoint collectives at once
  o[7] = (lane < 16) ? __shfl_xor_sync(0x0000ffffu, tid, 1) : __shfl_xor_sync(0xffff0000u, tid, 2);
  fout[tid] = __shfl_down_sync(0xffffffffu, 0.5f * tid, 1);
  dout[tid] = __shfl_sync(0xffffffffu, 1.0 / (tid + 1), 31);
}

void test_shuffles() {
  const int n = 64;
  std::vector<int> out(n * 8);
  std::vector<float> f(n);
  std::vector<double> d(n);
  GENFAST_LAUNCH(shuffles, 1, n, 0, nullptr, out.data(), f.data(), d.data());
  bool ok = cudaGetLastError() == cudaSuccess;
  for (int t = 0; t < n; ++t) {
    const int lane = t & 31, w = t - lane;
    const int* o = &out[t * 8];
    const int exp[8] = {(w + 3) * 10,
                        w + (lane & ~7) + ((lane + 1) & 7),
                        t ^ 5,
                        (lane & 15) >= 3 ? t - 3 : t,
                        (lane & 7) + 2 < 8 ? t + 2 : t,
                        496,
                        lane < 16 ? t : t - 16,
                        lane < 16 ? t ^ 1 : t ^ 2};
    for (int k = 0; k < 8; ++k) ok = ok && o[k] == exp[k];
    ok = ok && f[t] == 0.5f * (lane < 31 ? t + 1 : t) && d[t] == 1.0 / (w + 32);
  }
  check(ok, "shfl / shfl_up / shfl_down / shfl_xor (widths, half-warps)");
}

// ---- votes, partial warps, exited lanes --------------------------------------------------------
__global__ void votes(unsigned* out) {
  const int tid = threadIdx.x;  // 48 threads: warp 1 has 16 lanes
  unsigned* o = out + tid * 5;
  o[0] = __ballot_sync(0xffffffffu, tid % 3 == 0);
  o[1] = __any_sync(0xffffffffu, tid == 40);
  o[2] = __all_sync(0xffffffffu, tid < 47);
  o[3] = __activemask();
  __syncwarp();
  if ((tid & 31) >= 8) return;  // lanes 8.. leave; lane+8 no longer exists
  o[4] = static_cast<unsigned>(__shfl_down_sync(0xffffffffu, tid, 8));
}

void test_votes() {
  std::vector<unsigned> out(48 * 5, 12345u);
  GENFAST_LAUNCH(votes, 1, 48, 0, nullptr, out.data());
  bool ok = cudaGetLastError() == cudaSuccess;
  unsigned b0 = 0, b1 = 0;
  for (int l = 0; l < 32; ++l) b0 |= (l % 3 == 0 ? 1u : 0u) << l;
  for (int l = 0; l < 16; ++l) b1 |= ((32 + l) % 3 == 0 ? 1u : 0u) << l;
  for (int t = 0; t < 48; ++t) {
    const unsigned* o = &out[t * 5];
    const bool w1 = t >= 32;
    ok = ok && o[0] == (w1 ? b1 : b0) && o[1] == (w1 ? 1u : 0u) && o[2] == (w1 ? 0u : 1u) &&
         o[3] == (w1 ? 0xffffu : 0xffffffffu);
    if ((t & 31) < 8) ok = ok && o[4] == 0xffffffffu;  // read from an exited lane: poison
  }
  check(ok, "ballot / any / all / activemask, partial warp, poison");
}

// ---- early exits and barriers -------------------------------------------------------------------
__global__ void early_exit(int* out) {
  __shared__ int count;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) count = 0;
  __syncthreads();
  if (warp == 2) return;        // a whole warp leaves
  if (tid % 3 == 1) return;     // and a third of the others
  atomicAdd(&count, 1);
  __syncthreads();              // the rest still meet
  const unsigned m = __activemask();
  int s = lane;
  for (int k = 16; k > 0; k >>= 1) {
    const int v = __shfl_xor_sync(m, s, k);
    if ((m >> (lane ^ k)) & 1u) s += v;  // only partners that are still here
  }
  const int n = __syncthreads_count(1);
  const int any_big = __syncthreads_or(tid > 90);
  const int all_small = __syncthreads_and(tid < 90);
  if (tid == 0) {
    out[blockIdx.x * 6 + 0] = count;
    out[blockIdx.x * 6 + 1] = n;
    out[blockIdx.x * 6 + 2] = any_big;
    out[blockIdx.x * 6 + 3] = all_small;
  }
  if (lane == 0 && warp < 2) out[blockIdx.x * 6 + 4 + warp] = s;
}

void test_early_exit() {
  std::vector<int> out(3 * 6, -7);
  GENFAST_LAUNCH(early_exit, 3, 128, 0, nullptr, out.data());
  bool ok = cudaGetLastError() == cudaSuccess;
  int stay = 0, sums[2];
  bool big = false, small = true;
  for (int t = 0; t < 128; ++t) {
    if ((t >> 5) == 2 || t % 3 == 1) continue;
    ++stay;
    big |= t > 90;
    small &= t < 90;
  }
  for (int w = 0; w < 2; ++w) {  // the same butterfly on the host, skipping absent partners
    int s[32];
    bool here[32];
    for (int l = 0; l < 32; ++l) here[l] = (32 * w + l) % 3 != 1, s[l] = l;
    for (int k = 16; k > 0; k >>= 1) {
      int nxt[32];
      for (int l = 0; l < 32; ++l) nxt[l] = s[l] + (here[l ^ k] ? s[l ^ k] : 0);
      for (int l = 0; l < 32; ++l) s[l] = nxt[l];
    }
    sums[w] = s[0];
  }
  const int s0 = sums[0], s1 = sums[1];
  for (int b = 0; b < 3; ++b)
    ok = ok && out[b * 6] == stay && out[b * 6 + 1] == stay && out[b * 6 + 2] == big && out[b * 6 + 3] == small &&
         out[b * 6 + 4] == s0 && out[b * 6 + 5] == s1;
  check(ok, "early returns leave __syncthreads and warp collectives");
}

// ---- dynamic shared memory + block_sum on 2-D blocks -----------------------------------------------
__global__ void dyn_smem(float* out, unsigned* poison, int n) {
  GENFAST_DYN_SHARED(float, buf);
  __shared__ float scratch[32];
  const int tid = threadIdx.x + blockDim.x * threadIdx.y, nt = blockDim.x * blockDim.y;
  const bool fresh = __float_as_uint(buf[tid]) == 0xffffffffu;  // before anyone writes
  __syncthreads();
  for (int i = tid; i < n; i += nt) buf[i] = static_cast<float>(i + blockIdx.x + blockIdx.y);
  __syncthreads();
  float s = 0.f, m = -1.f;
  for (int i = tid; i < n; i += nt) {
    s += buf[n - 1 - i];
    m = fmaxf(m, buf[n - 1 - i]);
  }
  s = genfast::dev::block_sum(s, scratch);
  m = genfast::dev::block_max(m, scratch);
  const int all_fresh = __syncthreads_and(fresh);
  if (tid == nt - 1) {  // every thread holds the result
    out[2 * (blockIdx.y * gridDim.x + blockIdx.x)] = s;
    out[2 * (blockIdx.y * gridDim.x + blockIdx.x) + 1] = m;
    poison[blockIdx.y * gridDim.x + blockIdx.x] = all_fresh;
  }
}

void test_dyn_smem() {
  const int n = 16384;  // 64 KiB: needs the opt-in
  std::vector<float> out(12);
  std::vector<unsigned> poison(6);
  const dim3 grid(3, 2), block(32, 4);
  static bool opted_in = false;  // the opt-in is per kernel and stays, as on the GPU
  if (!opted_in) {
    GENFAST_LAUNCH(dyn_smem, grid, block, n * sizeof(float), nullptr, out.data(), poison.data(), n);
    check(cudaGetLastError() == cudaErrorInvalidValue, "dynamic smem > 48 KiB without opt-in is refused");
    opted_in = true;
  }
  check(cudaFuncSetAttribute(dyn_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, n * 4) == cudaSuccess,
        "cudaFuncSetAttribute");
  GENFAST_LAUNCH(dyn_smem, grid, block, n * sizeof(float), nullptr, out.data(), poison.data(), n);
  bool ok = cudaGetLastError() == cudaSuccess;
  for (int by = 0; by < 2; ++by)
    for (int bx = 0; bx < 3; ++bx) {
      const int b = by * 3 + bx;
      const double want = 0.5 * n * (n - 1.0) + 1.0 * n * (bx + by);
      ok = ok && fabs(out[2 * b] - want) <= 1e-5 * want && out[2 * b + 1] == float(n - 1 + bx + by) && poison[b] == 1;
    }
  check(ok, "GENFAST_DYN_SHARED, 0xff fill, block_sum / block_max, 2-D grid");
}

// ---- atomics --------------------------------------------------------------------------------------
__global__ void atomics(float* f, int* i, unsigned* u, unsigned long long* ull, double* d) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&f[0], 0.25f);
  atomicAdd(&i[0], 1);
  atomicAdd(&u[0], 2u);
  atomicAdd(&ull[0], 3ull);
  atomicAdd(&d[0], 0.5);
  atomicMax(&i[1], g);
  atomicMin(&i[2], -g);
  int old = i[3], assumed;
  do {
    assumed = old;
    old = atomicCAS(&i[3], assumed, assumed + 2);
  } while (old != assumed);
  atomicExch(&i[4], g);
  atomicOr(&u[1], 1u << (g & 31));
  atomicSub(&i[5], 1);
}

void test_atomics() {
  float f[1] = {0};
  int i[6] = {0, -1, 1, 0, -1, 0};
  unsigned u[2] = {0, 0};
  unsigned long long ull[1] = {0};
  double d[1] = {0};
  GENFAST_LAUNCH(atomics, 4, 96, 0, nullptr, f, i, u, ull, d);
  const int n = 384;
  check(cudaGetLastError() == cudaSuccess && f[0] == 0.25f * n && i[0] == n && u[0] == 2u * n && ull[0] == 3ull * n &&
            d[0] == 0.5 * n && i[1] == n - 1 && i[2] == -(n - 1) && i[3] == 2 * n && i[4] >= 0 && i[4] < n &&
            u[1] == 0xffffffffu && i[5] == -n,
        "atomicAdd/Max/Min/CAS/Exch/Or/Sub");
}

// ---- failures the emulation reports ---------------------------------------------------------------
__global__ void deadlock() {
  if ((threadIdx.x & 31) < 16) __syncthreads();  // half a warp waits for the block,
  else __syncwarp();                             // the other half for the whole warp
}
__global__ void lane_outside_mask(int* out) { out[threadIdx.x] = __shfl_sync(0x1u, 1, 0); }
__global__ void mixed_collectives(int* out) {
  out[threadIdx.x] = (threadIdx.x & 1) ? __shfl_xor_sync(0xffffffffu, 1, 1) : static_cast<int>(__ballot_sync(0xffffffffu, 1));
}
__global__ void trivial(int* out) { out[blockIdx.x * blockDim.x + threadIdx.x] = 1; }

void test_failures() {
  int buf[64] = {0};
  const char* old = getenv("GENFAST_EMU_TIMEOUT_S");
  const std::string saved = old ? old : "";
  setenv("GENFAST_EMU_TIMEOUT_S", "2", 1);  // the threads runner finds deadlocks by timeout
  GENFAST_LAUNCH(deadlock, 1, 64, 0, nullptr);
  check(cudaGetLastError() == cudaErrorLaunchFailure, "deadlock is reported");
  if (old) setenv("GENFAST_EMU_TIMEOUT_S", saved.c_str(), 1);
  else unsetenv("GENFAST_EMU_TIMEOUT_S");
  GENFAST_LAUNCH(lane_outside_mask, 1, 32, 0, nullptr, buf);
  check(cudaGetLastError() == cudaErrorLaunchFailure, "lane outside its mask is reported");
  GENFAST_LAUNCH(mixed_collectives, 1, 32, 0, nullptr, buf);
  check(cudaGetLastError() == cudaErrorLaunchFailure, "lanes in different collectives are reported");
  GENFAST_LAUNCH(trivial, 1, 1025, 0, nullptr, buf);
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "block of 1025 threads is refused");
  GENFAST_LAUNCH(trivial, dim3(1, 65536), 1, 0, nullptr, buf);
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "grid.y > 65535 is refused");
  GENFAST_LAUNCH(trivial, 2, 32, 0, nullptr, buf);
  bool ok = cudaGetLastError() == cudaSuccess;
  for (int k = 0; k < 64; ++k) ok = ok && buf[k] == 1;
  check(ok, "a launch after failures runs normally");
}

// ---- fp16 / bf16 conversions (host side, runner independent) --------------------------------------
void test_conversions() {
  bool ok = true;
  std::mt19937 rng(7);
  std::vector<float> vals = {0.f, -0.f, 1.f, 65504.f, 65519.99f, 65520.f, 1e-8f, 2.98e-8f, 6.1e-5f, 6.0975e-5f,
                             INFINITY, -INFINITY, 3.14159f, 1.0009765625f, 1.00048828125f};
  for (int k = 0; k < 200000; ++k) {
    uint32_t u = static_cast<uint32_t>(rng());
    float f;
    memcpy(&f, &u, 4);
    if (std::isfinite(f)) vals.push_back(f);
    vals.push_back(std::ldexp(static_cast<float>(rng() % 100000) / 99991.f, static_cast<int>(rng() % 50) - 30));
  }
  for (float f : vals) {
#ifdef __FLT16_MAX__  // GCC's _Float16 rounds like the GPU's cvt.rn.f16.f32
    const _Float16 ref = static_cast<_Float16>(f);
    uint16_t rb;
    memcpy(&rb, &ref, 2);
    ok = ok && __half_as_ushort(__float2half_rn(f)) == rb;
#endif
    const float back = __half2float(__float2half_rn(f));
    ok = ok && (std::isnan(back) == std::isnan(f)) && (std::fabs(f) >= 65520.f || std::fabs(back - f) <= std::fabs(f) * 4.9e-4f + 3e-8f);
    // bf16: round to nearest even on the upper 16 bits
    const uint16_t bb = __bfloat16_as_ushort(__float2bfloat16_rn(f));
    const float bf = __bfloat162float(__ushort_as_bfloat16(bb));
    uint32_t fu;
    memcpy(&fu, &f, 4);
    const uint32_t lo = fu & 0xffffu, t = fu >> 16;
    const uint32_t want = lo > 0x8000u || (lo == 0x8000u && (t & 1u)) ? t + 1 : t;
    ok = ok && bb == static_cast<uint16_t>(want) && (std::isinf(bf) || std::fabs(bf - f) <= std::fabs(f) * 3.91e-3f + 1e-40f);
  }
  ok = ok && __half_as_ushort(__float2half_rn(NAN)) == 0x7fffu && __bfloat16_as_ushort(__float2bfloat16_rn(NAN)) == 0x7fffu;
  const __half2 h2 = __floats2half2_rn(1.0f, -2.0f);
  unsigned w;
  memcpy(&w, &h2, 4);
  ok = ok && w == 0xc0003c00u;  // element 0 in the low half
  check(ok, "fp16 / bf16 conversions (round to nearest even, packing)");
}

// ---- flow_step through the other translation unit -----------------------------------------------
void test_flow_step() {
  const int rows = 3, cols = 1000;
  std::vector<float> x(rows * cols), vc(2 * rows * cols), out(rows * cols), dt = {0.1f, 0.2f, 0.3f};
  for (int k = 0; k < rows * cols; ++k) x[k] = 0.01f * (k % 97);
  for (int k = 0; k < 2 * rows * cols; ++k) vc[k] = 0.02f * (k % 89) - 1.f;
  genfast::FlowStepParams p{};
  p.out = out.data(); p.x = x.data(); p.vc = vc.data(); p.vu = vc.data() + rows * cols;
  p.rows = rows; p.cols = cols;
  p.out_rs = p.x_rs = p.vc_rs = p.vu_rs = cols;
  p.out_cs = p.x_cs = p.vc_cs = p.vu_cs = 1;
  p.dt = dt.data(); p.dt_stride = 1; p.w = nullptr; p.w_value = 2.5f; p.dtype = genfast::kFloat32;
  bool ok = genfast::flow_step_cuda(p, nullptr) == 0;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      const int k = r * cols + c;
      const float want = x[k] - dt[r] * (3.5f * vc[k] - 2.5f * vc[k + rows * cols]);
      ok = ok && std::fabs(out[k] - want) <= 1e-5f * (1 + std::fabs(want));
    }
  check(ok, "flow_step_cuda (separate translation unit)");
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> runners;
  for (int k = 1; k < argc; ++k) runners.push_back(argv[k]);
  if (runners.empty()) runners = {"fibers", "fibers-ucontext", "threads"};
  test_conversions();
  for (const std::string& r : runners) {
    genfast_emu::set_runner(r == "threads" ? genfast_emu::Runner::kThreads : genfast_emu::Runner::kFibers);
    if (r == "fibers-ucontext") setenv("GENFAST_EMU_FIBER_SWITCH", "ucontext", 1);  // the portable switch
    else unsetenv("GENFAST_EMU_FIBER_SWITCH");
    printf("runner: %s\n", r.c_str());
    test_shuffles();
    test_votes();
    test_early_exit();
    test_dyn_smem();
    test_atomics();
    test_failures();
    test_flow_step();
  }
  printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "PASSED", g_failures);
  return g_failures ? 1 : 0;
}
