// 16-lane fp32 vectors (GCC vector extensions) with loads/stores from fp32, fp16 and bf16 storage.
// Written out instead of left to the auto-vectoriser, which on GCC 12 kept the modulate rows
// mostly scalar (reductions) and turned every _Float16 conversion into a libgcc call (~30 ns an
// element). The same source becomes 1 zmm, 2 ymm or 4 xmm registers in each target_clones
// variant (GENFAST_VEC_CLONES below), so no -march=native. Horizontal sums add the lanes in a fixed order.
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu/dtype.h"

#define GENFAST_INLINE inline __attribute__((always_inline))

// Clones picked by CPU *features*. dtype.h's GENFAST_CPU_CLONES names arch=skylake-avx512 /
// arch=haswell, which GCC 12 dispatches with __builtin_cpu_is (an Intel model check): on AMD
// EPYC (this machine: Zen, AVX-512) it always picks the SSE2 default. The x86-64-v4/v3 ISA
// levels are dispatched on features (v4: AVX-512 F/BW/VL/DQ, v3: AVX2/FMA/F16C).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GENFAST_VEC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GENFAST_VEC_CLONES
#endif

// 64-byte vectors by value in always-inline helpers: the ABI note GCC prints does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace genfast {
namespace vec {

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

GENFAST_INLINE f32x16 splat(float v) { return f32x16{} + v; }

GENFAST_INLINE float hsum(f32x16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

GENFAST_INLINE f32x16 bits_to_f32(u32x16 u) {
  f32x16 f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
GENFAST_INLINE u32x16 f32_to_bits(f32x16 f) {
  u32x16 u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// fp16 bits -> fp32, exact: the exponent/mantissa moved into fp32 position is off by a factor
// 2^112 (bias 127 vs 15), which one multiply fixes for normal and subnormal values alike.
GENFAST_INLINE f32x16 half_bits_to_f32(u32x16 h) {
  const u32x16 sign = (h & 0x8000u) << 16;
  const u32x16 em = h & 0x7fffu;
  const f32x16 scaled = bits_to_f32(em << 13) * 0x1p112f;
  const u32x16 inf_nan = (em << 13) | 0x7f800000u;
  const u32x16 mag = em >= 0x7c00u ? inf_nan : f32_to_bits(scaled);
  return bits_to_f32(mag | sign);
}

// fp32 -> fp16 bits, round to nearest even, overflow to inf, NaN stays NaN: the value scaled into
// fp16 range is added to a power of two that pins the rounding position to fp16's last mantissa
// bit, so the FPU's own round-to-nearest-even does the rounding.
GENFAST_INLINE u32x16 f32_to_half_bits(f32x16 f) {
  const u32x16 w = f32_to_bits(f);
  const u32x16 sign = w & 0x80000000u;
  const u32x16 two_w = w + w;
  const f32x16 absf = bits_to_f32(w & 0x7fffffffu);
  f32x16 base = (absf * 0x1p112f) * 0x1p-110f;  // scale to fp16 exponent range, overflow to inf
  u32x16 bias = two_w & 0xff000000u;
  bias = bias < 0x71000000u ? u32x16{} + 0x71000000u : bias;  // subnormal results: fixed position
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const u32x16 bits = f32_to_bits(base);
  const u32x16 nonsign = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
  return (sign >> 16) | (two_w > 0xff000000u ? u32x16{} + 0x7e00u : nonsign);
}

GENFAST_INLINE u32x16 f32_to_bf16_bits(f32x16 f) {
  const u32x16 u = f32_to_bits(f);
  const u32x16 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : rounded;  // NaN stays quiet NaN
}

GENFAST_INLINE f32x16 load(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
GENFAST_INLINE u32x16 load_u16(const void* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, u32x16);
}
GENFAST_INLINE f32x16 load(const BFloat16* p) { return bits_to_f32(load_u16(p) << 16); }
GENFAST_INLINE f32x16 load(const Half* p) { return half_bits_to_f32(load_u16(p)); }

GENFAST_INLINE void store(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }
GENFAST_INLINE void store_u16(void* p, u32x16 b) {
  const u16x16 h = __builtin_convertvector(b, u16x16);
  std::memcpy(p, &h, sizeof h);
}
GENFAST_INLINE void store(BFloat16* p, f32x16 v) { store_u16(p, f32_to_bf16_bits(v)); }
GENFAST_INLINE void store(Half* p, f32x16 v) { store_u16(p, f32_to_half_bits(v)); }

// Scalar twins for the tails (< 16 elements), with the same rounding as the vector paths.
GENFAST_INLINE float load1(const float* p) { return *p; }
GENFAST_INLINE float load1(const BFloat16* p) { return to_float(*p); }
GENFAST_INLINE float load1(const Half* p) {
  uint16_t b;
  std::memcpy(&b, p, 2);
  return half_bits_to_f32(u32x16{} + b)[0];
}
GENFAST_INLINE void store1(float* p, float v) { *p = v; }
GENFAST_INLINE void store1(BFloat16* p, float v) { *p = from_float<BFloat16>(v); }
GENFAST_INLINE void store1(Half* p, float v) {
  const uint16_t b = static_cast<uint16_t>(f32_to_half_bits(splat(v))[0]);
  std::memcpy(p, &b, 2);
}

}  // namespace vec
}  // namespace genfast
