// CUDA emulation, part 1 of 3: what a kernel body needs that does not touch the scheduler —
// qualifiers, dim3 and vector types, __half / __nv_bfloat16, math intrinsics, atomics.
// Included by cuda_emu.h (never on its own). Only the C++17 standard library (DESIGN.md §8).
//
// Qualifier mapping and its consequences for kernel authors:
//   __global__, __device__, __host__, __constant__  -> nothing (ordinary external linkage, as
//       nvcc's host side sees it). So: put a .cu file's kernels and helpers in an anonymous
//       namespace, and mark helpers in shared .cuh headers __forceinline__ (or template them);
//       a same-named non-inline helper in two .cu files is a link error here.
//   __forceinline__ -> inline + always_inline. Write "__device__ __forceinline__" or
//       "__device__ inline", never "__device__ __forceinline__ inline" (duplicate inline).
//   __shared__ -> static: correct because blocks run one at a time under the launch mutex.
//   __noinline__ is not mapped (glibc uses the same token in its attributes).
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <chrono>
#include <cmath>
#include <thread>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// __restrict__ is already a GCC keyword.

// ---------------------------------------------------------------------------------------------
// dim3 and the vector types (same members, sizes and alignments as CUDA's vector_types.h).
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define GENFAST_EMU_VEC2(N, T, A)                    \
  struct __attribute__((aligned(A))) N {             \
    T x, y;                                          \
  };                                                 \
  inline N make_##N(T x, T y) { return N{x, y}; }
#define GENFAST_EMU_VEC3(N, T)                               \
  struct N {                                                 \
    T x, y, z;                                               \
  };                                                         \
  inline N make_##N(T x, T y, T z) { return N{x, y, z}; }
#define GENFAST_EMU_VEC4(N, T, A)                                      \
  struct __attribute__((aligned(A))) N {                               \
    T x, y, z, w;                                                      \
  };                                                                   \
  inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }

GENFAST_EMU_VEC2(float2, float, 8)
GENFAST_EMU_VEC3(float3, float)
GENFAST_EMU_VEC4(float4, float, 16)
GENFAST_EMU_VEC2(double2, double, 16)
GENFAST_EMU_VEC2(int2, int, 8)
GENFAST_EMU_VEC3(int3, int)
GENFAST_EMU_VEC4(int4, int, 16)
GENFAST_EMU_VEC2(uint2, unsigned, 8)
GENFAST_EMU_VEC4(uint4, unsigned, 16)
GENFAST_EMU_VEC2(ushort2, unsigned short, 4)
GENFAST_EMU_VEC4(ushort4, unsigned short, 8)
GENFAST_EMU_VEC4(uchar4, unsigned char, 4)
GENFAST_EMU_VEC2(longlong2, long long, 16)
GENFAST_EMU_VEC2(ulonglong2, unsigned long long, 16)
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
#undef GENFAST_EMU_VEC2
#undef GENFAST_EMU_VEC3
#undef GENFAST_EMU_VEC4

constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// Bit casts and fp16 / bf16 conversions, bit-exact with the GPU's cvt.rn (round to nearest
// even, subnormals kept, overflow to inf). NaN becomes the canonical 0x7fff, as cvt produces.
namespace genfast_emu {

template <class To, class From>
inline To bit_cast(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast size mismatch");
  To t;
  memcpy(&t, &f, sizeof t);
  return t;
}

inline uint16_t f32_to_f16_bits(float f) {
  const uint32_t u = bit_cast<uint32_t>(f);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;                        // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: a half subnormal, = round(|f| * 2^24); exact product
    const float scaled = bit_cast<float>(a) * 16777216.0f;
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(nearbyintf(scaled)));
  }
  const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round to nearest even at bit 13
  return static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13));  // rebias 127 -> 15
}

inline float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {  // zero or subnormal: exact as m * 2^-24
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;
    return bit_cast<float>(bit_cast<uint32_t>(v) | sign);
  }
  if (e == 31) return bit_cast<float>(sign | 0x7f800000u | (m << 13));
  return bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}

inline uint16_t f32_to_bf16_bits(float f) {
  const uint32_t u = bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_f32(uint16_t b) { return bit_cast<float>(static_cast<uint32_t>(b) << 16); }

}  // namespace genfast_emu

// Storage-only half types: conversions to and from float, no arithmetic operators (kernels do
// their math in fp32; an operator missing here but present in cuda_fp16.h is a compile error
// under emulation, never a silent difference).
struct __align__(2) __half {
  unsigned short __x;
  __half() = default;
  __half(float f) : __x(genfast_emu::f32_to_f16_bits(f)) {}
  operator float() const { return genfast_emu::f16_bits_to_f32(__x); }
};
struct __align__(2) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(genfast_emu::f32_to_bf16_bits(f)) {}
  operator float() const { return genfast_emu::bf16_bits_to_f32(__x); }
};
// Element 0 (.x) sits in the low 16 bits of the packed register, as on the GPU.
struct __align__(4) __half2 {
  __half x, y;
};
struct __align__(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
using half = __half;
using half2 = __half2;

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__half(a), __half(b)}; }
inline __half2 __float2half2_rn(float a) { return __half2{__half(a), __half(a)}; }
inline __half2 __float22half2_rn(float2 v) { return __half2{__half(v.x), __half(v.y)}; }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline float2 __half22float2(__half2 h) { return float2{float(h.x), float(h.y)}; }
inline float __low2float(__half2 h) { return float(h.x); }
inline float __high2float(__half2 h) { return float(h.y); }

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 b; b.__x = u; return b; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __nv_bfloat162{__nv_bfloat16(v.x), __nv_bfloat16(v.y)}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{float(h.x), float(h.y)}; }
inline float __low2float(__nv_bfloat162 h) { return float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return float(h.y); }

