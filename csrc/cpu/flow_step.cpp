// The rectified-flow Euler / CFG step on the CPU (see flow_step.h for the math and layout).
//
// One pass over the tensors: each (row, column-chunk) pair is an OpenMP work item; the contiguous
// inner loop is written so GCC vectorises it, cloned per ISA (AVX-512, AVX2+F16C, baseline) and
// picked at load time, so the module never needs -march=native.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cpu/dtype.h"
#include "cpu/vec512.h"
#include "flow_step.h"

namespace genfast {
namespace {

constexpr int64_t kChunk = 8192;           // elements per work item: a few L1-sized streams
constexpr int64_t kParallelMin = 1 << 16;  // below this, threading costs more than it saves

template <typename T>
GENFAST_CPU_CLONES void step_contiguous(T* __restrict out, const T* x, const T* __restrict vc,
                                        const T* __restrict vu, int64_t n, float dt, float w) {
  // out may be x (in place): each element is read before it is written, in the same iteration.
  if (vu) {
    const float a = 1.0f + w;
    for (int64_t i = 0; i < n; ++i) {
      const float v = a * to_float(vc[i]) - w * to_float(vu[i]);
      out[i] = from_float<T>(to_float(x[i]) - dt * v);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = from_float<T>(to_float(x[i]) - dt * to_float(vc[i]));
  }
}

#ifdef GENFAST_HAVE_AVX512
// The contiguous step with hardware fp16/bf16 conversions; the scalar tail reuses the clone above.
template <typename T>
GENFAST_AVX512 void step_contiguous_avx512(T* out, const T* x, const T* vc, const T* vu, int64_t n, float dt, float w) {
  using namespace vec512;
  const int64_t n16 = n & ~int64_t{15};
  const __m512 vdt = _mm512_set1_ps(dt), va = _mm512_set1_ps(1.0f + w), vw = _mm512_set1_ps(w);
  for (int64_t i = 0; i < n16; i += 16) {
    __m512 v = load16(vc + i);
    if (vu) v = _mm512_fmsub_ps(va, v, _mm512_mul_ps(vw, load16(vu + i)));
    store16(out + i, _mm512_fnmadd_ps(vdt, v, load16(x + i)));
  }
  if (n16 < n) step_contiguous<T>(out + n16, x + n16, vc + n16, vu ? vu + n16 : nullptr, n - n16, dt, w);
}
#endif

template <typename T>
void step_row(T* out, const T* x, const T* vc, const T* vu, int64_t n, float dt, float w) {
#ifdef GENFAST_HAVE_AVX512
  // fp32 is already fast through the clones; the 16-bit types gain ~3x from hardware conversions.
  if (!std::is_same<T, float>::value && vec512::cpu_has_avx512_bf16()) {
    step_contiguous_avx512<T>(out, x, vc, vu, n, dt, w);
    return;
  }
#endif
  step_contiguous<T>(out, x, vc, vu, n, dt, w);
}

template <typename T>
void step_strided(const FlowStepParams& p, int64_t r, int64_t c0, int64_t c1, float dt, float w) {
  T* out = static_cast<T*>(p.out) + r * p.out_rs;
  const T* x = static_cast<const T*>(p.x) + r * p.x_rs;
  const T* vc = static_cast<const T*>(p.vc) + r * p.vc_rs;
  const T* vu = p.vu ? static_cast<const T*>(p.vu) + r * p.vu_rs : nullptr;
  if (p.out_cs == 1 && p.x_cs == 1 && p.vc_cs == 1 && (!vu || p.vu_cs == 1)) {
    step_row<T>(out + c0, x + c0, vc + c0, vu ? vu + c0 : nullptr, c1 - c0, dt, w);
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    float v = to_float(vc[c * p.vc_cs]);
    if (vu) v = (1.0f + w) * v - w * to_float(vu[c * p.vu_cs]);
    out[c * p.out_cs] = from_float<T>(to_float(x[c * p.x_cs]) - dt * v);
  }
}

template <typename T>
void run(const FlowStepParams& p) {
  const int64_t chunks = (p.cols + kChunk - 1) / kChunk;
  const int64_t items = p.rows * chunks;
#pragma omp parallel for schedule(static) if (p.rows * p.cols >= kParallelMin)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t r = i / chunks, c0 = (i % chunks) * kChunk;
    const float dt = p.dt ? p.dt[r * p.dt_stride] : p.dt_value;
    const float w = p.w ? p.w[r * p.w_stride] : p.w_value;
    step_strided<T>(p, r, c0, std::min(p.cols, c0 + kChunk), dt, w);
  }
}

}  // namespace

void flow_step_cpu(const FlowStepParams& p) {
  if (p.rows == 0 || p.cols == 0) return;
  switch (p.dtype) {
    case kFloat32: run<float>(p); break;
    case kFloat16: run<Half>(p); break;
    case kBFloat16: run<BFloat16>(p); break;
  }
}

}  // namespace genfast
