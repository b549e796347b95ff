// Storage types of the CPU kernels and their fp32 conversions, written so loops over them
// vectorise. Math is always fp32; these only load and store.
#pragma once
#include <cstdint>
#include <cstring>

// Hot loops are compiled for several ISAs and the best is picked when the module loads (an ifunc),
// never -march=native (DESIGN.md §2). x86-64-v3 brings AVX2+FMA+F16C (hardware fp16 conversion),
// v4 AVX-512 F/BW/DQ/VL. Not "arch=skylake-avx512"/"arch=haswell": GCC dispatches those with
// __builtin_cpu_is (the CPU *model*), so every AMD CPU got the baseline SSE2 clone; the x86-64-vN
// levels dispatch on feature bits (GCC >= 12).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GENFAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GENFAST_CPU_CLONES
#endif

namespace genfast {

using Half = _Float16;
struct BFloat16 {
  uint16_t bits;
};

inline float to_float(float v) { return v; }
inline float to_float(Half v) { return static_cast<float>(v); }
inline float to_float(BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) { return f; }
template <>
inline Half from_float<Half>(float f) { return static_cast<Half>(f); }
template <>
inline BFloat16 from_float<BFloat16>(float f) {
  // Round to nearest even, as PyTorch does; NaN stays a (quiet) NaN.
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return BFloat16{static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded)};
}

}  // namespace genfast
