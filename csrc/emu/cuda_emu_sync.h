// CUDA emulation, part 2 of 3: emulated threads, blocks and warps, and how they meet —
// __syncthreads, warp collectives, arrive-and-drop on return, failure reporting, and the fiber
// switch. Included by cuda_emu.h only (after the runtime types); see the model there.
#pragma once

#include <stdlib.h>
#include <ucontext.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

// The fast fiber switch: saves the callee-saved registers, MXCSR and the x87 control word on
// the current stack, stores the stack pointer in *save_sp and resumes the stack at new_sp.
// COMDAT, so every translation unit may carry it. Not with CET shadow stacks (ucontext then).
#if defined(__x86_64__) && defined(__linux__) && !(defined(__CET__) && (__CET__ & 2))
#define GENFAST_EMU_FAST_SWITCH 1
extern "C" void genfast_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .pushsection .text.genfast_emu_switch,"axG",@progbits,genfast_emu_switch,comdat
  .globl genfast_emu_switch
  .hidden genfast_emu_switch
  .type genfast_emu_switch,@function
genfast_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size genfast_emu_switch,.-genfast_emu_switch
  .popsection
)");
#endif

namespace genfast_emu {

enum class Runner { kFibers = 0, kThreads = 1 };
constexpr int kSmemDefault = 48 * 1024, kSmemMax = 227 * 1024;  // H100 opt-in limit
constexpr int kEmulatedSMs = 2;  // small on purpose: grid-stride loops get exercised

struct Abort {};  // unwinds an emulated thread after its block failed

// One warp collective: the lanes of `mask` meet in it. Several may be open at once when
// disjoint (or nested-in-time) groups of lanes use different masks, as independent thread
// scheduling allows; lanes of one mask meet in one collective at a time.
struct Slot {
  bool open = false;
  uint32_t mask = 0, arrived = 0;
  uint32_t done = 0;  // lanes whose vals[] the completed collective holds
  int kind = 0, pending = 0;  // pending: lanes yet to read the completed values
  uint64_t gen = 0;
  uint64_t vals[32];
};

struct Warp {
  std::mutex mu;
  std::condition_variable cv;
  uint32_t live = 0;  // lanes that exist and have not returned
  std::vector<std::unique_ptr<Slot>> slots;
};

struct Block;
// A cp.async copy issued but not landed: its 16 source bytes (read at issue) and where they go.
struct AsyncCopy {
  void* dst;
  unsigned char bytes[16];
};

struct Thread {
  uint3 tid;
  int lane = 0;
  // cp.async copies (cuda_emu.h: genfast_emu::cp_async_*): not yet committed, then one group per commit,
  // oldest first; a group's bytes land in shared memory only when a wait_group lets it complete.
  std::vector<AsyncCopy> uncommitted;
  std::deque<std::vector<AsyncCopy>> groups;
  Warp* warp = nullptr;
  Block* block = nullptr;
  const char* waiting = nullptr;  // what it waits in (deadlock report)
  bool finished = false;
  ucontext_t ctx;     // fibers through ucontext
  void* sp = nullptr;  // fibers through genfast_emu_switch
};

struct Block {
  Runner runner = Runner::kFibers;
  const char* kernel = "";
  int nthreads = 0, nwarps = 0;
  std::mutex mu;
  std::condition_variable cv;
  int live = 0, arrived = 0, acc = 0, result = 0;
  uint64_t gen = 0;
  std::unique_ptr<Warp[]> warps;
  std::unique_ptr<Thread[]> threads;
  std::atomic<bool> failed{false};
  std::mutex fail_mu;
  std::string msg;
  uint64_t progress = 0;  // fibers only: bumped whenever some thread moves (deadlock check)
  unsigned char* dyn_smem = nullptr;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  ucontext_t sched;
  void* sched_sp = nullptr;
  bool fast_switch = false;
  int timeout_s = 60;
};

inline thread_local Thread* tls_self = nullptr;

inline Thread* self() {
  if (!tls_self) {
    fprintf(stderr, "genfast emu: a CUDA device intrinsic was called outside an emulated kernel\n");
    abort();
  }
  return tls_self;
}
inline bool threaded(const Block& b) { return b.runner == Runner::kThreads; }
inline void bump(Block& b) {
  if (!threaded(b)) ++b.progress;
}

// Records the first failure of the block and unwinds the calling emulated thread.
[[noreturn]] inline void fail(Block& b, const std::string& what) {
  {
    std::lock_guard<std::mutex> g(b.fail_mu);
    if (b.msg.empty()) {
      const Thread* t = tls_self;
      char where[160];
      int n = snprintf(where, sizeof where, "kernel %s, block (%u,%u,%u)", b.kernel, blockIdx.x, blockIdx.y, blockIdx.z);
      if (t) snprintf(where + n, sizeof where - n, ", thread (%u,%u,%u)", t->tid.x, t->tid.y, t->tid.z);
      b.msg = std::string(where) + ": " + what;
    }
  }
  b.failed = true;
  throw Abort{};
}

// A lock that is only taken by the threads runner (fibers never run concurrently).
struct Guard {
  std::unique_lock<std::mutex> lk;
  Guard(std::mutex& m, const Block& b) : lk(m, std::defer_lock) {
    if (threaded(b)) lk.lock();
  }
};

inline void yield_fiber(Block& b) {
  Thread* t = tls_self;
#ifdef GENFAST_EMU_FAST_SWITCH
  if (b.fast_switch) return genfast_emu_switch(&t->sp, b.sched_sp);
#endif
  swapcontext(&t->ctx, &b.sched);
}

// Waits until pred() holds (pred is evaluated under the guard's lock).
template <class Pred>
inline void wait(Block& b, std::condition_variable& cv, Guard& g, const char* what, Pred pred) {
  Thread* t = tls_self;
  t->waiting = what;
  if (!threaded(b)) {
    while (!pred()) {
      if (b.failed) throw Abort{};
      yield_fiber(b);
    }
    ++b.progress;
  } else {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(b.timeout_s);
    while (!pred()) {
      if (b.failed) throw Abort{};
      if (cv.wait_until(g.lk, deadline) == std::cv_status::timeout && !pred() && !b.failed)
        fail(b, std::string("deadlock: waited more than GENFAST_EMU_TIMEOUT_S in ") + what);
    }
  }
  t->waiting = nullptr;
}

// ----- block barrier (__syncthreads and its _count/_and/_or forms) ------------------------------
inline void complete_block_barrier(Block& b) {
  b.result = b.acc;
  b.acc = 0;
  b.arrived = 0;
  ++b.gen;
  bump(b);
  if (threaded(b)) b.cv.notify_all();
}

// Returns how many threads passed a nonzero `vote`.
inline int block_barrier(int vote) {
  Thread* t = self();
  Block& b = *t->block;
  if (b.failed) throw Abort{};
  Guard g(b.mu, b);
  const uint64_t gen = b.gen;
  b.acc += vote != 0;
  ++b.arrived;
  bump(b);
  if (b.arrived == b.live) complete_block_barrier(b);
  else wait(b, b.cv, g, "__syncthreads", [&] { return b.gen != gen; });
  return b.result;
}

// ----- warp collectives ------------------------------------------------------------------------
enum Kind { kSyncwarp = 1, kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kReduce, kUser };
inline const char* kind_name(int k) {
  static const char* names[] = {"?",           "__syncwarp",  "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                "__shfl_xor_sync", "__ballot_sync", "__any_sync", "__all_sync", "__reduce_*_sync",
                                "warp collective"};
  return k > 0 && k <= kUser ? names[k] : names[0];
}

inline void complete_slot(Block& b, Warp& w, Slot& s) {
  s.done = s.arrived;
  s.pending = __builtin_popcount(s.arrived);
  s.arrived = 0;
  s.open = false;
  ++s.gen;
  bump(b);
  if (threaded(b)) w.cv.notify_all();
}

// The core of every warp-level intrinsic: each lane named in `mask` (and still running) offers
// `val`; once all have, each computes its result as read(vals, done), where done is the mask of
// lanes whose vals[] are valid.
template <class Read>
inline uint64_t warp_collective(int kind, uint32_t mask, uint64_t val, Read read) {
  Thread* t = self();
  Block& b = *t->block;
  Warp& w = *t->warp;
  const uint32_t bit = 1u << t->lane;
  if (b.failed) throw Abort{};
  char buf[160];
  if (!(mask & bit)) {
    snprintf(buf, sizeof buf, "%s called by lane %d, which is not in its mask 0x%08x", kind_name(kind), t->lane, mask);
    fail(b, buf);
  }
  Guard g(w.mu, b);
  Slot* s = nullptr;
  Slot* free_slot = nullptr;
  for (auto& p : w.slots) {
    if (p->open && p->mask == mask) s = p.get();
    else if (!p->open && !p->pending && !free_slot) free_slot = p.get();
  }
  if (s && s->kind != kind) {
    snprintf(buf, sizeof buf, "lane %d called %s while lanes 0x%08x of the same mask 0x%08x are in %s", t->lane,
             kind_name(kind), s->arrived, mask, kind_name(s->kind));
    fail(b, buf);
  }
  if (!s) {
    if (!free_slot) {
      w.slots.emplace_back(new Slot());
      free_slot = w.slots.back().get();
    }
    s = free_slot;
    s->open = true;
    s->mask = mask;
    s->kind = kind;
    s->arrived = 0;
  }
  s->vals[t->lane] = val;
  s->arrived |= bit;
  bump(b);
  const uint64_t gen = s->gen;
  if (s->arrived == (s->mask & w.live)) complete_slot(b, w, *s);
  else wait(b, w.cv, g, kind_name(kind), [&] { return s->gen != gen; });
  const uint64_t r = read(static_cast<const uint64_t*>(s->vals), s->done);
  --s->pending;
  return r;
}

inline int lane_id() { return self()->lane; }

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffled type must be <= 8 bytes");
  uint64_t u = 0;
  memcpy(&u, &v, sizeof v);
  return u;
}
template <class T>
inline T from_bits(uint64_t u) {
  T v;
  memcpy(&v, &u, sizeof v);
  return v;
}

