// Fused softmax / log-sum-exp rows of the CPU attention path (see attention.h).
//
// One OpenMP work item per score row: each row (nk <= a few thousand floats) stays in L1 over the
// three sweeps (max, exp + sum, normalise + store). exp is a branch-free polynomial (below) so the
// loops vectorise; cloned per ISA and picked at load time like every CPU kernel here.
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention.h"
#include "cpu/dtype.h"

namespace genfast {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (every argument here is s - max or s - lse): 2^n * e^r, |r| <= ln2 / 2, a
// degree-6 polynomial for e^r (relative error ~2e-7); x < -87 flushes to 0 (and -inf gives 0).
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  // round to nearest by the 1.5 * 2^23 trick: vectorises without -ffast-math (roundf does not)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x <= -87.0f ? 0.0f : p * two_n;
}

// Row i of head g: scaled scores into buf (masked keys -inf); returns the number of keys in play.
template <typename T>
GENFAST_CPU_CLONES int64_t load_row(const AttnRowsParams& a, const T* __restrict s, int64_t g, int64_t i,
                                    float* __restrict buf) {
  const int64_t limit = a.causal ? std::min<int64_t>(a.nk, a.q0 + i + 1) : a.nk;
  for (int64_t j = 0; j < limit; ++j) buf[j] = to_float(s[j]) * a.scale;
  for (int64_t j = limit; j < a.nk; ++j) buf[j] = -kInf;
  if (a.mask) {
    const uint8_t* m = a.mask + (g / a.heads) * a.mask_bs;
    for (int64_t j = 0; j < limit; ++j) buf[j] = m[j] ? buf[j] : -kInf;
  }
  return limit;
}

template <typename T>
GENFAST_CPU_CLONES void softmax_row(const AttnRowsParams& a, const T* s, T* p, int64_t g, int64_t i, float* buf) {
  load_row<T>(a, s, g, i, buf);
  float m = -kInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < a.nk; ++j) m = buf[j] > m ? buf[j] : m;
  float* lse = a.lse + g * a.lse_gs + i;
  if (m == -kInf) {  // no key: zeros, and lse = +inf so the backward's exp(s - lse) is 0
    for (int64_t j = 0; j < a.nk; ++j) p[j] = from_float<T>(0.0f);
    *lse = kInf;
    return;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)  // reassociating the sum lets it vectorise
  for (int64_t j = 0; j < a.nk; ++j) {
    buf[j] = exp_nonpos(buf[j] - m);
    sum += buf[j];
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < a.nk; ++j) p[j] = from_float<T>(buf[j] * inv);
  *lse = m + std::log(sum);
}

template <typename T>
GENFAST_CPU_CLONES void softmax_bwd_row(const AttnRowsParams& a, const T* s, const T* dp, T* p, T* ds, int64_t g,
                                        int64_t i, float* buf) {
  load_row<T>(a, s, g, i, buf);
  const float lse = a.lse[g * a.lse_gs + i];
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < a.nk; ++j) {
    buf[j] = exp_nonpos(buf[j] - lse);  // -inf (masked) or lse = +inf (no key) -> 0
    dot += buf[j] * to_float(dp[j]);
  }
  for (int64_t j = 0; j < a.nk; ++j) {
    const float d = buf[j] * (to_float(dp[j]) - dot) * a.scale;
    p[j] = from_float<T>(buf[j]);
    ds[j] = from_float<T>(d);
  }
}

template <typename T, typename F>
void for_rows(const AttnRowsParams& a, F&& row) {
  const int64_t n = a.groups * a.rows;
#pragma omp parallel
  {
    std::vector<float> buf(a.nk);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) row(r / a.rows, r % a.rows, r * a.nk, buf.data());
  }
}

template <typename T>
void fwd(const AttnRowsParams& a, const void* s, void* p) {
  for_rows<T>(a, [&](int64_t g, int64_t i, int64_t off, float* buf) {
    softmax_row<T>(a, static_cast<const T*>(s) + off, static_cast<T*>(p) + off, g, i, buf);
  });
}

template <typename T>
void bwd(const AttnRowsParams& a, const void* s, const void* dp, void* p, void* ds) {
  for_rows<T>(a, [&](int64_t g, int64_t i, int64_t off, float* buf) {
    softmax_bwd_row<T>(a, static_cast<const T*>(s) + off, static_cast<const T*>(dp) + off, static_cast<T*>(p) + off,
                       static_cast<T*>(ds) + off, g, i, buf);
  });
}

}  // namespace

void attn_softmax_rows_cpu(const AttnRowsParams& a, const void* s, void* p) {
  if (a.groups == 0 || a.rows == 0 || a.nk == 0) return;
  switch (a.dtype) {
    case kFloat32: fwd<float>(a, s, p); break;
    case kFloat16: fwd<Half>(a, s, p); break;
    case kBFloat16: fwd<BFloat16>(a, s, p); break;
  }
}

void attn_softmax_bwd_rows_cpu(const AttnRowsParams& a, const void* s, const void* dp, void* p, void* ds) {
  if (a.groups == 0 || a.rows == 0 || a.nk == 0) return;
  switch (a.dtype) {
    case kFloat32: bwd<float>(a, s, dp, p, ds); break;
    case kFloat16: bwd<Half>(a, s, dp, p, ds); break;
    case kBFloat16: bwd<BFloat16>(a, s, dp, p, ds); break;
  }
}

}  // namespace genfast
