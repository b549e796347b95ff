// Softmax backward over transposed score blocks for the fp32 "onednn" CPU attention way (see
// csrc/attention_fp32.h). With lse and delta = rowsum(dout * out) known per query, p and ds are
// elementwise in s and dp, so the block can be [keys, queries]: each key row is one sweep, the
// per-query lse / delta are vector loads. OpenMP over key rows.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "attention_fp32.h"
#include "cpu/dtype.h"
#include "cpu/exp_nonpos.h"
#include "cpu/vec512.h"

namespace genfast {
namespace {

// First query column key j takes part in (causal: query q0 + i sees key j when i >= j - q0).
inline int64_t first_col(const AttnColsParams& a, int64_t j) {
  return a.causal ? std::min<int64_t>(a.nq, std::max<int64_t>(0, j - a.q0)) : 0;
}

GENFAST_CPU_CLONES void key_row(const AttnColsParams& a, int64_t j, float* __restrict s, float* __restrict dp) {
  const int64_t i0 = (a.mask && !a.mask[j]) ? a.nq : first_col(a, j);
  for (int64_t i = 0; i < i0; ++i) s[i] = dp[i] = 0.0f;
  for (int64_t i = i0; i < a.nq; ++i) {
    const float p = exp_nonpos(s[i] * a.scale - a.lse[i]);
    s[i] = p;
    dp[i] = p * (dp[i] - a.delta[i]) * a.scale;
  }
}

#ifdef GENFAST_HAVE_AVX512
GENFAST_AVX512 void key_row_avx(const AttnColsParams& a, int64_t j, float* s, float* dp) {
  using namespace vec512;
  const int64_t i0 = (a.mask && !a.mask[j]) ? a.nq : first_col(a, j);
  const __m512 scale = _mm512_set1_ps(a.scale), zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < a.nq; i += 16) {
    const __mmask16 t = tail(a.nq - i);
    // lanes before i0 are masked (causal / padding): 0; lse = +inf (no key) gives exp(-inf) = 0
    const __mmask16 on = t & static_cast<__mmask16>(i + 16 <= i0 ? 0 : (i >= i0 ? 0xffff : ~tail(i0 - i)));
    const __m512 x = _mm512_fmsub_ps(load(s + i, t), scale, load(a.lse + i, t));
    const __m512 p = _mm512_maskz_mov_ps(on, vec512::exp_nonpos(x));
    const __m512 d = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(load(dp + i, t), load(a.delta + i, t))), scale);
    store(s + i, t, p);
    store(dp + i, t, _mm512_mask_mov_ps(zero, on, d));
  }
}
#endif

}  // namespace

void attn_softmax_bwd_cols_cpu(const AttnColsParams& a, float* st, float* dpt) {
  if (a.nk == 0 || a.nq == 0) return;
#ifdef GENFAST_HAVE_AVX512
  const bool avx = vec512::cpu_has_avx512_bf16();
#else
  const bool avx = false;
#endif
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < a.nk; ++j) {
#ifdef GENFAST_HAVE_AVX512
    if (avx) {
      key_row_avx(a, j, st + j * a.nq, dpt + j * a.nq);
      continue;
    }
#endif
    (void)avx;
    key_row(a, j, st + j * a.nq, dpt + j * a.nq);
  }
}

}  // namespace genfast
