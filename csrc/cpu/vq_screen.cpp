// The CPU's faster VQ mode (VqParams::precision == kVqBf16Screen): bf16 products screen the
// codes, an exact fp32 re-check of the survivors picks the answer, so the indices are those of the
// fp32 mode bit for bit (tests/test_vq.py checks it), at the AVX-512 BF16 rate (vdpbf16ps: two
// products per fp32 lane per instruction).
//
// Screen: s~ = bias + z~ . (scale c)~ with z and the scaled code rounded to bf16 and fp32
// accumulation. For every (row, code) |s~ - s| <= E, where s is the fp32 mode's score:
//   E = (2^-7 + 2^-15 + (d + 2) 2^-23 + 2^-22) |z| |scale c| + 2^-22 |bias| + d 2^-120 (1 + |scale c|)
// (bf16 rounding of both factors; fp32 accumulation of both modes; the bias addition; products
// flushed from the subnormal range). A row keeps U = min over codes of s~ + E; only codes with
// s~ - E <= U can be its fp32 minimum, and only those are re-scored in fp32 (the same FMA chain
// and bias as the fp32 kernel, in code order, strict <: the same tie rule). A row whose U is not
// finite (NaN or overflow in z) is re-scanned exactly in full, so every edge case matches too.
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/vq_rows.h"
#include "vq.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define GENFAST_VQ_BF16 1
#endif

namespace genfast {
namespace {
using namespace vq_cpu;

constexpr int kNR = 64, kMR = 6;
constexpr int64_t kBlockPairs = 48 << 10;  // packed bf16 pairs per block: 192 KiB

struct Candidate {
  int32_t k;  // code index relative to the task's first code
  float lower;
};

uint16_t to_bf16(float f) { return from_float<BFloat16>(f).bits; }

#ifdef GENFAST_VQ_BF16
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2,fma")

// One panel of 64 codes for MR rows: screen scores, update U, collect candidates.
// zp[r]: z row r as bf16 pairs [dp]; panel: [dp][64][2] bf16; emul/eadd/bias: [64] per code.
template <int MR>
void screen_panel(const uint32_t* const* zp, const float* zn, int64_t dp, const uint16_t* panel, const float* bias,
                  const float* emul, const float* eadd, int32_t kbase, float* U, std::vector<Candidate>* cand) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < dp; ++i) {
    const uint16_t* b = panel + i * kNR * 2;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 32);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(b + 64), b3 = (__m512bh)_mm512_loadu_si512(b + 96);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(zp[r][i]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, b2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, b3);
    }
  }
  for (int r = 0; r < MR; ++r) {
    const __m512 znv = _mm512_set1_ps(zn[r]);
    __m512 lower[4];
    __m512 upper_min = _mm512_set1_ps(kInf);
    for (int v = 0; v < 4; ++v) {
      const __m512 sc = _mm512_add_ps(acc[r][v], _mm512_loadu_ps(bias + 16 * v));
      const __m512 e = _mm512_fmadd_ps(znv, _mm512_loadu_ps(emul + 16 * v), _mm512_loadu_ps(eadd + 16 * v));
      lower[v] = _mm512_sub_ps(sc, e);
      const __m512 up = _mm512_add_ps(sc, e);
      upper_min = _mm512_mask_mov_ps(upper_min, _mm512_cmp_ps_mask(up, upper_min, _CMP_LT_OQ), up);  // NaN: kept out
    }
    alignas(64) float um[16];
    _mm512_store_ps(um, upper_min);
    float u = U[r];
    for (int l = 0; l < 16; ++l) u = um[l] < u ? um[l] : u;
    U[r] = u;
    const __m512 uv = _mm512_set1_ps(u);
    for (int v = 0; v < 4; ++v) {
      uint32_t m = _mm512_cmp_ps_mask(lower[v], uv, _CMP_LE_OQ);
      if (!m) continue;
      alignas(64) float lo[16];
      _mm512_store_ps(lo, lower[v]);
      while (m) {
        const int l = __builtin_ctz(m);
        m &= m - 1;
        cand[r].push_back(Candidate{kbase + 16 * v + l, lo[l]});
      }
    }
  }
}

// The fp32 mode's score of one code: the same FMA chain (fma(z_i, scale c_i, acc) in order from 0)
// and the same bias addition as tile_avx512 in vq.cpp.
float exact_score(const float* z, const float* c, int64_t d, float scale, float bias) {
  float acc = 0.0f;
  for (int64_t i = 0; i < d; ++i) acc = std::fmaf(z[i], scale * c[i], acc);
  return acc + bias;
}
#pragma GCC pop_options

using PanelFn = void (*)(const uint32_t* const*, const float*, int64_t, const uint16_t*, const float*, const float*,
                         const float*, int32_t, float*, std::vector<Candidate>*);
template <int MR>
constexpr PanelFn kPanel = screen_panel<MR>;
constexpr PanelFn kPanels[kMR + 1] = {nullptr, kPanel<1>, kPanel<2>, kPanel<3>, kPanel<4>, kPanel<5>, kPanel<6>};

// Code ka + j: fp32 values into c, scale and bias exactly as pack_block (outside any target region,
// so the compiler contracts nothing differently).
float load_code(const VqParams& p, int64_t k, float* c, float* scale, float* bias) {
  row_any(p.c_dtype, p.codebook, k * p.c_rs, p.c_cs, p.d, c);
  return code_scale_bias(p, c, scale, bias);
}

void prune(std::vector<Candidate>& cs, float u) {
  size_t w = 0;
  for (const Candidate& c : cs)
    if (c.lower <= u) cs[w++] = c;
  cs.resize(w);
}
#endif

}  // namespace

