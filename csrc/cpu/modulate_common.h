// Helpers shared by the CPU modulate and gated-residual kernels (csrc/cpu/modulate.cpp,
// csrc/cpu/gated_residual.cpp): per-sample fp32 rows, the ordered reduction of chunk sums, and the
// dtype switch. Internal to those two files (an unnamed namespace: each gets its own copy).
#pragma once
#include <omp.h>

#include <cstdint>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/vec16.h"
#include "modulate.h"

namespace genfast {
namespace {

constexpr int64_t kParallelMin = 1 << 14;  // elements: below this, threading costs more than it saves

// A thread's fp32 copy of one sample's [C] modulation row (1 + scale with plus_one, else shift or
// gate), converted when the sample changes: 16-bit per-sample rows are converted once per sample,
// not once a row. of() gives nullptr when off (or for a null row): the caller then reads the row as is.
template <typename T>
struct SampleRowF32 {
  std::vector<float> buf;
  bool plus_one;
  int64_t held = -1;
  SampleRowF32(bool on, int64_t C, bool plus_one = false) : buf(on ? C : 0), plus_one(plus_one) {}
  const float* of(const T* row_b, int64_t b) {
    if (buf.empty() || !row_b) return nullptr;
    if (b != held) {
      for (size_t c = 0; c < buf.size(); ++c) buf[c] = plus_one ? 1.f + to_float(row_b[c]) : to_float(row_b[c]);
      held = b;
    }
    return buf.data();
  }
};

// Whether 16-bit rows' per-sample modulation (row stride 0 over N > 1 tokens) is worth converting once.
template <typename T>
bool convert_per_sample(int64_t N, bool per_sample) {
  return sizeof(T) == 2 && N > 1 && per_sample;
}

// Adds the chunks' partial sums in order: out[b, c] = sum_k partial[b, k, which, c], for up to two
// outputs (which = 0 -> out0, 1 -> out1) in one parallel region.
template <typename T>
void reduce_partials(T* out0, T* out1, const float* partial, int64_t B, int64_t nchunks, int64_t stride_k,
                     int64_t C) {
  const int64_t jobs = 2 * B;
#pragma omp parallel for schedule(static) if (B * nchunks * C >= kParallelMin)
  for (int64_t j = 0; j < jobs; ++j) {
    const int64_t b = j >> 1, which = j & 1;
    T* dst = which ? out1 : out0;
    if (!dst) continue;
    const float* src = partial + b * nchunks * stride_k + which * C;
    for (int64_t c = 0; c < C; ++c) {
      float s = 0.f;
      for (int64_t k = 0; k < nchunks; ++k) s += src[k * stride_k + c];
      vec::store1(dst + b * C + c, s);
    }
  }
}

template <template <typename> class Fn, typename P>
void by_dtype(const P& p) {
  switch (p.dtype) {
    case kFloat32: Fn<float>::run(p); break;
    case kFloat16: Fn<Half>::run(p); break;
    case kBFloat16: Fn<BFloat16>::run(p); break;
  }
}

}  // namespace
}  // namespace genfast
