// CUDA emulation (DESIGN.md §8): the same .cu source, compiled as C++17 with -DGENFAST_EMULATE
// (g++ -x c++ -std=c++17 -fno-strict-aliasing -pthread), runs its kernels on the CPU.
//
// Model. A launch takes a global mutex and runs the grid's blocks one after another; within a
// block every CUDA thread is either a fiber (all on the calling OS thread: fast, deterministic,
// the default; switched by ucontext, or on x86-64 by a 20-instruction stack switch because
// swapcontext's signal-mask syscall cost ~1.4 us a switch here) or its own OS thread
// (GENFAST_EMU_RUNNER=threads, the default under -fsanitize=thread: TSan then sees
// unsynchronised shared-memory accesses as races).
// __syncthreads is a block barrier; warp shuffles, votes and __syncwarp exchange values through
// a per-warp buffer behind a warp barrier over the lanes named in the mask. A thread that
// returns drops out of both (arrive-and-drop), so divergent exits never hang. Barriers and
// collectives use one mutex per block and one per warp: a shuffle in warp 0 orders nothing in
// warp 1, so TSan still sees a missing __syncthreads between warps (a missing __syncwarp inside
// one warp is invisible to it).
//
// Checks the GPU does not make: a lane calling a collective outside its own mask, lanes of one
// mask calling different collectives, and deadlock (fibers: no thread can move; threads: a wait
// longer than GENFAST_EMU_TIMEOUT_S, default 60) fail the launch with a message on stderr and
// cudaErrorLaunchFailure. Reading a lane that did not take part in a shuffle returns all-ones
// bits (NaN for floats). Dynamic shared memory is filled with 0xff bytes before every block. A
// cp.async copy lands in shared memory only at the wait_group that completes its group, so a slot
// read before its wait holds its old bytes.
// Launch configurations are validated as the GPU would (block <= 1024 threads, grid.y/z <=
// 65535, dynamic shared memory > 48 KiB only after cudaFuncSetAttribute, at most 227 KiB).
// Env (read at each launch): GENFAST_EMU_RUNNER=fibers|threads, GENFAST_EMU_STACK_KB (default
// 256), GENFAST_EMU_TIMEOUT_S, GENFAST_EMU_FIBER_SWITCH=ucontext (swapcontext even on x86-64).
// Files: cuda_emu_device.h (types, math, atomics), cuda_emu_sync.h (barriers, collectives),
// cuda_emu_launch.h (runners, launches), this file (runtime API, intrinsics, launch macros).
#pragma once
#ifndef GENFAST_EMULATE
#error "csrc/emu/cuda_emu.h is for the emulated build only (-DGENFAST_EMULATE)"
#endif

#include <mutex>

#include "cuda_emu_device.h"  // qualifiers, vector and half types, math, atomics

// Kernels use #pragma unroll, unknown to GCC: this silences -Wall from GCC 13 on (GCC 12 needs
// -Wno-unknown-pragmas on the command line; the pragma does not reach its preprocessor warning).
#pragma GCC diagnostic ignored "-Wunknown-pragmas"

// ---------------------------------------------------------------------------------------------
// Runtime API subset (values as in driver_types.h).
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
typedef struct CUstream_st* cudaStream_t;

// The CUDA built-in variables. thread_local: in the threads runner each OS thread has its own;
// the fiber scheduler rewrites threadIdx before resuming each fiber.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

#include "cuda_emu_sync.h"    // threads, blocks, warps, barriers, collectives
#include "cuda_emu_launch.h"  // the runners and launches