bool vq_screen_supported() {
#ifdef GENFAST_VQ_BF16
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

// Rows [n0, n1) against codes [ka, kb) (the contract of run_task in vq.cpp).
void vq_screen_task(const VqParams& p, int64_t n0, int64_t n1, int64_t ka, int64_t kb, float* best,
                    int64_t* best_idx) {
#ifdef GENFAST_VQ_BF16
  const int64_t d = p.d, dp = (d + 1) / 2, rows = n1 - n0;
  const int64_t kc = std::max<int64_t>(kNR, (kBlockPairs / dp) / kNR * kNR);
  const int64_t cap = std::min(kc, (kb - ka + kNR - 1) / kNR * kNR);
  std::vector<uint16_t> panels(static_cast<size_t>(cap * dp * 2));
  std::vector<float> bias(cap), emul(cap), eadd(cap), crow(d), zrow(d);
  // z as bf16 pairs, converted once per task (N D 2 bytes in all: the screen's only O(N D) buffer)
  std::vector<uint32_t> zbuf(static_cast<size_t>(rows * dp));
  std::vector<float> U(rows, kInf), zn(rows);
  std::vector<std::vector<Candidate>> cand(rows);
  const float beta = std::ldexp(1.0f, -7) + std::ldexp(1.0f, -15) + (d + 2) * std::ldexp(1.0f, -23) + std::ldexp(1.0f, -22);
  const float floor_abs = d * std::ldexp(1.0f, -120);
  for (int64_t r = 0; r < rows; ++r) {  // bf16 pairs and |z| rounded up
    row_any(p.z_dtype, p.z, z_row(p, n0 + r), p.z_cs, d, zrow.data());
    double s = 0;
    for (int64_t i = 0; i < d; ++i) s += double(zrow[i]) * zrow[i];
    zn[r] = static_cast<float>(std::sqrt(s) * (1 + 1e-6));
    uint32_t* dst = zbuf.data() + r * dp;
    for (int64_t i = 0; i < dp; ++i)
      dst[i] = to_bf16(zrow[2 * i]) | (uint32_t(2 * i + 1 < d ? to_bf16(zrow[2 * i + 1]) : 0) << 16);
  }
  for (int64_t k0 = ka; k0 < kb; k0 += kc) {
    const int64_t n_codes = std::min(kc, kb - k0), npan = (n_codes + kNR - 1) / kNR;
    for (int64_t j = 0; j < npan * kNR; ++j) {  // pack: [panel][dp][64][2] bf16 of scale * c
      uint16_t* dst = panels.data() + (j / kNR) * dp * kNR * 2 + (j % kNR) * 2;
      float scale = 0.0f;
      if (j < n_codes) {
        const float sq = load_code(p, k0 + j, crow.data(), &scale, &bias[j]);
        // |scale c|, rounded up past the fp32 sum's rounding (relative d 2^-24 at most)
        const float cnorm = std::fabs(scale) * std::sqrt(sq) * (1.0f + (d + 8) * std::ldexp(1.0f, -23));
        emul[j] = beta * cnorm;
        eadd[j] = std::ldexp(1.0f, -22) * std::fabs(bias[j]) + floor_abs * (1 + cnorm);
      } else {
        bias[j] = kInf;  // padding: scores +inf, never a candidate
        emul[j] = eadd[j] = 0.0f;
      }
      for (int64_t i = 0; i < dp; ++i) {
        const float v0 = j < n_codes ? scale * crow[2 * i] : 0.0f;
        const float v1 = j < n_codes && 2 * i + 1 < d ? scale * crow[2 * i + 1] : 0.0f;
        dst[i * kNR * 2] = to_bf16(v0);
        dst[i * kNR * 2 + 1] = to_bf16(v1);
      }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - r0));
      const uint32_t* zp[kMR];
      for (int r = 0; r < mr; ++r) zp[r] = zbuf.data() + (r0 + r) * dp;
      for (int64_t pn = 0; pn < npan; ++pn) {
        kPanels[mr](zp, zn.data() + r0, dp, panels.data() + pn * dp * kNR * 2, bias.data() + pn * kNR,
                    emul.data() + pn * kNR, eadd.data() + pn * kNR, static_cast<int32_t>(k0 - ka + pn * kNR),
                    U.data() + r0, cand.data() + r0);
      }
      for (int r = 0; r < mr; ++r)
        if (cand[r0 + r].size() > 512) prune(cand[r0 + r], U[r0 + r]);
    }
  }
  // Exact re-check of the survivors, in code order (strict <: the lowest index wins a tie).
  for (int64_t r = 0; r < rows; ++r) {
    row_any(p.z_dtype, p.z, z_row(p, n0 + r), p.z_cs, d, zrow.data());
    float b = kInf, scale, bs;
    int64_t a = -1;
    if (std::isfinite(U[r])) {
      for (const Candidate& c : cand[r]) {
        if (c.lower > U[r]) continue;
        load_code(p, ka + c.k, crow.data(), &scale, &bs);
        const float s = exact_score(zrow.data(), crow.data(), d, scale, bs);
        if (s < b) {
          b = s;
          a = ka + c.k;
        }
      }
    }
    if (a < 0) {  // NaN / overflow in z: a full exact scan keeps the fp32 mode's answer
      a = -1;
      b = kInf;
      for (int64_t k = ka; k < kb; ++k) {
        load_code(p, k, crow.data(), &scale, &bs);
        const float s = exact_score(zrow.data(), crow.data(), d, scale, bs);
        if (s < b) {
          b = s;
          a = k;
        }
      }
    }
    if (a >= 0 && b < best[r]) {
      best[r] = b;
      best_idx[r] = a;
    }
  }
#else
  (void)p, (void)n0, (void)n1, (void)ka, (void)kb, (void)best, (void)best_idx;
#endif
}

}  // namespace genfast
