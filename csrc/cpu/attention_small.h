// Shared by the fp32 and bf16 "small" CPU attention ways (attention_fp32_small.cpp,
// attention_bf16_small.cpp): which keys a query row attends to.
#pragma once
#include <algorithm>
#include <cstdint>

#include "attention_fp32.h"
#include "cpu/vec512.h"

#ifdef GENFAST_HAVE_AVX512
namespace genfast {
namespace small_attn {
// Key lanes j0..j0+15 of query row i in play: before the causal limit (of nk keys), not padding.
GENFAST_AVX512 inline __mmask16 keys_on(const AttnSmallParams& a, const uint8_t* m, int64_t i, int64_t j0,
                                        int64_t nk) {
  const int64_t limit = a.causal ? std::min<int64_t>(nk, i + 1) : nk;
  __mmask16 k = vec512::tail(limit - j0 > 0 ? limit - j0 : 0);
  if (m) {
    const __m128i bytes = _mm_maskz_loadu_epi8(k, m + j0);
    k &= _mm_test_epi8_mask(bytes, bytes);
  }
  return k;
}
}  // namespace small_attn
}  // namespace genfast
#endif
