// CUDA emulation, part 3 of 3: running a grid — the fiber scheduler (with deadlock detection),
// the one-OS-thread-per-CUDA-thread runner, fiber stacks, launch validation and argument
// marshalling. Included by cuda_emu.h only; see the model there.
#pragma once

#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <exception>
#include <map>
#include <tuple>
#include <utility>

#include "launch_log.h"

namespace genfast_emu {

inline void run_thread(Thread* t) {
  Block& b = *t->block;
  try {
    b.body(b.body_arg);
  } catch (Abort&) {
  } catch (std::exception& e) {
    try { fail(b, std::string("exception: ") + e.what()); } catch (Abort&) {}
  } catch (...) {  // nothing may unwind past a fiber's first frame
    try { fail(b, "unknown exception"); } catch (Abort&) {}
  }
  thread_exit(t);
  if (b.failed && threaded(b)) wake_all(b);
  t->finished = true;
}

inline void fiber_entry() { run_thread(tls_self); }  // returns to the scheduler via uc_link
#ifdef GENFAST_EMU_FAST_SWITCH
inline void fiber_entry_fast() {  // entered by genfast_emu_switch's ret; never returns
  Thread* t = tls_self;
  run_thread(t);
  genfast_emu_switch(&t->sp, t->block->sched_sp);
  __builtin_unreachable();
}
#endif

inline int env_int(const char* name, int dflt) {
  const char* s = getenv(name);
  return s && *s ? atoi(s) : dflt;
}
inline size_t stack_bytes() { return static_cast<size_t>(env_int("GENFAST_EMU_STACK_KB", 256)) * 1024; }

// Fiber stacks, kept across launches (guarded by the launch mutex), each below a guard page so
// an overflow faults instead of corrupting the neighbour.
struct StackPool {
  size_t size = 0;
  std::vector<unsigned char*> stacks;
  unsigned char* get(size_t i, size_t bytes) {
    if (bytes != size) release();
    size = bytes;
    while (stacks.size() <= i) {
      const size_t page = 4096;
      void* p = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) return nullptr;
      mprotect(p, page, PROT_NONE);
      stacks.push_back(static_cast<unsigned char*>(p) + page);
    }
    return stacks[i];
  }
  void release() {
    for (unsigned char* s : stacks) munmap(s - 4096, size + 4096);
    stacks.clear();
  }
  ~StackPool() { release(); }
};

inline bool run_block_fibers(Block& b) {
  static StackPool pool;
  const size_t bytes = stack_bytes();
  for (int i = 0; i < b.nthreads; ++i) {
    Thread& t = b.threads[i];
    unsigned char* stack = pool.get(static_cast<size_t>(i), bytes);
    if (!stack) return false;
#ifdef GENFAST_EMU_FAST_SWITCH
    if (b.fast_switch) {  // the frame genfast_emu_switch pops, ending in a "return" to the entry
      void** sp = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15));
      *--sp = nullptr;  // fiber_entry_fast's return address: entered with rsp = 8 mod 16, as after a call
      *--sp = reinterpret_cast<void*>(&fiber_entry_fast);
      for (int k = 0; k < 6; ++k) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
      uint32_t csr[2] = {0, 0};
      __asm__ volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
      --sp;
      memcpy(sp, csr, 8);
      t.sp = sp;
      continue;
    }
#endif
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = stack;
    t.ctx.uc_stack.ss_size = bytes;
    t.ctx.uc_link = &b.sched;
    makecontext(&t.ctx, fiber_entry, 0);
  }
  int remaining = b.nthreads;
  while (remaining) {
    const uint64_t before = b.progress;
    for (int i = 0; i < b.nthreads; ++i) {
      Thread& t = b.threads[i];
      if (t.finished) continue;
      tls_self = &t;
      threadIdx = t.tid;
#ifdef GENFAST_EMU_FAST_SWITCH
      if (b.fast_switch) genfast_emu_switch(&b.sched_sp, t.sp);
      else
#endif
        swapcontext(&b.sched, &t.ctx);
      if (t.finished) --remaining;
    }
    if (remaining && b.progress == before && !b.failed) {  // nobody can move: say who waits where
      std::string who;
      std::vector<const char*> seen;
      for (int i = 0; i < b.nthreads; ++i) {
        const Thread& t = b.threads[i];
        const char* at = t.waiting ? t.waiting : "?";
        if (t.finished || std::find(seen.begin(), seen.end(), at) != seen.end()) continue;
        seen.push_back(at);
        char s[96];
        snprintf(s, sizeof s, "%sthread (%u,%u,%u) in %s", who.empty() ? "" : ", ", t.tid.x, t.tid.y, t.tid.z, at);
        who += s;
      }
      tls_self = nullptr;
      try { fail(b, "deadlock: " + std::to_string(remaining) + " threads wait forever, e.g. " + who); } catch (Abort&) {}
    }
  }
  tls_self = nullptr;
  return true;
}

