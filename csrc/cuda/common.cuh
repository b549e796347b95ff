// Included first by every .cu in csrc/cuda. Each .cu compiles twice (DESIGN.md §8):
//   nvcc                       the CUDA headers; GENFAST_LAUNCH is a <<<…>>> launch
//   g++ -x c++ -DGENFAST_EMULATE  csrc/emu/cuda_emu.h: the kernels run on the CPU
// so kernels launch only through GENFAST_LAUNCH and take dynamic shared memory only through
// GENFAST_DYN_SHARED, and nothing else may differ between the two builds.
//
// Conventions for kernel files: kernels and file-local helpers in an anonymous namespace (the
// emulated build links all .cu files into one module); device helpers in headers are
// __forceinline__ or templates; do math in fp32 (load_* / store_* below convert).
//
// GENFAST_LAUNCH(kernel, grid, block, dyn_shared_bytes, stream, args...) is a statement; check
// cudaGetLastError() after it. A template kernel goes through a pointer variable first
// (auto k = &kern<A, B>;) because of the commas. GENFAST_DYN_SHARED(T, name) declares
// `T* name` at the start of dynamic shared memory (128-byte aligned).
#pragma once

#include <stdint.h>

#include <atomic>
#include <initializer_list>

#include "flow_step.h"  // genfast::DType (the dtype codes shared with the bindings)

#ifdef GENFAST_EMULATE
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define GENFAST_LAUNCH(kernel, grid, block, shmem, stream, ...) \
  kernel<<<(grid), (block), (shmem), (cudaStream_t)(stream)>>>(__VA_ARGS__)
#define GENFAST_DYN_SHARED(T, name)                                      \
  extern __shared__ __align__(128) unsigned char genfast_dyn_smem_[];    \
  T* name = reinterpret_cast<T*>(genfast_dyn_smem_)
#endif

