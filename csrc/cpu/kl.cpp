// Reparameterized sample + KL on the CPU, forward and backward (math and layout in kl.h, the
// noise stream in philox.h).
//
// Work items are (row, column chunk) pairs under OpenMP. Inside one, blocks of kBlock elements:
// the Philox groups covering the block are computed four words at a time into a small buffer
// (a loop over groups that GCC vectorises: 32-bit lanes, widening multiplies, polynomial log /
// sincos), then one vectorised pass does the elementwise math. Per-row KL sums: fp32 within a
// block (lane-parallel via omp simd), double across blocks, the chunks of a row added in order at
// the end, so the result does not depend on the thread count. Items are handed out dynamically:
// on a shared 2-core machine a descheduled thread then delays one item, not half the work. setup.py compiles csrc/cpu with
// -fno-math-errno: otherwise sqrtf keeps a scalar errno path and the noise loop does not vectorise.
#include <omp.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive inside avx512fintrin.h
#include <immintrin.h>
#define GENFAST_HAVE_AVX512_PHILOX 1  // an AVX-512F Philox, picked at run time (philox_block)
#endif

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/dtype.h"
#include "kl.h"
#include "philox.h"

namespace genfast {
namespace {

constexpr int64_t kBlock = 256;            // elements a noise buffer covers (fits L1 with the rest)
constexpr int64_t kChunk = 16384;          // elements per OpenMP work item
constexpr int64_t kParallelMin = 1 << 14;  // below this, threading costs more than it saves

constexpr int64_t kGroupsMax = 80;  // groups a block touches (<= kBlock / 4 + 1), padded to 16

#ifdef GENFAST_HAVE_AVX512_PHILOX
// The 64-bit products of the 16 words in a with the constant m: vpmuludq on the even and the odd
// lanes, low and high halves regathered (GCC's auto-vectorised widening multiply needs twice
// the instructions: zero-extend, vpmullq, extract, permute).
__attribute__((target("avx512f"))) inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i pe = _mm512_mul_epu32(a, m);
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
}

// Philox4x32-10 words of counters (base + j, offset) for j < groups, 16 counters at a time.
__attribute__((target("avx512f"))) void philox_words_avx512(uint64_t base, int64_t groups, uint64_t offset,
                                                            uint64_t seed, uint32_t* w0, uint32_t* w1, uint32_t* w2,
                                                            uint32_t* w3) {
  const uint32_t base_lo = static_cast<uint32_t>(base);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(philox::kM0)), m1 = _mm512_set1_epi32(static_cast<int>(philox::kM1));
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(base_lo));
  const __m512i vhi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32)));
  for (int64_t j = 0; j < groups; j += 16) {
    __m512i c0 = _mm512_add_epi32(_mm512_add_epi32(vlo, _mm512_set1_epi32(static_cast<int>(j))), lane);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, vlo);  // the low word wrapped
    __m512i c1 = _mm512_mask_add_epi32(vhi, carry, vhi, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
    __m512i c3 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int i = 0; i < 10; ++i) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0, m0, hi0, lo0);
      mulhilo16(c2, m1, hi1, lo1);
      c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // a ^ b ^ c
      c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
      c1 = lo1;
      c3 = lo0;
      k0 += philox::kW0;
      k1 += philox::kW1;
    }
    _mm512_storeu_si512(w0 + j, c0);
    _mm512_storeu_si512(w1 + j, c1);
    _mm512_storeu_si512(w2 + j, c2);
    _mm512_storeu_si512(w3 + j, c3);
  }
}
#endif

// The Philox words of `groups` counters (base + j, offset), portable (vectorised by GCC).
GENFAST_CPU_CLONES void philox_words(uint64_t base, int64_t groups, uint64_t offset, uint64_t seed,
                                     uint32_t* __restrict w0, uint32_t* __restrict w1, uint32_t* __restrict w2,
                                     uint32_t* __restrict w3) {
  const uint32_t base_lo = static_cast<uint32_t>(base), base_hi = static_cast<uint32_t>(base >> 32);
  const uint32_t o_lo = static_cast<uint32_t>(offset), o_hi = static_cast<uint32_t>(offset >> 32);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t j = 0; j < groups; ++j) {
    uint32_t c0 = base_lo + static_cast<uint32_t>(j);
    uint32_t c1 = base_hi + (c0 < base_lo ? 1u : 0u);  // carry into the high word
    uint32_t c2 = o_lo, c3 = o_hi;
    philox::philox4x32_10(c0, c1, c2, c3, k0, k1);
    w0[j] = c0, w1[j] = c1, w2[j] = c2, w3[j] = c3;
  }
}

