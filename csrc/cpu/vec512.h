// AVX-512 loads/stores of 16 elements as fp32, with the hardware conversions: vcvtph2ps /
// vcvtps2ph for fp16 and vcvtneps2bf16 for bf16. The portable conversions in dtype.h vectorise but
// cost ~40 instructions per 16 elements (measured 3x the fp32 time here); these take 1-2.
// Only functions compiled with GENFAST_AVX512 may call them; callers check cpu_has_avx512_bf16().
// vcvtneps2bf16 rounds to nearest even like PyTorch but flushes bf16 subnormals (|x| < 1.2e-38) to 0.
#pragma once
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

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

// Masked 16-lane loads/stores (row tails without a scalar remainder), fp32 math on fp16/bf16 storage.
GENFAST_AVX512 inline __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
GENFAST_AVX512 inline __m512 load(const BFloat16* p, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
GENFAST_AVX512 inline __m512 load(const Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
GENFAST_AVX512 inline void store(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
GENFAST_AVX512 inline void store(BFloat16* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
GENFAST_AVX512 inline void store(Half* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

GENFAST_AVX512 inline __mmask16 tail(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}


// In place: r[i], row i of a 16 x 16 block of 32-bit lanes, becomes column i (3 shuffle rounds).
GENFAST_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {  // rows 2i, 2i + 1 interleaved within each 128-bit lane
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // u[g + c], lane L: column 4L + c of rows g .. g + 3
    u[g] = _mm512_shuffle_ps(t[g], t[g + 2], 0x44);
    u[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], 0xEE);
    u[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0x44);
    u[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {  // lane L of the four row groups side by side: column 4L + c
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88), w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    r[12 + c] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
}

// A rows x cols source transposed in 16 x 16 register blocks: load(r, c0, mask) gives row r's 16
// lanes from column c0 (the mask covers the columns left), store(c, r0, v) takes column c's lanes
// of rows r0 .. r0 + 15, those past `rows` 0. Full blocks take no branch per row or column.
template <typename Load, typename Store>
GENFAST_AVX512 inline void transpose_blocks(int64_t rows, int64_t cols, Load&& load, Store&& store) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16)
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const __mmask16 t = tail(cols - c0);
      __m512 x[16];
      if (r0 + 16 <= rows) {
        for (int r = 0; r < 16; ++r) x[r] = load(r0 + r, c0, t);
      } else {
        for (int r = 0; r < 16; ++r) x[r] = r0 + r < rows ? load(r0 + r, c0, t) : _mm512_setzero_ps();
      }
      transpose16(x);
      if (c0 + 16 <= cols) {
        for (int c = 0; c < 16; ++c) store(c0 + c, r0, x[c]);
      } else {
        for (int c = 0; c < cols - c0; ++c) store(c0 + c, r0, x[c]);
      }
    }
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols, 32-bit elements; lanes r >= rows
// of dst's rows are written 0 up to a multiple of 16.
GENFAST_AVX512 inline void transpose32(const void* src, int64_t lds, int64_t rows, int64_t cols, void* dst, int64_t ldd) {
  const float* s = static_cast<const float*>(src);
  float* d = static_cast<float*>(dst);
  transpose_blocks(
      rows, cols,
      [&](int64_t r, int64_t c0, __mmask16 t) GENFAST_AVX512 { return _mm512_maskz_loadu_ps(t, s + r * lds + c0); },
      [&](int64_t c, int64_t r0, __m512 v) GENFAST_AVX512 { _mm512_storeu_ps(d + c * ldd + r0, v); });
}

// exp(x) for x <= 0: 2^n e^r, |r| <= ln2 / 2, degree-6 polynomial (relative error ~2e-7); x < -87 -> 0.
GENFAST_AVX512 inline __m512 exp_nonpos(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LE_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}

constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;

// 2^x = 2^n 2^f, n = round(x), |f| <= 1/2, degree-5 polynomial fitted for relative error (measured
// 1.9e-7 in fp32 arithmetic, as the degree-6 Taylor one it replaced); callers clamp x (scalef makes
// 2^n for any n, subnormal or inf past the normal range).
GENFAST_AVX512 inline __m512 exp2_poly(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.326472731307149e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.671512991189957e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550733581185341e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022242426872253f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931470036506653f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 2^x for x <= 0; x < -127 gives ~2^-127, not 0 (bf16 rounding flushes it, in fp32 it is negligible
// next to the row's largest term, 1; callers mask keys out of play).
GENFAST_AVX512 inline __m512 exp2_nonpos(__m512 x) { return exp2_poly(_mm512_max_ps(x, _mm512_set1_ps(-127.0f))); }

}  // namespace vec512
}  // namespace genfast
#endif