namespace genfast {
namespace dev {

// ---- element types by dtype code ----------------------------------------------------------------
template <int DT> struct ElemOf;
template <> struct ElemOf<kFloat32> { using type = float; };
template <> struct ElemOf<kFloat16> { using type = __half; };
template <> struct ElemOf<kBFloat16> { using type = __nv_bfloat16; };
template <int DT> using elem_t = typename ElemOf<DT>::type;
// Elements in one 16-byte vector (a single ld/st.global.v4 on the GPU).
template <int DT> constexpr int kPack = 16 / static_cast<int>(sizeof(elem_t<DT>));

// ---- one element, dtype known at compile time (hot loops) or at run time -----------------------
template <int DT>
__device__ __forceinline__ float load_elem(const void* base, int64_t i) {
  const elem_t<DT> v = static_cast<const elem_t<DT>*>(base)[i];
  if constexpr (DT == kFloat32) return v;
  else if constexpr (DT == kFloat16) return __half2float(v);
  else return __bfloat162float(v);
}
template <int DT>
__device__ __forceinline__ void store_elem(void* base, int64_t i, float v) {
  if constexpr (DT == kFloat32) static_cast<float*>(base)[i] = v;
  else if constexpr (DT == kFloat16) static_cast<__half*>(base)[i] = __float2half_rn(v);
  else static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
}
// v as the dtype stores it (rounded to nearest even), back in fp32: sums of what was stored.
template <int DT>
__device__ __forceinline__ float round_to(float v) {
  if constexpr (DT == kFloat32) return v;
  else if constexpr (DT == kFloat16) return __half2float(__float2half_rn(v));
  else return __bfloat162float(__float2bfloat16_rn(v));
}
// The modulate kernels' arithmetic with each rounding spelled out (__fmul_rn is never contracted,
// fmaf always is), so that every kernel and load order gives the same bits on a GPU: left to itself,
// nvcc contracted a * b + c into an FMA in some instances and not in others (session 17, H200).
// out = xhat * (1 + scale) + shift,  xhat = (x - mean) * rstd
__device__ __forceinline__ float modulate_one(float x, float mean, float rstd, float scale, float shift,
                                              bool has_shift) {
  const float xh = __fmul_rn(x - mean, rstd);
  return has_shift ? fmaf(xh, 1.f + scale, shift) : __fmul_rn(xh, 1.f + scale);
}
// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
__device__ __forceinline__ float modulate_dx(float dxh, float xh, float ma, float mb, float rstd) {
  return __fmul_rn(rstd, fmaf(-xh, mb, dxh - ma));
}
__device__ __forceinline__ float load_elem(const void* base, int64_t i, int dtype) {
  return dtype == kFloat32 ? load_elem<kFloat32>(base, i)
         : dtype == kFloat16 ? load_elem<kFloat16>(base, i) : load_elem<kBFloat16>(base, i);
}
__device__ __forceinline__ void store_elem(void* base, int64_t i, float v, int dtype) {
  if (dtype == kFloat32) store_elem<kFloat32>(base, i, v);
  else if (dtype == kFloat16) store_elem<kFloat16>(base, i, v);
  else store_elem<kBFloat16>(base, i, v);
}

// A GPU faults on a misaligned 16-byte access ("misaligned address"); the CPU running the
// emulation would not notice, so there the launch fails instead.
__device__ __forceinline__ void check_pack_alignment(const void* p, const char* what) {
#ifdef GENFAST_EMULATE
  if (reinterpret_cast<uintptr_t>(p) & 15u)
    genfast_emu::fail(*genfast_emu::self()->block, std::string("misaligned 16-byte access in dev::") + what);
#else
  (void)p, (void)what;
#endif
}

// ---- 16-byte vectors: p must be 16-byte aligned. Element i of a packed 32-bit word sits in its
// low half (the layout of __half2 / __nv_bfloat162). load_pack = unpack_pack(load_pack_raw(p));
// the split lets a kernel keep several raw packs in flight in 4 registers each and widen late.
__device__ __forceinline__ uint4 load_pack_raw(const void* p) {
  check_pack_alignment(p, "load_pack");
  return *static_cast<const uint4*>(p);
}
template <int DT>
__device__ __forceinline__ void unpack_pack(const uint4& u, float (&v)[kPack<DT>]) {
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (DT == kFloat32) {
      v[i] = __uint_as_float(w[i]);
    } else if constexpr (DT == kBFloat16) {  // bf16 -> fp32 is a shift
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      v[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
      v[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  }
}
template <int DT>
__device__ __forceinline__ void load_pack(const void* p, float (&v)[kPack<DT>]) {
  unpack_pack<DT>(load_pack_raw(p), v);
}
template <int DT>
__device__ __forceinline__ void store_pack(void* p, const float (&v)[kPack<DT>]) {
  check_pack_alignment(p, "store_pack");
  unsigned w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (DT == kFloat32) {
      w[i] = __float_as_uint(v[i]);
    } else if constexpr (DT == kBFloat16) {  // one cvt.rn.bf16x2.f32 on sm_80+
      const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
      w[i] = __bfloat16_as_ushort(h.x) | (static_cast<unsigned>(__bfloat16_as_ushort(h.y)) << 16);
    } else {  // one cvt.rn.f16x2.f32 on sm_80+
      const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
      w[i] = __half_as_ushort(h.x) | (static_cast<unsigned>(__half_as_ushort(h.y)) << 16);
    }
  }
#ifdef GENFAST_EMULATE
  *static_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
#else
  // One 16-byte store, spelt out: from a plain uint4 assignment NVVM (nvcc 13.0) emitted four 4-byte
  // st.global.u32 for some packs (every dh pack of gelu.cu, the first pack of each modulate forward
  // row: sm_80 / sm_90 PTX). p is global memory (every caller's).
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
               : "memory");
#endif
}

// ---- cp.async (sm_80+): 16-byte global -> shared copies that complete asynchronously -------------
// cp_async16 copies 16 bytes (both addresses 16-byte aligned); cp_async_commit closes this thread's
// group of copies; cp_async_wait<N>() waits until at most the N newest committed groups are still in
// flight (cp.async.wait_group N): the copies waited for are then visible to this thread, and to the
// block after a __syncthreads. The emulation lands a group's bytes only at its wait (cuda_emu.h), so
// reading a slot too early gives wrong results there too.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
#ifdef GENFAST_EMULATE
  check_pack_alignment(smem_dst, "cp_async16 (shared)");
  check_pack_alignment(gmem_src, "cp_async16 (global)");
  genfast_emu::cp_async_issue(smem_dst, gmem_src);
#else
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(gmem_src) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef GENFAST_EMULATE
  genfast_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef GENFAST_EMULATE
  genfast_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() { cp_async_wait<0>(); }

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- reductions ---------------------------------------------------------------------------------
struct SumOp {
  template <class T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <class T> __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? b : a; }
};

// Every lane of a full warp gets the reduction of all 32 lanes' values (xor butterfly).
template <class T, class Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) { return warp_allreduce(v, SumOp()); }
__device__ __forceinline__ float warp_max(float v) { return warp_allreduce(v, MaxOp()); }

// Every thread of the block gets the reduction over the block. All threads of the block must
// call it (threads that returned earlier are fine); the block size must be a multiple of 32.
// `scratch` is a __shared__ T[32] owned by the caller; it may be reused by the next call (the
// leading barrier protects it).
template <class T, class Op>
__device__ __forceinline__ T block_allreduce(T v, T* scratch, Op op, T identity) {
  const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned nwarps = (blockDim.x * blockDim.y * blockDim.z + 31) / 32;
  v = warp_allreduce(v, op);
  __syncthreads();  // a previous call may still be reading scratch
  if ((tid & 31) == 0) scratch[tid >> 5] = v;
  __syncthreads();
  v = (tid & 31) < nwarps ? scratch[tid & 31] : identity;
  return warp_allreduce(v, op);
}
__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_allreduce(v, scratch, SumOp(), 0.0f); }
__device__ __forceinline__ float block_max(float v, float* scratch) {
  return block_allreduce(v, scratch, MaxOp(), __uint_as_float(0xff800000u));  // -inf
}