template <class T>
inline T shuffle(int kind, unsigned mask, T var, int arg, int width) {
  if (width <= 0 || width > 32 || (width & (width - 1))) fail(*self()->block, "shuffle width must be a power of 2 <= 32");
  const uint64_t r = warp_collective(kind, mask, to_bits(var), [&](const uint64_t* vals, uint32_t done) {
    const int lane = lane_id(), seg = lane & ~(width - 1), pos = lane & (width - 1);
    int src = lane;
    switch (kind) {
      case kShfl: src = seg + (arg & (width - 1)); break;
      case kShflUp: src = pos >= arg ? lane - arg : lane; break;
      case kShflDown: src = pos + arg < width ? lane + arg : lane; break;
      default: src = lane ^ (arg & 31); if (src >= seg + width) src = lane; break;  // xor: later groups -> own
    }
    return (done >> src) & 1u ? vals[src] : ~uint64_t(0);  // a lane that took no part: poison
  });
  return from_bits<T>(r);
}

// ----- a thread that returns leaves every barrier (arrive-and-drop) ----------------------------
inline void thread_exit(Thread* t) {
  Block& b = *t->block;
  Warp& w = *t->warp;
  {
    Guard g(w.mu, b);
    w.live &= ~(1u << t->lane);
    for (auto& s : w.slots)
      if (s->open && s->arrived == (s->mask & w.live)) complete_slot(b, w, *s);
  }
  {
    Guard g(b.mu, b);
    --b.live;
    if (b.arrived && b.arrived == b.live) complete_block_barrier(b);
  }
  bump(b);
}

inline void wake_all(Block& b) {  // after a failure: every waiter must see it
  for (int i = 0; i < b.nwarps; ++i) {
    std::lock_guard<std::mutex> g(b.warps[i].mu);
    b.warps[i].cv.notify_all();
  }
  std::lock_guard<std::mutex> g(b.mu);
  b.cv.notify_all();
}

}  // namespace genfast_emu