// ---------------------------------------------------------------------------------------------
// Device intrinsics backed by the scheduler.
inline void __syncthreads() { genfast_emu::block_barrier(0); }
inline int __syncthreads_count(int p) { return genfast_emu::block_barrier(p); }
inline int __syncthreads_or(int p) { return genfast_emu::block_barrier(p) != 0; }
inline int __syncthreads_and(int p) { return genfast_emu::block_barrier(!p) == 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  genfast_emu::warp_collective(genfast_emu::kSyncwarp, mask, 0, [](const uint64_t*, uint32_t) { return uint64_t(0); });
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src, int width = 32) {
  return genfast_emu::shuffle(genfast_emu::kShfl, mask, var, src, width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return genfast_emu::shuffle(genfast_emu::kShflUp, mask, var, static_cast<int>(delta), width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return genfast_emu::shuffle(genfast_emu::kShflDown, mask, var, static_cast<int>(delta), width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return genfast_emu::shuffle(genfast_emu::kShflXor, mask, var, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(genfast_emu::warp_collective(
      genfast_emu::kBallot, mask, pred != 0, [](const uint64_t* v, uint32_t done) {
        uint64_t r = 0;
        for (int i = 0; i < 32; ++i) r |= ((done >> i) & 1u) && v[i] ? 1ull << i : 0;
        return r;
      }));
}
inline int __any_sync(unsigned mask, int pred) {
  return genfast_emu::warp_collective(genfast_emu::kAny, mask, pred != 0, [](const uint64_t* v, uint32_t done) {
    for (int i = 0; i < 32; ++i)
      if (((done >> i) & 1u) && v[i]) return uint64_t(1);
    return uint64_t(0);
  }) != 0;
}
inline int __all_sync(unsigned mask, int pred) {
  return genfast_emu::warp_collective(genfast_emu::kAll, mask, pred != 0, [](const uint64_t* v, uint32_t done) {
    for (int i = 0; i < 32; ++i)
      if (((done >> i) & 1u) && !v[i]) return uint64_t(0);
    return uint64_t(1);
  }) != 0;
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned value) {
  return static_cast<unsigned>(genfast_emu::warp_collective(genfast_emu::kReduce, mask, value, [](const uint64_t* v, uint32_t done) {
    uint32_t s = 0;
    for (int i = 0; i < 32; ++i) s += ((done >> i) & 1u) ? static_cast<uint32_t>(v[i]) : 0u;
    return uint64_t(s);
  }));
}
// The lanes of this warp that have not returned (the GPU gives the currently converged ones).
inline unsigned __activemask() {
  genfast_emu::Thread* t = genfast_emu::self();
  genfast_emu::Guard g(t->warp->mu, *t->block);
  return t->warp->live;
}

// cp.async (csrc/cuda/common.cuh: dev::cp_async16, cp_async_commit, cp_async_wait): the source's 16
// bytes are read at issue but land in shared memory only when a wait_group completes their group,
// so a kernel that reads a slot before waiting for it reads the slot's old bytes here (on a GPU it
// may or may not, by timing) and a wrong wait count shows as wrong results.
namespace genfast_emu {
inline void cp_async_issue(void* dst, const void* src) {
  AsyncCopy c;
  c.dst = dst;
  memcpy(c.bytes, src, sizeof c.bytes);
  self()->uncommitted.push_back(c);
}
inline void cp_async_commit() {
  Thread* t = self();
  t->groups.emplace_back(std::move(t->uncommitted));
  t->uncommitted.clear();
}
// cp.async.wait_group n: every committed group but the newest n has landed (uncommitted copies wait on).
inline void cp_async_wait(int n) {
  Thread* t = self();
  while (static_cast<int>(t->groups.size()) > n) {
    for (const AsyncCopy& c : t->groups.front()) memcpy(c.dst, c.bytes, sizeof c.bytes);
    t->groups.pop_front();
  }
}
}  // namespace genfast_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = genfast_emu::tls_last_error;
  genfast_emu::tls_last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return genfast_emu::tls_last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulated; see stderr)";
    default: return "emulated CUDA error";
  }
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = genfast_emu::kSmemDefault; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMultiProcessorCount: *v = genfast_emu::kEmulatedSMs; break;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = genfast_emu::kSmemMax; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
// As if 2048 threads fit on an SM whatever the kernel's registers and shared memory.
template <class... P>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void (*)(P...), int block_size, size_t) {
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  *n = 2048 / block_size < 32 ? 2048 / block_size : 32;
  return cudaSuccess;
}
template <class... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > genfast_emu::kSmemMax)
    return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(genfast_emu::launch_mutex());
  genfast_emu::smem_optin()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

// GENFAST_LAUNCH(kernel, grid, block, dyn_shared_bytes, stream, args...): a template kernel
// with commas in its name goes through a pointer variable first (auto k = &kern<A, B>;).
#define GENFAST_LAUNCH(kernel, grid, block, shmem, stream, ...)                                    \
  ((void)(stream), ::genfast_emu::launch_kernel(kernel, dim3(grid), dim3(block), static_cast<size_t>(shmem), \
                                                #kernel, ##__VA_ARGS__))
// Dynamic shared memory as a pointer `T* name` (the nvcc form in csrc/cuda/common.cuh matches).
#define GENFAST_DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(::genfast_emu::dyn_shared())