// ---------------------------------------------------------------------------------------------
// Math. Exact versions of the GPU's approximate intrinsics: compare with tolerances. glibc's
// math.h already declares __expf, __logf, __sinf… (noexcept, C linkage), so those are macros.
#define __expf(x) ::expf(x)
#define __logf(x) ::logf(x)
#define __log2f(x) ::log2f(x)
#define __log10f(x) ::log10f(x)
#define __exp10f(x) ::powf(10.0f, (x))
#define __powf(x, y) ::powf((x), (y))
#define __sinf(x) ::sinf(x)
#define __cosf(x) ::cosf(x)
#define __tanf(x) ::tanf(x)
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x != x ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(floorf(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return static_cast<unsigned>(nearbyintf(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline int __float_as_int(float x) { return genfast_emu::bit_cast<int>(x); }
inline float __int_as_float(int x) { return genfast_emu::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return genfast_emu::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return genfast_emu::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return genfast_emu::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return genfast_emu::bit_cast<double>(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz(static_cast<unsigned>(x)) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll(static_cast<unsigned long long>(x)) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  __extension__ typedef unsigned __int128 u128;
  return static_cast<unsigned long long>((static_cast<u128>(a) * b) >> 64);
}
// CUDA's device min/max overloads (same-type ones; mixed types are ambiguous here).
#define GENFAST_EMU_MINMAX(T)                          \
  inline T min(T a, T b) { return b < a ? b : a; }    \
  inline T max(T a, T b) { return a < b ? b : a; }
GENFAST_EMU_MINMAX(int)
GENFAST_EMU_MINMAX(unsigned)
GENFAST_EMU_MINMAX(long)
GENFAST_EMU_MINMAX(unsigned long)
GENFAST_EMU_MINMAX(long long)
GENFAST_EMU_MINMAX(unsigned long long)
#undef GENFAST_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// Cache-hinted loads and stores are plain accesses on the CPU.
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

inline long long clock64() { return std::chrono::steady_clock::now().time_since_epoch().count(); }
inline void __nanosleep(unsigned ns) { std::this_thread::sleep_for(std::chrono::nanoseconds(ns)); }
// Fences order this thread's accesses; they are rarely needed between emulated threads, which
// synchronise through the barriers. (GCC warns that TSan does not model standalone fences.)
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---------------------------------------------------------------------------------------------
// Atomics: relaxed, as on the GPU, so under TSan they order nothing that a barrier should
// (a missing __syncthreads stays visible even when an atomic sits next to it). Return the old
// value. Only CUDA's overloads exist (no atomicAdd(long long*): CUDA has none).
#define GENFAST_EMU_ATOMIC_INT(T)                                                                  \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }            \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }          \
  inline T atomicCAS(T* p, T cmp, T v) {                                                           \
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);            \
    return cmp;                                                                                    \
  }                                                                                                \
  inline T atomicMax(T* p, T v) {                                                                  \
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                                  \
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {} \
    return old;                                                                                    \
  }                                                                                                \
  inline T atomicMin(T* p, T v) {                                                                  \
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                                  \
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {} \
    return old;                                                                                    \
  }                                                                                                \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }            \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }              \
  inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }
GENFAST_EMU_ATOMIC_INT(int)
GENFAST_EMU_ATOMIC_INT(unsigned)
GENFAST_EMU_ATOMIC_INT(unsigned long long)
#undef GENFAST_EMU_ATOMIC_INT
inline int atomicSub(int* p, int v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
inline long long atomicMax(long long* p, long long v) {
  long long old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
  return old;
}
inline long long atomicMin(long long* p, long long v) {
  long long old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
  return old;
}
inline float atomicExch(float* p, float v) {
  return __int_as_float(atomicExch(reinterpret_cast<int*>(p), __float_as_int(v)));
}

namespace genfast_emu {
// Floating-point add as a CAS loop on the bit pattern (the GPU does it in the memory system).
template <class F, class U>
inline F atomic_add_float(F* p, F v) {
  U* u = reinterpret_cast<U*>(p);
  U old = __atomic_load_n(u, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(u, &old, bit_cast<U>(static_cast<F>(bit_cast<F>(old) + v)), true,
                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
  return bit_cast<F>(old);
}
}  // namespace genfast_emu
inline float atomicAdd(float* p, float v) { return genfast_emu::atomic_add_float<float, uint32_t>(p, v); }
inline double atomicAdd(double* p, double v) { return genfast_emu::atomic_add_float<double, uint64_t>(p, v); }
