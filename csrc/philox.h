// Counter-based normal noise shared by the CPU and CUDA kernels (and the emulated CUDA build):
// Philox4x32-10 and a branch-free Box-Muller transform, written so that GCC vectorises loops
// over it and nvcc inlines it. No libm calls: log, exp and sin/cos are polynomials here, so the
// C++ and CUDA kernels compute the same formulas (the bits of Philox are identical everywhere;
// the normals agree to a few ulp, FMA contraction being the compiler's choice).
//
// The stream (genfast/reference.py has the same generator in plain PyTorch, the oracle):
//   element g of a call (g = row * cols + col, the logical row-major index) takes output g % 4 of
//   philox4x32_10(counter = {lo(g / 4), hi(g / 4), lo(offset), hi(offset)}, key = {lo(seed), hi(seed)})
//   outputs (x0, x1) -> normals (n0, n1), (x2, x3) -> (n2, n3) by Box-Muller:
//     u = ((x_even >> 8) + 1) * 2^-24 in (0, 1],  a = (x_odd >> 8) * 2^-24 in [0, 1) (turns)
//     n_even = sqrt(-2 ln u) cos(2 pi a),  n_odd = sqrt(-2 ln u) sin(2 pi a)
// References: Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC'11, Random123);
// Box & Muller (1958).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GENFAST_HD __host__ __device__ __forceinline__
#else
#define GENFAST_HD inline __attribute__((always_inline))
#endif

namespace genfast {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
constexpr float kTwoPow24Inv = 5.9604644775390625e-08f;  // 2^-24

GENFAST_HD uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

GENFAST_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Philox4x32 with 10 rounds; c0..c3 hold the counter on entry and the random words on exit.
GENFAST_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10  // straight-line code, so loops over counters vectorise
#endif
  for (int i = 0; i < 10; ++i) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kW0;
    k1 += kW1;
  }
}

// ln(u) for u in (0, 1] (normal floats): u = m 2^e with m in [sqrt(1/2), sqrt(2)), then
// ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, odd series to s^9 (error < 2e-9).
GENFAST_HD float log_unit(float u) {
  const uint32_t b = f2u(u);
  int32_t e = static_cast<int32_t>(b >> 23) - 127;
  float m = u2f((b & 0x007FFFFFu) | 0x3F800000u);
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  const float p = s2 * (0.333333333f + s2 * (0.2f + s2 * (0.142857143f + s2 * 0.111111111f)));
  const float fe = static_cast<float>(e);
  return fe * 0.693145752f + (fe * 1.42860677e-06f + (2.0f * s + 2.0f * s * p));  // ln2 = hi + lo
}

// sin and cos of 2 pi a for a = k 2^-24, k a 24-bit integer: the quadrant q = round(4a) is split
// off in integers (exact), leaving |x| <= pi/4 for Taylor polynomials (error < 2e-9).
GENFAST_HD void sincos_turns24(int32_t k, float& s, float& c) {
  const int32_t q = (k + (1 << 21)) >> 22;
  const float x = static_cast<float>(k - (q << 22)) * (6.28318530717958648f * kTwoPow24Inv);
  const float x2 = x * x;
  const float sp = x + x * x2 * (-0.166666667f + x2 * (8.33333333e-3f + x2 * (-1.98412698e-4f + x2 * 2.75573192e-6f)));
  const float cp = 1.0f + x2 * (-0.5f + x2 * (4.16666667e-2f + x2 * (-1.38888889e-3f + x2 * (2.48015873e-5f + x2 * -2.75573192e-7f))));
  const bool odd = (q & 1) != 0;
  const float ss = odd ? cp : sp, cc = odd ? sp : cp;
  s = (q & 2) ? -ss : ss;
  c = ((q + 1) & 2) ? -cc : cc;
}

// Two normals from two random words (Box-Muller), the first from the cosine.
GENFAST_HD void box_muller(uint32_t xu, uint32_t xa, float& n_cos, float& n_sin) {
  const float u = static_cast<float>(static_cast<int32_t>((xu >> 8) + 1)) * kTwoPow24Inv;
  const float r = sqrtf(-2.0f * log_unit(u));
  float s, c;
  sincos_turns24(static_cast<int32_t>(xa >> 8), s, c);
  n_cos = r * c;
  n_sin = r * s;
}

// The four normals of Philox group `group` (elements 4 group .. 4 group + 3).
GENFAST_HD void normals4(uint64_t group, uint64_t seed, uint64_t offset, float& n0, float& n1, float& n2, float& n3) {
  uint32_t c0 = static_cast<uint32_t>(group), c1 = static_cast<uint32_t>(group >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller(c0, c1, n0, n1);
  box_muller(c2, c3, n2, n3);
}

// e^x for any float x (inf above ~88.72, 0 below -104, NaN kept), ~2 ulp: x = n ln2 + r with
// |r| <= ln2 / 2 (Cody-Waite), a degree-7 Taylor polynomial for e^r, and 2^n applied as two
// halves so that n = 128 and the subnormal range need no special case.
GENFAST_HD float exp_any(float x) {
  const float xc = x < -104.0f ? -104.0f : (x > 88.7228317f ? 88.7228317f : x);
  const float nf = (xc * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest integer
  const float r = (xc - nf * 0.693145752f) - nf * 1.42860677e-06f;
  const float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.166666667f + r * (4.16666667e-2f + r * (8.33333333e-3f +
                  r * (1.38888889e-3f + r * 1.98412698e-4f))))));
  const int32_t n = static_cast<int32_t>(nf), h = n >> 1;
  const float y = p * u2f(static_cast<uint32_t>(h + 127) << 23) * u2f(static_cast<uint32_t>(n - h + 127) << 23);
  const float inf = u2f(0x7F800000u);
  return x != x ? x : (x > 88.7228317f ? inf : (x < -104.0f ? 0.0f : y));
}

}  // namespace philox
}  // namespace genfast
