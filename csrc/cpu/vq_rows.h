// Row access shared by the CPU VQ kernels (vq.cpp, vq_screen.cpp): z's two-level row layout,
// strided rows of any storage dtype as fp32, and a code's packing scale and bias.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/dtype.h"
#include "vq.h"

namespace genfast {
namespace vq_cpu {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Where row r of z starts (vq.h).
inline int64_t z_row(const VqParams& p, int64_t r) { return (r / p.z_inner) * p.z_os + (r % p.z_inner) * p.z_rs; }

// The d elements at base + off + i * cs as fp32 into out[0, d).
template <typename T>
void row_to_float(const void* base, int64_t off, int64_t cs, int64_t d, float* out) {
  const T* p = static_cast<const T*>(base) + off;
  for (int64_t i = 0; i < d; ++i) out[i] = to_float(p[i * cs]);
}

inline void row_any(int32_t dtype, const void* base, int64_t off, int64_t cs, int64_t d, float* out) {
  switch (dtype) {
    case kFloat16: row_to_float<Half>(base, off, cs, d, out); break;
    case kBFloat16: row_to_float<BFloat16>(base, off, cs, d, out); break;
    default: row_to_float<float>(base, off, cs, d, out); break;
  }
}

// A code's packing scale and bias (score = bias + z . (scale c)), returning |c|^2; also what the bf16 screen's
// exact re-check uses, so both modes score a code bit-identically.
inline float code_scale_bias(const VqParams& p, const float* row, float* scale, float* bias) {
  float sq = 0.0f;
  for (int64_t i = 0; i < p.d; ++i) sq += row[i] * row[i];
  // l2: -2c is exact in fp32 (barring overflow), so the ranking is that of |c|^2 - 2 z.c.
  *scale = p.metric == kVqCosine ? -1.0f / std::max(std::sqrt(sq), kVqNormEps) : -2.0f;
  *bias = p.metric == kVqCosine ? 0.0f : sq;
  return sq;  // |c|^2 in fp32
}

}  // namespace vq_cpu

// csrc/cpu/vq_screen.cpp: the bf16-screen mode (kVqBf16Screen) for one task of vq_nearest_cpu.
bool vq_screen_supported();
void vq_screen_task(const VqParams& p, int64_t n0, int64_t n1, int64_t ka, int64_t kb, float* best,
                    int64_t* best_idx);

}  // namespace genfast
