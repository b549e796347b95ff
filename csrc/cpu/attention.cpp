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
#include "cpu/exp_nonpos.h"
#include "cpu/vec512.h"

namespace genfast {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

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
  float dot = 0.0f;
  if (a.from_p) {
    for (int64_t j = 0; j < a.nk; ++j) buf[j] = to_float(s[j]);
  } else {
    load_row<T>(a, s, g, i, buf);
    const float lse = a.lse[g * a.lse_gs + i];
    for (int64_t j = 0; j < a.nk; ++j) buf[j] = exp_nonpos(buf[j] - lse);  // -inf (masked) or lse = +inf -> 0
  }
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < a.nk; ++j) dot += buf[j] * to_float(dp[j]);
  for (int64_t j = 0; j < a.nk; ++j) {
    const float d = buf[j] * (to_float(dp[j]) - dot) * a.scale;
    if (!a.from_p) p[j] = from_float<T>(buf[j]);
    ds[j] = from_float<T>(d);
  }
}

#ifdef GENFAST_HAVE_AVX512
// The same rows with AVX-512 intrinsics: hardware bf16/fp16 conversions and a 16-lane exp. The
// compiler's clones above spend most of their time converting 16-bit scores one by one (measured
// 4-8x slower in bf16); masked loads take the row tails, so there is no scalar remainder.
namespace avx {
using namespace vec512;

// Lanes j0..j0+15 of row i that take part: inside the row, causal limit, key padding mask.
GENFAST_AVX512 inline __mmask16 keep(const AttnRowsParams& a, const uint8_t* m, int64_t limit, int64_t j0) {
  __mmask16 k = tail(limit - j0 > 0 ? limit - j0 : 0);
  if (m) {
    const __m128i bytes = _mm_maskz_loadu_epi8(k, m + j0);
    k &= _mm_test_epi8_mask(bytes, bytes);
  }
  return k;
}

template <typename T>
GENFAST_AVX512 void softmax_row(const AttnRowsParams& a, const T* s, T* p, int64_t g, int64_t i, float* buf) {
  const int64_t limit = a.causal ? std::min<int64_t>(a.nk, a.q0 + i + 1) : a.nk;
  const uint8_t* m = a.mask ? a.mask + (g / a.heads) * a.mask_bs : nullptr;
  const __m512 scale = _mm512_set1_ps(a.scale), ninf = _mm512_set1_ps(-kInf);
  __m512 vmax = ninf;
  for (int64_t j = 0; j < a.nk; j += 16) {  // scaled, masked scores into buf (all lanes of every chunk)
    const __mmask16 k = keep(a, m, limit, j);
    const __m512 x = _mm512_mask_mul_ps(ninf, k, load(s + j, k), scale);
    _mm512_storeu_ps(buf + j, x);
    vmax = _mm512_max_ps(vmax, x);
  }
  const float mx = _mm512_reduce_max_ps(vmax);
  float* lse = a.lse + g * a.lse_gs + i;
  if (mx == -kInf) {  // no key: zeros, and lse = +inf so the backward's exp(s - lse) is 0
    for (int64_t j = 0; j < a.nk; j += 16) store(p + j, tail(a.nk - j), _mm512_setzero_ps());
    *lse = kInf;
    return;
  }
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < a.nk; j += 16) {
    const __m512 e = vec512::exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(buf + j), vm));
    _mm512_storeu_ps(buf + j, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  const float sum = _mm512_reduce_add_ps(vsum);
  const __m512 inv = _mm512_set1_ps(1.0f / sum);
  for (int64_t j = 0; j < a.nk; j += 16) store(p + j, tail(a.nk - j), _mm512_mul_ps(_mm512_loadu_ps(buf + j), inv));
  *lse = mx + std::log(sum);
}

template <typename T>
GENFAST_AVX512 void softmax_bwd_row(const AttnRowsParams& a, const T* s, const T* dp, T* p, T* ds, int64_t g,
                                    int64_t i, float* buf) {
  const int64_t limit = a.causal ? std::min<int64_t>(a.nk, a.q0 + i + 1) : a.nk;
  const uint8_t* m = a.mask ? a.mask + (g / a.heads) * a.mask_bs : nullptr;
  const __m512 scale = _mm512_set1_ps(a.scale), lse = _mm512_set1_ps(a.from_p ? 0.0f : a.lse[g * a.lse_gs + i]);
  __m512 vdot = _mm512_setzero_ps();
  for (int64_t j = 0; j < a.nk; j += 16) {  // p = exp(scale s - lse), 0 where masked (or lse = +inf)
    const __mmask16 t = tail(a.nk - j);
    const __m512 e = a.from_p ? load(s + j, t) : _mm512_maskz_mov_ps(keep(a, m, limit, j),
                                                                     vec512::exp_nonpos(_mm512_fmsub_ps(load(s + j, t), scale, lse)));
    _mm512_storeu_ps(buf + j, e);
    vdot = _mm512_fmadd_ps(e, load(dp + j, t), vdot);
  }
  const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(vdot));
  for (int64_t j = 0; j < a.nk; j += 16) {
    const __mmask16 t = tail(a.nk - j);
    const __m512 e = _mm512_loadu_ps(buf + j);
    if (!a.from_p) store(p + j, t, e);
    store(ds + j, t, _mm512_mul_ps(_mm512_mul_ps(e, _mm512_sub_ps(load(dp + j, t), dot)), scale));
  }
}
}  // namespace avx
#endif

template <typename T, typename F>
void for_rows(const AttnRowsParams& a, F&& row) {
  const int64_t n = a.groups * a.rows;
#pragma omp parallel
  {
    std::vector<float> buf((a.nk + 15) & ~int64_t{15});  // whole 16-lane chunks
#pragma omp for schedule(static) nowait  // one barrier (the join) a call, not two
    for (int64_t r = 0; r < n; ++r) row(r / a.rows, r % a.rows, r * a.nk, buf.data());
  }
}

template <typename T>
void fwd(const AttnRowsParams& a, const void* s, void* p) {
#ifdef GENFAST_HAVE_AVX512
  if (vec512::cpu_has_avx512_bf16()) {
    for_rows<T>(a, [&](int64_t g, int64_t i, int64_t off, float* buf) {
      avx::softmax_row<T>(a, static_cast<const T*>(s) + off, static_cast<T*>(p) + off, g, i, buf);
    });
    return;
  }
#endif
  for_rows<T>(a, [&](int64_t g, int64_t i, int64_t off, float* buf) {
    softmax_row<T>(a, static_cast<const T*>(s) + off, static_cast<T*>(p) + off, g, i, buf);
  });
}

template <typename T>
void bwd(const AttnRowsParams& a, const void* s, const void* dp, void* p, void* ds) {
#ifdef GENFAST_HAVE_AVX512
  if (vec512::cpu_has_avx512_bf16()) {
    for_rows<T>(a, [&](int64_t g, int64_t i, int64_t off, float* buf) {
      avx::softmax_bwd_row<T>(a, static_cast<const T*>(s) + off, static_cast<const T*>(dp) + off,
                              static_cast<T*>(p) + off, static_cast<T*>(ds) + off, g, i, buf);
    });
    return;
  }
#endif
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
