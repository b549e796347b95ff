// What the bf16 "small" CPU attention ways share (attention_bf16_small.cpp on AVX-512 BF16 dot
// products, attention_bf16_amx.cpp on AMX tiles): packing of B operands into pair words, the
// softmax rows of the forward and the backward, the per-thread scratch. Word (kk, n) of a packed B
// holds rows 2kk and 2kk + 1 of column n: the layout both vdpbf16ps and AMX's tdpbf16ps read.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention_fp32.h"
#include "cpu/attention_small.h"
#include "cpu/dtype.h"
#include "cpu/vec512.h"

#ifdef GENFAST_HAVE_AVX512
namespace genfast {
namespace bf16_rows {
using namespace vec512;
using u16 = uint16_t;
using u32 = uint32_t;
constexpr float kInf = std::numeric_limits<float>::infinity();
using small_attn::keys_on;

inline int64_t padded(int64_t n, int64_t w) { return (n + w - 1) / w * w; }
inline int64_t pairs(int64_t n) { return (n + 1) / 2; }
inline int64_t even(int64_t n) { return n + (n & 1); }

// B [K, N] with rows of stride rs and unit columns, into panels of width w; word (kk, n) holds
// rows 2kk and 2kk + 1 of column n (the second 0 past K).
inline void pack_rows(const u16* b, int64_t rs, int64_t k_len, int64_t n, int64_t w, u32* dst) {
  const int64_t k2 = pairs(k_len);
  for (int64_t n0 = 0; n0 < n; n0 += w, dst += k2 * w) {
    const int64_t nr = std::min(w, n - n0);
    for (int64_t kk = 0; kk < k2; ++kk) {
      const u16* lo = b + 2 * kk * rs + n0;
      const u16* hi = 2 * kk + 1 < k_len ? lo + rs : nullptr;
      u32* d = dst + kk * w;
      if (hi)
        for (int64_t c = 0; c < nr; ++c) d[c] = u32(lo[c]) | (u32(hi[c]) << 16);
      else
        for (int64_t c = 0; c < nr; ++c) d[c] = lo[c];
      for (int64_t c = nr; c < w; ++c) d[c] = 0;
    }
  }
}

// B = X^T for X [N, K] (rows of stride rs, unit columns, K even): word (kk, n) is X's word at
// row n, elements 2kk and 2kk + 1, already adjacent. A transpose of 32-bit words: through 16 x 16
// register blocks where the rows are whole words and the panels whole vectors (k^T and v^T of
// every bf16 head; element by element they took ~5 % of a forward).
GENFAST_AVX512 inline void pack_cols(const u16* x, int64_t rs, int64_t k_len, int64_t n, int64_t w, u32* dst) {
  const int64_t k2 = k_len / 2;
  for (int64_t n0 = 0; n0 < n; n0 += w, dst += k2 * w) {
    const int64_t nr = std::min(w, n - n0);
    if (rs % 2 == 0 && w % 16 == 0) {
      transpose32(x + n0 * rs, rs / 2, nr, k2, dst, w);  // columns nr .. padded(nr, 16) - 1: zeros
      for (int64_t kk = 0; kk < k2; ++kk) std::fill(dst + kk * w + padded(nr, 16), dst + kk * w + w, 0u);
      continue;
    }
    for (int64_t c = 0; c < w; ++c) {
      if (c < nr) {
        const u16* row = x + (n0 + c) * rs;
        for (int64_t kk = 0; kk < k2; ++kk) std::memcpy(dst + kk * w + c, row + 2 * kk, 4);
      } else {
        for (int64_t kk = 0; kk < k2; ++kk) dst[kk * w + c] = 0;
      }
    }
  }
}

GENFAST_AVX512 inline __mmask16 tail0(int64_t left) { return tail(left > 0 ? left : 0); }

// Words (x0[j], x1[j]) of 16 lanes, each rounded to bf16 (nearest even).
GENFAST_AVX512 inline __m512i bf16_words(__m512 x0, __m512 x1) {
  const __m512i b0 = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x0)));
  const __m512i b1 = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x1)));
  return _mm512_or_si512(b0, _mm512_slli_epi32(b1, 16));
}

// log2(x) for finite x > 0 (normal): x = 2^e m, m in [sqrt(1/2), sqrt(2)), log2(m) from the atanh
// series in t = (m - 1) / (m + 1), |t| < 0.172 (truncation error ~4e-8).
GENFAST_AVX512 inline __m512 log2_pos(__m512 x) {
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  __m512 e = _mm512_getexp_ps(x);
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 t = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one)), t2 = _mm512_mul_ps(t, t);
  __m512 p = _mm512_set1_ps(2.0f / (7 * kLn2));  // 2 / (k ln2), k = 7, 5, 3, 1
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(2.0f / (5 * kLn2)));
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(2.0f / (3 * kLn2)));
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(2.0f / kLn2));
  return _mm512_fmadd_ps(p, t, e);
}