// ---- host side ------------------------------------------------------------------------------
// Blocks of `kernel` (launched with `threads` threads and `smem` bytes of dynamic shared memory) the
// whole device holds at once, cached per device in `cache` (one std::atomic<int>[64] per kernel
// instantiation and smem). A failed query falls back
// to H100-like figures and clears the error it left, so it is not mistaken for a launch error.
template <class Kernel>
inline int64_t resident_blocks(Kernel kernel, int threads, std::atomic<int>* cache, size_t smem = 0) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    (void)cudaGetLastError();
    dev = 0;
  }
  int cap = cache[dev].load(std::memory_order_relaxed);
  if (!cap) {
    int sms = 0, occ = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) sms = 132;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, threads, smem) != cudaSuccess || occ <= 0) occ = 4;
    (void)cudaGetLastError();
    cap = sms * occ;
    cache[dev].store(cap, std::memory_order_relaxed);
  }
  return cap;
}

// ---- deterministic column sums (modulate.cu, gelu.cu) ------------------------------------------
// A column sum over rows is cut into fixed row chunks whose fp32 partial sums a first kernel writes
// (partial[b, chunk, ...]); this kernel adds the chunks in order, so the bits never depend on the
// launch shape or the device, and no float atomics are needed.
constexpr int kReduceCols = 128;  // columns a block

// out[b, c] = sum over chunks k, in order, of partial[(b * nchunks + k) * stride_k + c].
// grid = (ceil(C / kReduceCols), B).
template <int DT>
__global__ void __launch_bounds__(kReduceCols) reduce_partials_kernel(void* out, const float* partial, int64_t nchunks,
                                                                      int64_t stride_k, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kReduceCols + threadIdx.x, b = blockIdx.y;
  if (c >= C) return;
  const float* src = partial + b * nchunks * stride_k + c;
  float s = 0.f;
  for (int64_t k = 0; k < nchunks; ++k) s += src[k * stride_k];
  store_elem<DT>(out, b * C + c, s);
}

// Launches reduce_partials_kernel into out [B, C] (the tensors' dtype); returns the cudaError_t.
template <int DT>
inline int reduce_partials(void* out, const float* partial, int64_t B, int64_t nchunks, int64_t stride_k, int64_t C,
                           void* stream) {
  const dim3 grid(static_cast<unsigned>((C + kReduceCols - 1) / kReduceCols), static_cast<unsigned>(B));
  auto k = &reduce_partials_kernel<DT>;
  GENFAST_LAUNCH(k, grid, kReduceCols, 0, stream, out, partial, nchunks, stride_k, C);
  return static_cast<int>(cudaGetLastError());
}

// Every bias gradient's two-level sum: out [width] = the first ngroups * group rows of partial added
// in order in groups of `group` (fp32, into the ngroups rows after them), then the groups in order.
template <int DT>
inline int reduce_groups(void* out, float* partial, int64_t ngroups, int64_t group, int64_t width, void* stream) {
  float* sums = partial + ngroups * group * width;
  if (const int e = reduce_partials<kFloat32>(sums, partial, ngroups, group, width, width, stream)) return e;
  return reduce_partials<DT>(out, sums, 1, ngroups, width, width, stream);
}

// Fn<DT>::run(p, stream) for p.dtype (fp32 / fp16 / bf16): every op's entry point dispatches here.
template <template <int> class Fn, class P>
inline int by_dtype(const P& p, void* stream) {
  switch (p.dtype) {
    case kFloat32: return Fn<kFloat32>::run(p, stream);
    case kFloat16: return Fn<kFloat16>::run(p, stream);
    case kBFloat16: return Fn<kBFloat16>::run(p, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

// 16-byte packs are safe: C a multiple of the pack and every (non-null) base pointer and row
// stride 16-byte aligned, so every row start is too.
template <int DT>
inline bool vec_ok(int64_t C, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides) {
  constexpr int V = kPack<DT>;
  if (C % V) return false;
  for (const void* q : ptrs)
    if (reinterpret_cast<uintptr_t>(q) % 16) return false;
  for (int64_t st : strides)
    if (st % V) return false;
  return true;
}

// ---- tensor cores (not written yet) -----------------------------------------------------------
// Wrappers for mma.sync.aligned.m16n8k16 (bf16/fp16 -> fp32) and ldmatrix(.trans).x1/.x2/.x4
// go in csrc/cuda/mma.cuh: inline PTX under nvcc, and under GENFAST_EMULATE a twin built on
// genfast_emu::warp_collective that follows the PTX ISA fragment layouts lane by lane
// (DESIGN.md §8). Kernels that use them include "cuda/mma.cuh" after this header.

}  // namespace dev
}  // namespace genfast