// Normals from the words, interleaved into buf (group j's four normals at 4j .. 4j + 3).
GENFAST_CPU_CLONES void normals_from_words(int64_t groups, const uint32_t* __restrict w0, const uint32_t* __restrict w1,
                                           const uint32_t* __restrict w2, const uint32_t* __restrict w3,
                                           float* __restrict buf) {
  float n0[kGroupsMax], n1[kGroupsMax], n2[kGroupsMax], n3[kGroupsMax];
  for (int64_t j = 0; j < groups; ++j) {
    philox::box_muller(w0[j], w1[j], n0[j], n1[j]);
    philox::box_muller(w2[j], w3[j], n2[j], n3[j]);
  }
  for (int64_t j = 0; j < groups; ++j) {
    buf[4 * j] = n0[j];
    buf[4 * j + 1] = n1[j];
    buf[4 * j + 2] = n2[j];
    buf[4 * j + 3] = n3[j];
  }
}

#ifdef GENFAST_HAVE_AVX512_PHILOX
const bool kAvx512 = __builtin_cpu_supports("avx512f");
#endif

// eps[0 .. n) for global elements g0 .. g0 + n (n <= kBlock): the normals of the groups covering
// them, written interleaved so eps = buf + (g0 & 3).
void philox_block(uint64_t g0, int64_t n, uint64_t seed, uint64_t offset, float* __restrict buf) {
  const uint64_t first = g0 >> 2;
  const int64_t groups = static_cast<int64_t>(((g0 + n - 1) >> 2) - first + 1);
  alignas(64) uint32_t w0[kGroupsMax], w1[kGroupsMax], w2[kGroupsMax], w3[kGroupsMax];
#ifdef GENFAST_HAVE_AVX512_PHILOX
  if (kAvx512)
    philox_words_avx512(first, groups, offset, seed, w0, w1, w2, w3);
  else
#endif
    philox_words(first, groups, offset, seed, w0, w1, w2, w3);
  normals_from_words(groups, w0, w1, w2, w3, buf);
}

inline float clamp_lv(float lv, const KLCommon& c) { return kl_clamp(lv, c.clamp, c.clamp_lo, c.clamp_hi); }

// One block of the forward over contiguous columns; returns the block's KL sum (fp32).
template <typename T>
GENFAST_CPU_CLONES float forward_contiguous(const T* __restrict mu, const T* __restrict lv, const float* __restrict eps,
                                            T* __restrict z, float* __restrict kl, int64_t n, int32_t clamp, float lo,
                                            float hi) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float m = to_float(mu[i]);
    const float l = kl_clamp(to_float(lv[i]), clamp, lo, hi);
    const float s = philox::exp_any(0.5f * l);
    z[i] = from_float<T>(m + eps[i] * s);
    const float k = 0.5f * (m * m + s * s - 1.0f - l);
    if (kl) kl[i] = k;
    sum += k;
  }
  return sum;
}