// In place over n rows: lse = (mx - log2(inv)) ln2 from softmax_row's base-2 max (in lse) and
// 1 / sum e (inv), 16 rows a vector (a libm call per row took ~3 % of a forward); +inf with no key.
GENFAST_AVX512 inline void lse_rows(float* lse, const float* inv, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 t = tail(n - i);
    const __m512 mx = _mm512_mask_loadu_ps(_mm512_set1_ps(0.0f), t, lse + i);
    const __m512 iv = _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), t, inv + i);
    const __mmask16 none = _mm512_cmp_ps_mask(iv, _mm512_setzero_ps(), _CMP_EQ_OQ);
    const __m512 l = _mm512_mul_ps(_mm512_sub_ps(mx, log2_pos(_mm512_mask_mov_ps(iv, none, _mm512_set1_ps(1.0f)))),
                                   _mm512_set1_ps(kLn2));
    _mm512_mask_storeu_ps(lse + i, t, _mm512_mask_mov_ps(l, none, _mm512_set1_ps(kInf)));
  }
}

// Row i of s [nk] (raw fp32 scores): e = exp(scale s - max) in bf16 into p16 [even(nk)] (0 past nk
// and off the keys in play), NOT normalised: the p v GEMM scales its output row by *inv = 1 / sum e.
// With keep, also p = e / sum (bf16, normalised) into keep [nk] for the backward. Returns the row's
// max of scale log2(e) s, from which lse_rows makes lse (*inv = 0 with no key in play). Base-2
// inside: scale log2(e) folded into one FMA.
GENFAST_AVX512 inline float softmax_row(const AttnSmallParams& a, const uint8_t* m, int64_t i, int64_t nk, float* s,
                                 BFloat16* p16, BFloat16* keep, float* inv) {
  const __m512 c2 = _mm512_set1_ps(a.scale * kLog2e), ninf = _mm512_set1_ps(-kInf);
  // every key in play (no key mask, not cut by the causal limit): whole 32-key steps without a
  // per-vector key mask, two independent max / sum chains (measured ~10 % of the rows)
  const bool plain = small_attn::all_keys_on(a, m, i, nk);
  __m512 vmax = ninf, vmax1 = ninf;
  int64_t j0 = 0;
  if (plain)
    for (; j0 + 32 <= nk; j0 += 32) {
      vmax = _mm512_max_ps(vmax, _mm512_mul_ps(_mm512_loadu_ps(s + j0), c2));
      vmax1 = _mm512_max_ps(vmax1, _mm512_mul_ps(_mm512_loadu_ps(s + j0 + 16), c2));
    }
  for (int64_t j = j0; j < nk; j += 16) {
    const __m512 x = _mm512_maskz_loadu_ps(tail(nk - j), s + j);
    vmax = _mm512_max_ps(vmax, _mm512_mask_mul_ps(ninf, keys_on(a, m, i, j, nk), x, c2));
  }
  const float mx = _mm512_reduce_max_ps(_mm512_max_ps(vmax, vmax1));
  if (mx == -kInf) {  // no key: p = 0, lse = +inf
    for (int64_t j = 0; j < even(nk); j += 16) store(p16 + j, tail(even(nk) - j), _mm512_setzero_ps());
    if (keep)
      for (int64_t j = 0; j < nk; j += 16) store(keep + j, tail(nk - j), _mm512_setzero_ps());
    *inv = 0.0f;
    return mx;
  }
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps(), vsum1 = vsum;
  for (int64_t j = 0; j < j0; j += 32) {  // the plain steps above
    const __m512 e0 = exp2_nonpos(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), c2, vm));
    const __m512 e1 = exp2_nonpos(_mm512_fmsub_ps(_mm512_loadu_ps(s + j + 16), c2, vm));
    vsum = _mm512_add_ps(vsum, e0);
    vsum1 = _mm512_add_ps(vsum1, e1);
    if (keep) {
      _mm512_storeu_ps(s + j, e0);
      _mm512_storeu_ps(s + j + 16, e1);
    } else {
      store(p16 + j, __mmask16(0xffff), e0);
      store(p16 + j + 16, __mmask16(0xffff), e1);
    }
  }
  vsum = _mm512_add_ps(vsum, vsum1);
  for (int64_t j = j0; j < even(nk); j += 16) {  // lanes past nk: e = 0, the pad of p16
    const __m512 e = _mm512_maskz_mov_ps(keys_on(a, m, i, j, nk),
                                         exp2_nonpos(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail(nk - j), s + j), c2, vm)));
    vsum = _mm512_add_ps(vsum, e);
    if (keep)
      _mm512_mask_storeu_ps(s + j, tail(nk - j), e);
    else
      store(p16 + j, tail(even(nk) - j), e);
  }
  const float sum = _mm512_reduce_add_ps(vsum);
  *inv = 1.0f / sum;
  if (keep) {
    const __m512 vinv = _mm512_set1_ps(*inv);
    for (int64_t j = 0; j < even(nk); j += 16) {
      const __m512 e = _mm512_maskz_loadu_ps(tail(nk - j), s + j);
      store(p16 + j, tail(even(nk) - j), e);
      store(keep + j, tail(nk - j), _mm512_mul_ps(e, vinv));
    }
  }
  return mx;
}

