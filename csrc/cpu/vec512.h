// AVX-512 loads/stores of 16 elements as fp32, with the hardware conversions: vcvtph2ps /
// vcvtps2ph for fp16 and vcvtneps2bf16 for bf16. The portable conversions in dtype.h vectorise but
// cost ~40 instructions per 16 elements (measured 3x the fp32 time here); these take 1-2.
// Only functions compiled with GENFAST_AVX512 may call them; callers check cpu_has_avx512_bf16().
// vcvtneps2bf16 rounds to nearest even like PyTorch but flushes bf16 subnormals (|x| < 1.2e-38) to 0.
#pragma once
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

#include "cpu/dtype.h"

#define GENFAST_HAVE_AVX512 1
#define GENFAST_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))

namespace genfast {
namespace vec512 {

inline bool cpu_has_avx512_bf16() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

GENFAST_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
GENFAST_AVX512 inline __m512 load16(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
GENFAST_AVX512 inline __m512 load16(const BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
GENFAST_AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
GENFAST_AVX512 inline void store16(Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
GENFAST_AVX512 inline void store16(BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

}  // namespace vec512
}  // namespace genfast
#endif