inline bool run_block_threads(Block& b) {
  struct Start {
    Thread* t;
    uint3 bid;
    dim3 grid, block;
  };
  std::vector<Start> starts(b.nthreads);
  std::vector<pthread_t> ids(b.nthreads);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, stack_bytes());
  int made = 0;
  for (; made < b.nthreads; ++made) {
    starts[made] = Start{&b.threads[made], blockIdx, gridDim, blockDim};
    auto entry = [](void* arg) -> void* {
      Start* s = static_cast<Start*>(arg);
      tls_self = s->t;
      threadIdx = s->t->tid;
      blockIdx = s->bid;
      gridDim = s->grid;
      blockDim = s->block;
      run_thread(s->t);
      tls_self = nullptr;
      return nullptr;
    };
    if (pthread_create(&ids[made], &attr, entry, &starts[made]) != 0) break;
  }
  pthread_attr_destroy(&attr);
  if (made < b.nthreads) {  // could not start them all: let the started ones fail out
    {
      std::lock_guard<std::mutex> g(b.fail_mu);
      if (b.msg.empty()) b.msg = "could not start " + std::to_string(b.nthreads) + " OS threads";
    }
    b.failed = true;
    wake_all(b);
  }
  for (int i = 0; i < made; ++i) pthread_join(ids[i], nullptr);
  return made == b.nthreads;
}

// ----- launches ----------------------------------------------------------------------------------
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}
inline thread_local cudaError_t tls_last_error = cudaSuccess;
inline std::atomic<int> runner_override{-1};  // set_runner(); otherwise GENFAST_EMU_RUNNER
inline void set_runner(Runner r) { runner_override = static_cast<int>(r); }
inline Runner current_runner() {
  if (runner_override >= 0) return static_cast<Runner>(runner_override.load());
  const char* s = getenv("GENFAST_EMU_RUNNER");
  if (s && *s) return std::string(s) == "threads" ? Runner::kThreads : Runner::kFibers;
#if defined(__SANITIZE_THREAD__)
  return Runner::kThreads;  // TSan does not follow swapcontext
#else
  return Runner::kFibers;
#endif
}

// Per-kernel cudaFuncAttributeMaxDynamicSharedMemorySize, as cudaFuncSetAttribute sets it.
inline std::map<const void*, int>& smem_optin() {
  static std::map<const void*, int> m;
  return m;
}

inline cudaError_t launch_impl(const char* name, const void* fn, dim3 grid, dim3 block, size_t shmem,
                               void (*body)(void*), void* arg) {
  const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
  if (!grid.x || !grid.y || !grid.z || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu || !nthreads ||
      nthreads > 1024 || block.z > 64)
    return cudaErrorInvalidConfiguration;
  log_launch(name, grid.x, grid.y, grid.z, block.x);
  std::lock_guard<std::mutex> lock(launch_mutex());
  const auto it = smem_optin().find(fn);
  if (shmem > static_cast<size_t>(it == smem_optin().end() ? kSmemDefault : it->second)) return cudaErrorInvalidValue;

  auto b = std::make_unique<Block>();
  b->runner = current_runner();
  const char* sw = getenv("GENFAST_EMU_FIBER_SWITCH");
  b->fast_switch = !(sw && std::string(sw) == "ucontext");
  b->kernel = name;
  b->timeout_s = env_int("GENFAST_EMU_TIMEOUT_S", 60);
  b->body = body;
  b->body_arg = arg;
  b->nthreads = static_cast<int>(nthreads);
  b->nwarps = (b->nthreads + 31) / 32;
  b->warps.reset(new Warp[b->nwarps]);
  b->threads.reset(new Thread[b->nthreads]);
  std::unique_ptr<unsigned char, void (*)(void*)> dyn(
      static_cast<unsigned char*>(aligned_alloc(128, (shmem + 127) / 128 * 128 + 128)), free);
  b->dyn_smem = dyn.get();
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = uint3{bx, by, bz};
        b->live = b->nthreads;
        b->arrived = b->acc = 0;
        for (int i = 0; i < b->nwarps; ++i) {
          Warp& w = b->warps[i];
          const int n = b->nthreads - 32 * i < 32 ? b->nthreads - 32 * i : 32;
          w.live = n == 32 ? ~0u : (1u << n) - 1u;
          for (auto& s : w.slots) s->open = false, s->pending = 0, s->arrived = 0;
        }
        for (int i = 0; i < b->nthreads; ++i) {
          Thread& t = b->threads[i];
          t.tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
          t.lane = i & 31;
          t.warp = &b->warps[i / 32];
          t.block = b.get();
          t.waiting = nullptr;
          t.finished = false;
          t.uncommitted.clear();  // a copy never waited for lands in the block's discarded shared memory
          t.groups.clear();
        }
        memset(b->dyn_smem, 0xff, shmem);  // uninitialised shared memory is garbage on the GPU too
        const bool ok = threaded(*b) ? run_block_threads(*b) : run_block_fibers(*b);
        if (!ok && b->msg.empty()) b->msg = "could not allocate fiber stacks";
        if (!ok || b->failed) {
          fprintf(stderr, "genfast emu: launch failed: %s\n", b->msg.c_str());
          return cudaErrorLaunchFailure;
        }
      }
  return cudaSuccess;
}

template <class F>
inline void call_body(void* f) {
  (*static_cast<F*>(f))();
}

// Converts the arguments to the kernel's parameter types once (as a launch marshals them);
// every emulated thread then calls the kernel with its own copies.
template <class... P, class... A>
inline cudaError_t launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t shmem, const char* name,
                                 A&&... args) {
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  auto body = [&] { std::apply(kernel, params); };
  const cudaError_t err = launch_impl(name, reinterpret_cast<const void*>(kernel), grid, block, shmem,
                                      &call_body<decltype(body)>, &body);
  if (err != cudaSuccess) tls_last_error = err;
  return err;
}

inline void* dyn_shared() { return self()->block->dyn_smem; }

}  // namespace genfast_emu