template <typename T>
double forward_item(const KLForwardParams& p, int64_t r, int64_t c0, int64_t c1, uint64_t seed, uint64_t offset) {
  const KLCommon& in = p.in;
  const T* mu = static_cast<const T*>(in.mu) + r * in.mu_rs;
  const T* lv = static_cast<const T*>(in.logvar) + r * in.lv_rs;
  const T* nz = in.noise ? static_cast<const T*>(in.noise) + r * in.n_rs : nullptr;
  T* z = static_cast<T*>(p.z) + r * p.z_rs;
  const bool contiguous = in.mu_cs == 1 && in.lv_cs == 1 && p.z_cs == 1 && (!nz || in.n_cs == 1) &&
                          (p.kl_per_row || p.kl_cs == 1);
  alignas(64) float buf[kBlock + 8];
  alignas(64) float klbuf[kBlock];
  double total = 0.0;
  for (int64_t c = c0; c < c1; c += kBlock) {
    const int64_t n = std::min(kBlock, c1 - c);
    const float* eps;
    if (nz) {
      for (int64_t i = 0; i < n; ++i) buf[i] = to_float(nz[(c + i) * in.n_cs]);
      eps = buf;
    } else {
      const uint64_t g0 = static_cast<uint64_t>(r * in.cols + c);
      philox_block(g0, n, seed, offset, buf);
      eps = buf + (g0 & 3);
    }
    if (contiguous) {
      float* kl = p.kl_per_row ? nullptr : p.kl + r * p.kl_rs + c;
      total += forward_contiguous<T>(mu + c, lv + c, eps, z + c, kl, n, in.clamp, in.clamp_lo, in.clamp_hi);
      continue;
    }
    float sum = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float m = to_float(mu[(c + i) * in.mu_cs]);
      const float l = clamp_lv(to_float(lv[(c + i) * in.lv_cs]), in);
      const float s = philox::exp_any(0.5f * l);
      z[(c + i) * p.z_cs] = from_float<T>(m + eps[i] * s);
      klbuf[i] = 0.5f * (m * m + s * s - 1.0f - l);
      if (!p.kl_per_row) p.kl[r * p.kl_rs + (c + i) * p.kl_cs] = klbuf[i];
      sum += klbuf[i];
    }
    total += sum;
  }
  return total;
}

// gk: the KL gradient, per element (kElemG) or one value g for the whole block (per-row KL).
// has_dz / has_g: whether z / the KL had a gradient at all (kl_dlogvar, csrc/kl.h).
template <typename T, bool kElemG>
GENFAST_CPU_CLONES void backward_contiguous(const T* __restrict mu, const T* __restrict lv, const float* __restrict eps,
                                            const T* __restrict dz, const float* __restrict gk, float g,
                                            T* __restrict dmu, T* __restrict dlv, int64_t n, int32_t clamp, float lo,
                                            float hi, bool has_dz, bool has_g) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float m = to_float(mu[i]);
    const float l0 = to_float(lv[i]);
    const float s = philox::exp_any(0.5f * kl_clamp(l0, clamp, lo, hi));
    const float d = to_float(dz[i]);
    const float gi = kElemG ? gk[i] : g;
    dmu[i] = from_float<T>(d + gi * m);
    dlv[i] = from_float<T>(kl_dlogvar(l0, clamp, lo, hi, s, d, eps[i], gi, has_dz, has_g));
  }
}

template <typename T>
void backward_item(const KLBackwardParams& p, int64_t r, int64_t c0, int64_t c1, uint64_t seed, uint64_t offset) {
  const KLCommon& in = p.in;
  const T* mu = static_cast<const T*>(in.mu) + r * in.mu_rs;
  const T* lv = static_cast<const T*>(in.logvar) + r * in.lv_rs;
  const T* nz = in.noise ? static_cast<const T*>(in.noise) + r * in.n_rs : nullptr;
  const T* dz = p.dz ? static_cast<const T*>(p.dz) + r * p.dz_rs : nullptr;
  const float* gk = p.gkl ? p.gkl + r * p.gkl_rs : nullptr;
  T* dmu = static_cast<T*>(p.dmu) + r * p.dmu_rs;
  T* dlv = static_cast<T*>(p.dlogvar) + r * p.dlv_rs;
  const bool contiguous = in.mu_cs == 1 && in.lv_cs == 1 && p.dmu_cs == 1 && p.dlv_cs == 1 &&
                          (!dz || p.dz_cs == 1) && (!nz || in.n_cs == 1) && (!gk || p.gkl_cs <= 1);
  const bool elem_g = gk && p.gkl_cs == 1;
  const float g_row = gk && p.gkl_cs == 0 ? gk[0] : 0.0f;
  alignas(64) float buf[kBlock + 8];
  alignas(64) T zeros[kBlock];  // dz when z was not used
  if (!dz) std::fill(zeros, zeros + kBlock, from_float<T>(0.0f));
  for (int64_t c = c0; c < c1; c += kBlock) {
    const int64_t n = std::min(kBlock, c1 - c);
    const float* eps = buf;
    if (!dz) {
      std::fill(buf, buf + n, 0.0f);  // eps only multiplies dz: nothing to regenerate
    } else if (nz) {
      for (int64_t i = 0; i < n; ++i) buf[i] = to_float(nz[(c + i) * in.n_cs]);
    } else {
      const uint64_t g0 = static_cast<uint64_t>(r * in.cols + c);
      philox_block(g0, n, seed, offset, buf);
      eps = buf + (g0 & 3);
    }
    if (contiguous) {
      const T* d = dz ? dz + c : zeros;
      if (elem_g)
        backward_contiguous<T, true>(mu + c, lv + c, eps, d, gk + c, 0.0f, dmu + c, dlv + c, n, in.clamp, in.clamp_lo,
                                     in.clamp_hi, dz != nullptr, true);
      else
        backward_contiguous<T, false>(mu + c, lv + c, eps, d, nullptr, g_row, dmu + c, dlv + c, n, in.clamp,
                                      in.clamp_lo, in.clamp_hi, dz != nullptr, gk != nullptr);
      continue;
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t cc = c + i;
      const float m = to_float(mu[cc * in.mu_cs]);
      const float l0 = to_float(lv[cc * in.lv_cs]);
      const float s = philox::exp_any(0.5f * clamp_lv(l0, in));
      const float d = dz ? to_float(dz[cc * p.dz_cs]) : 0.0f;
      const float g = gk ? gk[cc * p.gkl_cs] : 0.0f;
      dmu[cc * p.dmu_cs] = from_float<T>(d + g * m);
      const float dl = kl_dlogvar(l0, in.clamp, in.clamp_lo, in.clamp_hi, s, d, eps[i], g, dz != nullptr,
                                  gk != nullptr);
      dlv[cc * p.dlv_cs] = from_float<T>(dl);
    }
  }
}

