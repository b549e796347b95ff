// Tensor-core wrappers for sm_80+ (also run on Hopper): mma.sync m16n8k16 (bf16 / fp16 in,
// fp32 accumulate), ldmatrix m8n8 .x1/.x2/.x4 (+ .trans), and packing two floats into a bf16x2 /
// f16x2 register (cp.async: csrc/cuda/common.cuh). Include after "cuda/common.cuh".
//
// Under nvcc each wrapper is one inline PTX instruction. Under GENFAST_EMULATE each has a twin
// that follows the PTX ISA fragment layouts lane by lane (DESIGN.md §8), so a kernel that gets a
// layout wrong fails on the CPU as it would on the GPU. The twins are warp collectives: every
// lane offers 64 bits and reads back all 32 lanes' offers (genfast_emu::warp_collective), which is
// what three __shfl_sync per source lane would do, in one meeting instead of 32.
//
// Layouts (PTX ISA, "Warp-level matrix fragments", m16n8k16 with .f16/.bf16; g = lane / 4 the
// group, t = lane % 4 the thread in the group; register i of a lane holds two 16-bit elements,
// element 2i in the LOW half):
//   A 16x16 row-major, 4 regs:  a0 (g,   2t..2t+1)  a1 (g+8, 2t..2t+1)
//                               a2 (g, 2t+8..2t+9)  a3 (g+8, 2t+8..2t+9)
//   B 16x8 "col" (k x n), 2 regs: b0 (k = 2t..2t+1, n = g)   b1 (k = 2t+8..2t+9, n = g)
//   C/D 16x8 fp32, 4 floats:     c0,c1 (g, 2t..2t+1)   c2,c3 (g+8, 2t..2t+1)
//   ldmatrix m8n8.xN: lane 8m+r supplies the (16-byte aligned) shared address of row r of matrix m
//     (m < N; other lanes' addresses are ignored); register m of lane l receives matrix m's
//     row l/4, elements 2(l%4), 2(l%4)+1. With .trans it receives elements (2(l%4), l/4) and
//     (2(l%4)+1, l/4) instead, i.e. the transposed matrix's row l/4.
#pragma once

#include <stdint.h>

namespace genfast {
namespace dev {

// ---- packing ------------------------------------------------------------------------------------
// lo goes to the low half (element 0), hi to the high half (element 1). Note the operand order
// of cvt.rn.*x2.f32 d, a, b: a lands in the HIGH half.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
#ifdef GENFAST_EMULATE
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
#else
  uint32_t d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
#endif
}
__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
#ifdef GENFAST_EMULATE
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(lo))) |
         (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16);
#else
  uint32_t d;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
#endif
}
template <bool BF16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (BF16) return pack_bf16x2(lo, hi);
  else return pack_f16x2(lo, hi);
}

// One 16-bit element (the low half when hi = false) of a packed register, as float.
template <bool BF16>
__device__ __forceinline__ float unpack_half(uint32_t r, bool hi) {
  const unsigned short u = static_cast<unsigned short>(hi ? r >> 16 : r & 0xffffu);
  if constexpr (BF16) return __uint_as_float(static_cast<uint32_t>(u) << 16);
  else return __half2float(__ushort_as_half(u));
}

#ifdef GENFAST_EMULATE
namespace emu_mma {
// Every lane offers v and gets all 32 lanes' offers; all 32 lanes must take part.
__device__ __forceinline__ void warp_allgather(uint64_t v, uint64_t (&all)[32], const char* what) {
  genfast_emu::warp_collective(genfast_emu::kUser, 0xffffffffu, v, [&](const uint64_t* vals, uint32_t done) {
    if (done != 0xffffffffu) {
      char buf[128];
      snprintf(buf, sizeof buf, "%s needs all 32 lanes of the warp, got lanes 0x%08x", what, done);
      genfast_emu::fail(*genfast_emu::self()->block, buf);
    }
    for (int i = 0; i < 32; ++i) all[i] = vals[i];
    return uint64_t(0);
  });
}

// d = a * b + c for one lane, from every lane's a (4 regs) and b (2 regs).
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          const float (&c)[4]) {
  uint64_t a01[32], a23[32], bb[32];
  warp_allgather(a[0] | (uint64_t(a[1]) << 32), a01, "mma.sync");
  warp_allgather(a[2] | (uint64_t(a[3]) << 32), a23, "mma.sync");
  warp_allgather(b[0] | (uint64_t(b[1]) << 32), bb, "mma.sync");
  // A(r, k): held by lane 4*(r%8) + (k%8)/2, register (r/8) + 2*(k/8), half k%2.
  auto A = [&](int r, int k) {
    const int lane = 4 * (r & 7) + ((k & 7) >> 1), reg = (r >> 3) + 2 * (k >> 3);
    const uint64_t w = reg < 2 ? a01[lane] : a23[lane];
    return unpack_half<BF16>(static_cast<uint32_t>(w >> (32 * (reg & 1))), k & 1);
  };
  // B(k, n): held by lane 4*n + (k%8)/2, register k/8, half k%2.
  auto B = [&](int k, int n) {
    const int lane = 4 * n + ((k & 7) >> 1);
    return unpack_half<BF16>(static_cast<uint32_t>(bb[lane] >> (32 * (k >> 3))), k & 1);
  };
  const int lane = genfast_emu::lane_id(), g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i >> 1), n = 2 * t + (i & 1);
    float acc = 0.0f;  // products of 16-bit values are exact in fp32
    for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, n);
    d[i] = acc + c[i];
  }
}

template <int N, bool TRANS>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* row_addr) {
  uint64_t addr[32];
  warp_allgather(reinterpret_cast<uintptr_t>(row_addr), addr, "ldmatrix");
  const int lane = genfast_emu::lane_id();
  for (int m = 0; m < N; ++m) {
    for (int row = 0; row < 8; ++row)
      if (addr[8 * m + row] & 15u) {
        char buf[96];
        snprintf(buf, sizeof buf, "ldmatrix: lane %d's row address is not 16-byte aligned", 8 * m + row);
        genfast_emu::fail(*genfast_emu::self()->block, buf);
      }
    // element (row, col) of matrix m
    auto elem = [&](int row, int col) {
      return reinterpret_cast<const unsigned short*>(static_cast<uintptr_t>(addr[8 * m + row]))[col];
    };
    const int row = lane >> 2, col = 2 * (lane & 3);
    const unsigned short lo = TRANS ? elem(col, row) : elem(row, col);
    const unsigned short hi = TRANS ? elem(col + 1, row) : elem(row, col + 1);
    r[m] = lo | (static_cast<uint32_t>(hi) << 16);
  }
}
}  // namespace emu_mma
#endif

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: d = a b + c -----------------
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          const float (&c)[4]) {
#ifdef GENFAST_EMULATE
  emu_mma::mma_16816<BF16>(d, a, b, c);
#else
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
#endif
}
// In-place accumulate: c += a b.
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_16816<BF16>(c, a, b, c);
}

// ---- ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16 -------------------------------------
// row_addr: this lane's row address in shared memory (see the layout above).
template <int N, bool TRANS = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* row_addr) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#ifdef GENFAST_EMULATE
  emu_mma::ldmatrix<N, TRANS>(r, row_addr);
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_addr));
  if constexpr (N == 1 && !TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  else if constexpr (N == 1)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  else if constexpr (N == 2 && !TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  else if constexpr (N == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  else if constexpr (!TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

}  // namespace dev
}  // namespace genfast
