// 16-lane fp32 vectors (GCC vector extensions) with loads/stores from fp32, fp16 and bf16 storage.
// Written out instead of left to the auto-vectoriser, which on GCC 12 kept the modulate rows
// mostly scalar (reductions) and turned every _Float16 conversion into a libgcc call (~30 ns an
// element). A 16-lane vector is two 8-lane (32-byte) GCC vectors: 2 ymm registers in the AVX-512 and
// AVX2 target_clones variants (GENFAST_VEC_CLONES below), so no -march=native. It was one 64-byte
// vector before; GCC 12 has no register for that in the AVX2 clone and kept such values on the
// stack, moved 16 bytes at a time, and scalarised their compares and selects (2-core AVX2-only AMD
// EPYC: bf16 modulate forward 0.55x eager). Horizontal sums add the lanes in a fixed order (0..15).
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

// 32-byte vectors by value in always-inline helpers: the ABI note GCC prints does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace genfast {
namespace vec {

typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
// unaligned, may_alias views for loads and stores (memcpy of a vector went through the stack)
typedef float f32x8_mem __attribute__((vector_size(32), aligned(4), may_alias));
typedef uint16_t u16x8_mem __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint16_t u16x16_mem __attribute__((vector_size(32), aligned(2), may_alias));

// 16 fp32 lanes: lanes 0-7 in lo, 8-15 in hi; lane-wise arithmetic, with scalars on either side.
struct f32x16 {
  f32x8 lo, hi;
};
GENFAST_INLINE f32x16 operator+(f32x16 a, f32x16 b) { return {a.lo + b.lo, a.hi + b.hi}; }
GENFAST_INLINE f32x16 operator-(f32x16 a, f32x16 b) { return {a.lo - b.lo, a.hi - b.hi}; }
GENFAST_INLINE f32x16 operator*(f32x16 a, f32x16 b) { return {a.lo * b.lo, a.hi * b.hi}; }
GENFAST_INLINE f32x16 operator+(f32x16 a, float b) { return {a.lo + b, a.hi + b}; }
GENFAST_INLINE f32x16 operator-(f32x16 a, float b) { return {a.lo - b, a.hi - b}; }
GENFAST_INLINE f32x16 operator*(f32x16 a, float b) { return {a.lo * b, a.hi * b}; }
GENFAST_INLINE f32x16 operator+(float a, f32x16 b) { return {a + b.lo, a + b.hi}; }
GENFAST_INLINE f32x16 operator-(float a, f32x16 b) { return {a - b.lo, a - b.hi}; }
GENFAST_INLINE f32x16 operator*(float a, f32x16 b) { return {a * b.lo, a * b.hi}; }
GENFAST_INLINE f32x16& operator+=(f32x16& a, f32x16 b) { return a = a + b; }

GENFAST_INLINE float hsum(f32x16 v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v.lo[i];
  for (int i = 0; i < 8; ++i) s += v.hi[i];
  return s;
}

// (a cast between GCC vector types of one size reinterprets the bits)
GENFAST_INLINE f32x8 bits_to_f32(u32x8 u) { return (f32x8)u; }
GENFAST_INLINE u32x8 f32_to_bits(f32x8 f) { return (u32x8)f; }

// Lane masks by arithmetic and selects by bitwise ops (GCC 12 scalarised vector compares in the
// AVX2 clone while the vectors were 64 bytes; this form is plain integer SIMD on any width).
// All ones in the lanes where a < b, zeros elsewhere; only for lanes where a - b fits an int32
// (both under 2^31 here): the sign of the difference, spread by an arithmetic shift.
GENFAST_INLINE u32x8 less_mask(u32x8 a, u32x8 b) {
  return (u32x8)((i32x8)(a - b) >> 31);
}
// mask ? a : b, lane by lane
GENFAST_INLINE u32x8 select(u32x8 mask, u32x8 a, u32x8 b) { return (a & mask) | (b & ~mask); }
GENFAST_INLINE u32x8 fill(uint32_t v) { return u32x8{} + v; }

// fp16 bits -> fp32, exact: the exponent/mantissa moved into fp32 position is off by a factor
// 2^112 (bias 127 vs 15), which one multiply fixes for normal and subnormal values alike.
GENFAST_INLINE f32x8 half_bits_to_f32(u32x8 h) {
  const u32x8 sign = (h & 0x8000u) << 16;
  const u32x8 em = h & 0x7fffu;
  const f32x8 scaled = bits_to_f32(em << 13) * 0x1p112f;
  const u32x8 inf_nan = (em << 13) | 0x7f800000u;
  const u32x8 mag = select(less_mask(fill(0x7bffu), em), inf_nan, f32_to_bits(scaled));  // em >= 0x7c00
  return bits_to_f32(mag | sign);
}

// fp32 -> fp16 bits, round to nearest even, overflow to inf, NaN stays NaN: the value scaled into
// fp16 range is added to a power of two that pins the rounding position to fp16's last mantissa
// bit, so the FPU's own round-to-nearest-even does the rounding.
GENFAST_INLINE u32x8 f32_to_half_bits(f32x8 f) {
  const u32x8 w = f32_to_bits(f);
  const u32x8 sign = w & 0x80000000u;
  const u32x8 two_w = w + w;
  const f32x8 absf = bits_to_f32(w & 0x7fffffffu);
  f32x8 base = (absf * 0x1p112f) * 0x1p-110f;  // scale to fp16 exponent range, overflow to inf
  u32x8 bias = two_w & 0xff000000u;
  // subnormal results (bias < 0x71000000): a fixed rounding position
  bias = select(less_mask(bias >> 1, fill(0x38800000u)), fill(0x71000000u), bias);
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const u32x8 bits = f32_to_bits(base);
  const u32x8 nonsign = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
  const u32x8 nan = less_mask(fill(0x7f800000u), two_w >> 1);  // two_w > 0xff000000: f is a NaN
  return (sign >> 16) | select(nan, fill(0x7e00u), nonsign);
}

// fp32 -> bf16 (round to nearest even, as PyTorch; NaN stays a quiet NaN), the bf16 bits left in
// the high half of each 32-bit lane for store() to pick out. A float compare and a blend for NaN:
// the integer mask arithmetic it replaces cost ~20 % of the bf16 modulate forward (AVX2 AMD EPYC).
GENFAST_INLINE u32x8 f32_to_bf16_high(f32x8 f) {
  const u32x8 u = f32_to_bits(f);
  const i32x8 nan = f != f;
  return nan ? (u | 0x400000u) : u + 0x7fffu + ((u >> 16) & 1u);
}

GENFAST_INLINE u32x8 load_u16x8(const void* p) {
  return __builtin_convertvector(*reinterpret_cast<const u16x8_mem*>(p), u32x8);
}
GENFAST_INLINE void store_u16x8(void* p, u32x8 b) {
  *reinterpret_cast<u16x8_mem*>(p) = __builtin_convertvector(b, u16x8);
}

GENFAST_INLINE f32x16 load(const float* p) {
  return {*reinterpret_cast<const f32x8_mem*>(p), *reinterpret_cast<const f32x8_mem*>(p + 8)};
}
GENFAST_INLINE f32x16 load(const BFloat16* p) {
  return {bits_to_f32(load_u16x8(p) << 16), bits_to_f32(load_u16x8(p + 8) << 16)};
}
GENFAST_INLINE f32x16 load(const Half* p) {
  return {half_bits_to_f32(load_u16x8(p)), half_bits_to_f32(load_u16x8(p + 8))};
}

GENFAST_INLINE void store(float* p, f32x16 v) {
  *reinterpret_cast<f32x8_mem*>(p) = v.lo;
  *reinterpret_cast<f32x8_mem*>(p + 8) = v.hi;
}
GENFAST_INLINE void store(BFloat16* p, f32x16 v) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the odd 16-bit halves are the high ones");
  const u16x16 lo = (u16x16)f32_to_bf16_high(v.lo), hi = (u16x16)f32_to_bf16_high(v.hi);
  *reinterpret_cast<u16x16_mem*>(p) =
      __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
GENFAST_INLINE void store(Half* p, f32x16 v) {
  store_u16x8(p, f32_to_half_bits(v.lo));
  store_u16x8(p + 8, f32_to_half_bits(v.hi));
}

// Scalar twins for the tails (< 16 elements), with the same rounding as the vector paths.
GENFAST_INLINE float load1(const float* p) { return *p; }
GENFAST_INLINE float load1(const BFloat16* p) { return to_float(*p); }
GENFAST_INLINE float load1(const Half* p) {
  uint16_t b;
  std::memcpy(&b, p, 2);
  return half_bits_to_f32(fill(b))[0];
}
GENFAST_INLINE void store1(float* p, float v) { *p = v; }
GENFAST_INLINE void store1(BFloat16* p, float v) { *p = from_float<BFloat16>(v); }
GENFAST_INLINE void store1(Half* p, float v) {
  const uint16_t b = static_cast<uint16_t>(f32_to_half_bits(f32x8{} + v)[0]);
  std::memcpy(p, &b, 2);
}

}  // namespace vec
}  // namespace genfast