inline const u16* at(const AttnHeadIn& t, int64_t bi, int64_t hi) {
  return static_cast<const u16*>(t.p) + bi * t.bs + hi * t.hs;
}
inline BFloat16* at(const AttnHeadOut& t, int64_t bi, int64_t hi) {
  return static_cast<BFloat16*>(t.p) + bi * t.bs + hi * t.hs;
}

// Per-thread scratch, kept between calls (OpenMP threads persist): no fresh pages a call. Both
// areas start on a 64-byte boundary: an AMX tile load whose rows straddle cache lines measured
// 6.7x slower (14.8 vs 2.2 ns a 1 KiB tile, 2-core Xeon), and every operand the tiles read sits at
// a multiple of 16 elements into one of these areas with a row stride of a multiple of 64 bytes.
struct Scratch {
  std::vector<float> f32;
  std::vector<u32> w32;
  float* floats(size_t n) { return small_attn::aligned_area(f32, n); }
  u32* words(size_t n) { return small_attn::aligned_area(w32, n); }
};

// Rows i and i + 1 (when two) of one block: p from s (fp32, recomputed) or the kept p, ds from dp
// (s and dp rows of stride ld), both to bf16: ds into ds16 (row stride nkp, zeros from nk to nkp),
// p and ds pair-interleaved into pt / dst (one [key] row of words for the pair) for dv = p^T dout
// and dk = ds^T q.
GENFAST_AVX512 inline void softmax_bwd_pair(const AttnSmallParams& a, const uint8_t* m, int64_t i, int64_t two,
                                            int64_t nk, const float* lse, const BFloat16* kept, int64_t kept_rs,
                                            float* s, float* dp, int64_t ld,
                                            BFloat16* ds16, int64_t nkp, u32* pt, u32* dst) {
  const __m512 scale = _mm512_set1_ps(a.scale), c2 = _mm512_set1_ps(a.scale * kLog2e);
  float dot[2] = {0.0f, 0.0f};
  for (int64_t r = 0; r < two; ++r) {  // p over s (fp32), dot = rowsum(p dp)
    float* sr = s + r * ld;
    const float* dpr = dp + r * ld;
    // base 2 as the forward's rows; no per-vector key mask where every key is in play
    const __m512 vl = _mm512_set1_ps(lse[r] * kLog2e);
    const bool plain = small_attn::all_keys_on(a, m, i + r, nk);
    __m512 vdot = _mm512_setzero_ps();
    for (int64_t j = 0; j < nk; j += 16) {
      const __mmask16 t = tail(nk - j);
      const __m512 p = kept ? load(kept + r * kept_rs + j, t)
                            : _mm512_maskz_mov_ps(plain ? t : keys_on(a, m, i + r, j, nk),
                                                  exp2_nonpos(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(t, sr + j), c2, vl)));
      _mm512_mask_storeu_ps(sr + j, t, p);
      vdot = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(t, dpr + j), vdot);
    }
    dot[r] = _mm512_reduce_add_ps(vdot);
  }
  const __m512 d0 = _mm512_set1_ps(dot[0]), d1 = _mm512_set1_ps(dot[1]);
  for (int64_t j = 0; j < nkp; j += 16) {
    const __mmask16 t = tail0(nk - j);  // lanes past nk: p = ds = 0
    const __m512 p0 = _mm512_maskz_loadu_ps(t, s + j);
    const __m512 ds0 = _mm512_mul_ps(_mm512_mul_ps(p0, _mm512_sub_ps(_mm512_maskz_loadu_ps(t, dp + j), d0)), scale);
    __m512 p1 = _mm512_setzero_ps(), ds1 = p1;
    if (two == 2) {
      p1 = _mm512_maskz_loadu_ps(t, s + ld + j);
      ds1 = _mm512_mul_ps(_mm512_mul_ps(p1, _mm512_sub_ps(_mm512_maskz_loadu_ps(t, dp + ld + j), d1)), scale);
    }
    const __mmask16 tp = tail(nkp - j);
    store(ds16 + j, tp, ds0);
    if (two == 2) store(ds16 + nkp + j, tp, ds1);
    _mm512_mask_storeu_epi32(pt + j, t, bf16_words(p0, p1));  // words (row i, row i + 1)
    _mm512_mask_storeu_epi32(dst + j, t, bf16_words(ds0, ds1));
  }
}

}  // namespace bf16_rows
}  // namespace genfast
#endif