// (seed, offset) from the [2] int64 tensor, or zeros when explicit noise is used.
inline void read_seed(const KLCommon& in, uint64_t& seed, uint64_t& offset) {
  seed = in.seed && !in.noise ? static_cast<uint64_t>(in.seed[0]) : 0;
  offset = in.seed && !in.noise ? static_cast<uint64_t>(in.seed[1]) : 0;
}

template <typename T>
void forward(const KLForwardParams& p) {
  uint64_t seed, offset;
  read_seed(p.in, seed, offset);
  const int64_t chunks = (p.in.cols + kChunk - 1) / kChunk;
  const int64_t items = p.in.rows * chunks;
  std::vector<double> partial(p.kl_per_row ? items : 0);
#pragma omp parallel for schedule(dynamic, 1) if (p.in.rows * p.in.cols >= kParallelMin)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t r = i / chunks, c0 = (i % chunks) * kChunk;
    const double s = forward_item<T>(p, r, c0, std::min(p.in.cols, c0 + kChunk), seed, offset);
    if (p.kl_per_row) partial[i] = s;
  }
  if (!p.kl_per_row) return;
  for (int64_t r = 0; r < p.in.rows; ++r) {
    double s = 0.0;
    for (int64_t k = 0; k < chunks; ++k) s += partial[r * chunks + k];
    p.kl[r * p.kl_rs] = static_cast<float>(s);
  }
}

template <typename T>
void backward(const KLBackwardParams& p) {
  uint64_t seed, offset;
  read_seed(p.in, seed, offset);
  const int64_t chunks = (p.in.cols + kChunk - 1) / kChunk;
  const int64_t items = p.in.rows * chunks;
#pragma omp parallel for schedule(dynamic, 1) if (p.in.rows * p.in.cols >= kParallelMin)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t r = i / chunks, c0 = (i % chunks) * kChunk;
    backward_item<T>(p, r, c0, std::min(p.in.cols, c0 + kChunk), seed, offset);
  }
}

}  // namespace

void kl_forward_cpu(const KLForwardParams& p) {
  if (p.in.rows == 0) return;
  if (p.in.cols == 0) {
    if (p.kl_per_row)
      for (int64_t r = 0; r < p.in.rows; ++r) p.kl[r * p.kl_rs] = 0.0f;
    return;
  }
  switch (p.in.dtype) {
    case kFloat32: forward<float>(p); break;
    case kFloat16: forward<Half>(p); break;
    case kBFloat16: forward<BFloat16>(p); break;
  }
}

void kl_backward_cpu(const KLBackwardParams& p) {
  if (p.in.rows == 0 || p.in.cols == 0) return;
  switch (p.in.dtype) {
    case kFloat32: backward<float>(p); break;
    case kFloat16: backward<Half>(p); break;
    case kBFloat16: backward<BFloat16>(p); break;
  }
}

}  // namespace genfast
