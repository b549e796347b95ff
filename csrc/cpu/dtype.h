// Storage types of the CPU kernels and their fp32 conversions, written so loops over them
// vectorise. Math is always fp32; these only load and store.
#pragma once
#include <cstdint>
#include <cstring>

// Hot loops are compiled for several ISAs and the best is picked when the module loads (an ifunc),
// never -march=native (DESIGN.md §2). Feature names, not "arch=": GCC resolves "arch=haswell" by
// CPU model (Intel only), so an AMD EPYC with AVX-512 fell back to the SSE2 clone (measured 4x
// slower in bf16). fp16/bf16 conversions are integer code, so no clone depends on F16C.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GENFAST_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GENFAST_CPU_CLONES
#endif

namespace genfast {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// __builtin_bit_cast rather than memcpy: GCC 12 fails to vectorise the fp16 store loop through memcpy.
inline float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// Branch-free select (the vectoriser if-converts these where it gives up on nested ?:).
inline uint32_t select(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

inline float to_float(float v) { return v; }
inline float to_float(Half v) {
  // Branch-free (vectorisable) IEEE half -> float: rebias the exponent; inf/NaN keep an all-ones
  // exponent; subnormals are renormalised by one float subtraction.
  const uint32_t h = v.bits;
  const uint32_t magnitude = (h & 0x7fffu) << 13;
  const uint32_t exponent = magnitude & (0x7c00u << 13);
  const uint32_t normal = magnitude + ((127u - 15u) << 23);
  const uint32_t special = normal + ((128u - 16u) << 23);
  const uint32_t sub = float_to_bits(bits_to_float(normal + (1u << 23)) - bits_to_float(113u << 23));
  const uint32_t out = select(exponent == (0x7c00u << 13), special, select(exponent == 0, sub, normal));
  return bits_to_float(out | ((h & 0x8000u) << 16));
}
inline float to_float(BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }

template <typename T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) { return f; }
template <>
inline Half from_float<Half>(float f) {
  // float -> IEEE half, round to nearest even, branch-free: overflow to inf, NaN stays NaN,
  // subnormal results rounded by one float addition (the FPU does the rounding).
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t sub = float_to_bits(bits_to_float(a) + bits_to_float(126u << 23)) - (126u << 23);
  const uint32_t normal = (a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t big = select(a > 0x7f800000u, 0x7e00u, 0x7c00u);
  const uint32_t h = select(a >= ((127u + 16u) << 23), big, select(a < (113u << 23), sub, normal));
  return Half{static_cast<uint16_t>(h | sign)};
}
template <>
inline BFloat16 from_float<BFloat16>(float f) {
  // Round to nearest even, as PyTorch does; NaN stays a (quiet) NaN.
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return BFloat16{static_cast<uint16_t>(select(nan, (u >> 16) | 0x40u, rounded))};
}

}  // namespace genfast
