// Shared by the fp32 and bf16 "small" CPU attention ways (attention_fp32_small.cpp,
// attention_bf16_small.cpp): which keys a query row attends to, and how heads and query blocks are
// spread over the OpenMP threads.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "attention_fp32.h"
#include "cpu/vec512.h"

#ifdef GENFAST_HAVE_AVX512
namespace genfast {
namespace small_attn {
// Key lanes j0..j0+15 of query row i in play: before the causal limit (of nk keys), not padding.
GENFAST_AVX512 inline __mmask16 keys_on(const AttnSmallParams& a, const uint8_t* m, int64_t i, int64_t j0,
                                        int64_t nk) {
  const int64_t limit = a.causal ? std::min<int64_t>(nk, i + 1) : nk;
  __mmask16 k = vec512::tail(limit - j0 > 0 ? limit - j0 : 0);
  if (m) {
    const __m128i bytes = _mm_maskz_loadu_epi8(k, m + j0);
    k &= _mm_test_epi8_mask(bytes, bytes);
  }
  return k;
}

// Every key of row i in play (no key mask, not cut by the causal limit): the rows then need no
// per-vector key mask, only the tail's.
inline bool all_keys_on(const AttnSmallParams& a, const uint8_t* m, int64_t i, int64_t nk) {
  return !m && (!a.causal || i + 1 >= nk);
}

// At least n elements of v (kept between calls), starting on a 64-byte boundary: the scratch of the
// small ways. Vector loads that straddle cache lines cost more, AMX tile loads 6.7x (see
// attention_bf16_amx.cpp); callers keep their operands at multiples of 16 elements into the area.
template <typename T>
T* aligned_area(std::vector<T>& v, size_t n) {
  if (v.size() < n + 64 / sizeof(T)) v.resize(n + 64 / sizeof(T));
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
}

// Keys a block of query rows [i0, i1) needs: all, or under the causal mask only 0 .. i1 - 1.
inline int64_t block_keys(const AttnSmallParams& a, int64_t i1) { return a.causal ? std::min(a.nk, i1) : a.nk; }

// body(bi, hi, part, scratch) for every head and each of its `parts` ranges of query blocks, OpenMP
// over them. scratch is the thread's own Scratch, kept between calls (OpenMP threads persist): no
// fresh pages a call.
template <typename Scratch, typename F>
void for_heads(const AttnSmallParams& a, int64_t parts, F&& body) {
#pragma omp parallel
  {
    static thread_local Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < a.b * a.h * parts; ++w) {
      const int64_t g = w / parts;
      body(g / a.h, g % a.h, w % parts, scratch);
    }
  }
}

// The forward: body(bi, hi, first, last, scratch) for query blocks first .. last - 1 of a head.
// Fewer heads than ~2 per thread: each head's query blocks are split too (independent in the
// forward; each part packs k and v again), so that no thread idles on a single-head call.
template <typename Scratch, typename F>
void for_query_parts(const AttnSmallParams& a, F&& body) {
  const int64_t blocks = (a.nq + a.bq - 1) / a.bq, heads = a.b * a.h;
  const int64_t parts = std::min(blocks, std::max<int64_t>(1, (2 * omp_get_max_threads() + heads - 1) / heads));
  const int64_t per = (blocks + parts - 1) / parts;
  for_heads<Scratch>(a, parts, [&](int64_t bi, int64_t hi, int64_t part, Scratch& sc) {
    body(bi, hi, part * per, std::min(blocks, (part + 1) * per), sc);
  });
}
}  // namespace small_attn
}  // namespace genfast
#endif
