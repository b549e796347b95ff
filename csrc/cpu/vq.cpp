// Nearest-codebook lookup and per-code counts on the CPU (see vq.h for the math).
//
// GEMM-style blocking, with the argmin folded into the epilogue so the n x k score matrix never
// exists:
//   - the work is split into tasks of (z rows, code range); each OpenMP thread takes tasks;
//   - a task walks its codes in blocks of kc codes (~192 KiB of fp32, so a block stays in L2),
//     packed into panels of 64 codes laid out [d][64] and pre-scaled (-2 c for l2, -c/|c| for
//     cosine) with the bias (|c|^2 or 0) beside them: score = bias + z . packed;
//   - a 6-row x 64-code register tile (24 AVX-512 accumulators, fp32 FMA) runs over d, then each
//     lane keeps its own running min and argmin (strict <, so the lowest index wins a tie); a
//     row's 16 lanes are reduced once per block.
// The AVX-512 path is intrinsics compiled for that ISA only (picked at run time); other CPUs get
// a loop GCC vectorises, cloned per ISA. Never -march=native (DESIGN.md §2).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define GENFAST_VQ_AVX512 1
#endif

#include "cpu/dtype.h"
#include "cpu/vq_rows.h"
#include "vq.h"

namespace genfast {
namespace {
using namespace vq_cpu;

constexpr int kNR = 64;                     // codes per packed panel
constexpr int kMR = 6;                      // z rows per register tile
constexpr int64_t kBlockFloats = 48 << 10;  // packed codes per block: 192 KiB of fp32

// Codes [k0, k0 + kc) into panels[(panel * d + i) * kNR + lane] and bias[panel * kNR + lane];
// the padding of the last panel scores +inf (zero codes, infinite bias): never chosen.
void pack_block(const VqParams& p, int64_t k0, int64_t kc, float* panels, float* bias, float* row) {
  const int64_t npan = (kc + kNR - 1) / kNR, d = p.d;
  for (int64_t j = 0; j < npan * kNR; ++j) {
    float* dst = panels + (j / kNR) * d * kNR + (j % kNR);
    if (j >= kc) {
      for (int64_t i = 0; i < d; ++i) dst[i * kNR] = 0.0f;
      bias[j] = kInf;
      continue;
    }
    row_any(p.c_dtype, p.codebook, (k0 + j) * p.c_rs, p.c_cs, d, row);
    float scale;
    code_scale_bias(p, row, &scale, &bias[j]);
    for (int64_t i = 0; i < d; ++i) dst[i * kNR] = scale * row[i];
  }
}

// ---------------------------------------------------------------- portable register tile
// acc[r][lane] over d with plain loops over the 64 lanes (GCC vectorises them per clone).
template <int MR>
GENFAST_CPU_CLONES void tile_generic(const float* const* zr, int64_t d, const float* panels, const float* bias,
                                     int64_t npan, int64_t k0, float* best, int64_t* best_idx) {
  for (int64_t pn = 0; pn < npan; ++pn) {
    const float* b = panels + pn * d * kNR;
    float acc[MR][kNR] = {};
    for (int64_t i = 0; i < d; ++i) {
      for (int r = 0; r < MR; ++r) {
        const float a = zr[r][i];
        for (int j = 0; j < kNR; ++j) acc[r][j] += a * b[i * kNR + j];
      }
    }
    for (int r = 0; r < MR; ++r) {
      for (int j = 0; j < kNR; ++j) {
        const float s = acc[r][j] + bias[pn * kNR + j];
        if (s < best[r]) {  // strict, codes in increasing order: the lowest index wins a tie
          best[r] = s;
          best_idx[r] = k0 + pn * kNR + j;
        }
      }
    }
  }
}

#ifdef GENFAST_VQ_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
// 16 lanes x 4 vectors = one panel; lane l of vector v holds code 16 v + l of the panel.
template <int MR>
void tile_avx512(const float* const* zr, int64_t d, const float* panels, const float* bias, int64_t npan,
                 int64_t k0, float* best, int64_t* best_idx) {
  __m512 minv[MR];
  __m512i argv[MR];
  for (int r = 0; r < MR; ++r) {
    minv[r] = _mm512_set1_ps(kInf);
    argv[r] = _mm512_setzero_si512();
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t pn = 0; pn < npan; ++pn) {
    const float* b = panels + pn * d * kNR;
    __m512 acc[MR][4];
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; ++i) {
      const __m512 b0 = _mm512_loadu_ps(b + i * kNR), b1 = _mm512_loadu_ps(b + i * kNR + 16);
      const __m512 b2 = _mm512_loadu_ps(b + i * kNR + 32), b3 = _mm512_loadu_ps(b + i * kNR + 48);
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        const __m512 a = _mm512_set1_ps(zr[r][i]);
        acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(a, b2, acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(a, b3, acc[r][3]);
      }
    }
    const int32_t base = static_cast<int32_t>(pn * kNR);  // code index within the block
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      const __m512 bv = _mm512_loadu_ps(bias + pn * kNR + 16 * v);
      const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32(base + 16 * v));
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        const __m512 s = _mm512_add_ps(acc[r][v], bv);
        const __mmask16 lt = _mm512_cmp_ps_mask(s, minv[r], _CMP_LT_OQ);  // NaN: false
        minv[r] = _mm512_mask_mov_ps(minv[r], lt, s);
        argv[r] = _mm512_mask_mov_epi32(argv[r], lt, idx);
      }
    }
  }
  // Lanes in lane order, strict <: among equal minima the lowest code index wins (every lane
  // holds codes of increasing index, and lane l < lane l' at equal panel position).
  for (int r = 0; r < MR; ++r) {
    alignas(64) float mv[16];
    alignas(64) int32_t av[16];
    _mm512_store_ps(mv, minv[r]);
    _mm512_store_si512(av, argv[r]);
    float m = best[r];
    int64_t a = -1;
    for (int l = 0; l < 16; ++l) {
      if (mv[l] < m || (a >= 0 && mv[l] == m && av[l] < a)) {
        m = mv[l];
        a = av[l];
      }
    }
    if (a >= 0) {
      best[r] = m;
      best_idx[r] = k0 + a;
    }
  }
}
#pragma GCC pop_options
#endif

using TileFn = void (*)(const float* const*, int64_t, const float*, const float*, int64_t, int64_t, float*, int64_t*);

template <template <int> class Pick>
TileFn tile_for_rows(int rows) {
  switch (rows) {
    case 1: return Pick<1>::fn;
    case 2: return Pick<2>::fn;
    case 3: return Pick<3>::fn;
    case 4: return Pick<4>::fn;
    case 5: return Pick<5>::fn;
    default: return Pick<6>::fn;
  }
}
template <int MR>
struct PickGeneric {
  static constexpr TileFn fn = tile_generic<MR>;
};
#ifdef GENFAST_VQ_AVX512
template <int MR>
struct PickAvx512 {
  static constexpr TileFn fn = tile_avx512<MR>;
};
#endif

bool use_avx512() {
#ifdef GENFAST_VQ_AVX512
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return ok;
#else
  return false;
#endif
}

// Rows [n0, n1) against codes [ka, kb): best score and index per row into best / best_idx
// (indexed from n0), initialised by the caller.
void run_task(const VqParams& p, int64_t n0, int64_t n1, int64_t ka, int64_t kb, float* best, int64_t* best_idx) {
  const int64_t d = p.d;
  const int64_t kc = std::max<int64_t>(kNR, (kBlockFloats / d) / kNR * kNR);
  std::vector<float> panels(static_cast<size_t>(std::min(kc, (kb - ka + kNR - 1) / kNR * kNR) * d));
  std::vector<float> bias(panels.size() / d);
  std::vector<float> zbuf(static_cast<size_t>(kMR * d));
  std::vector<float> row(static_cast<size_t>(d));
  const bool direct = p.z_dtype == kFloat32 && (p.z_cs == 1 || d == 1);  // read z in place
  const bool wide = use_avx512();
  for (int64_t k0 = ka; k0 < kb; k0 += kc) {
    const int64_t n_codes = std::min(kc, kb - k0), npan = (n_codes + kNR - 1) / kNR;
    pack_block(p, k0, n_codes, panels.data(), bias.data(), row.data());
    for (int64_t r0 = n0; r0 < n1; r0 += kMR) {
      const int rows = static_cast<int>(std::min<int64_t>(kMR, n1 - r0));
      const float* zr[kMR];
      for (int r = 0; r < rows; ++r) {
        if (direct) {
          zr[r] = static_cast<const float*>(p.z) + z_row(p, r0 + r);
        } else {
          row_any(p.z_dtype, p.z, z_row(p, r0 + r), p.z_cs, d, zbuf.data() + r * d);
          zr[r] = zbuf.data() + r * d;
        }
      }
#ifdef GENFAST_VQ_AVX512
      TileFn fn = wide ? tile_for_rows<PickAvx512>(rows) : tile_for_rows<PickGeneric>(rows);
#else
      TileFn fn = tile_for_rows<PickGeneric>(rows);
#endif
      fn(zr, d, panels.data(), bias.data(), npan, k0, best + (r0 - n0), best_idx + (r0 - n0));
    }
  }
}

// The chosen code's distance, directly (no cancellation): see vq.h.
float chosen_distance(const VqParams& p, int64_t r, int64_t k, float* zrow, float* crow) {
  row_any(p.z_dtype, p.z, z_row(p, r), p.z_cs, p.d, zrow);
  row_any(p.c_dtype, p.codebook, k * p.c_rs, p.c_cs, p.d, crow);
  if (p.metric == kVqL2) {
    float s = 0.0f;
    for (int64_t i = 0; i < p.d; ++i) s += (zrow[i] - crow[i]) * (zrow[i] - crow[i]);
    return s;
  }
  float zz = 0.0f, cc = 0.0f;
  for (int64_t i = 0; i < p.d; ++i) {
    zz += zrow[i] * zrow[i];
    cc += crow[i] * crow[i];
  }
  const float iz = 1.0f / std::max(std::sqrt(zz), kVqNormEps), ic = 1.0f / std::max(std::sqrt(cc), kVqNormEps);
  float s = 0.0f;
  for (int64_t i = 0; i < p.d; ++i) s += (zrow[i] * iz - crow[i] * ic) * (zrow[i] * iz - crow[i] * ic);
  return s;
}

}  // namespace

void vq_nearest_cpu(const VqParams& p) {
  if (p.n == 0) return;
  const int threads = omp_get_max_threads();
  // Split rows when there are enough for every thread; else split codes too and merge in code
  // order (strict <), which keeps the lowest index on ties.
  const int64_t work = p.n * p.k * p.d;
  const int team = work < (1 << 18) ? 1 : threads;
  const int64_t row_parts = std::max<int64_t>(1, std::min<int64_t>(team, (p.n + kMR - 1) / kMR));
  const int64_t code_parts = std::max<int64_t>(1, std::min<int64_t>(team / row_parts, (p.k + kNR - 1) / kNR));
  const int64_t tasks = row_parts * code_parts;
  const int64_t rows_per = ((p.n + row_parts - 1) / row_parts + kMR - 1) / kMR * kMR;
  const int64_t codes_per = ((p.k + code_parts - 1) / code_parts + kNR - 1) / kNR * kNR;
  // The bf16 screen pays off once the products dominate (it needs AVX-512 BF16 and, to beat
  // the fp32 kernel's epilogue, D of at least a few dozen).
  const bool screen = p.precision == kVqBf16Screen && vq_screen_supported();
  std::vector<float> best(static_cast<size_t>(p.n * code_parts), kInf);
  std::vector<int64_t> arg(static_cast<size_t>(p.n * code_parts), 0);
#pragma omp parallel for schedule(static, 1) num_threads(team)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t rp = t / code_parts, cp = t % code_parts;
    const int64_t n0 = rp * rows_per, n1 = std::min(p.n, n0 + rows_per);
    const int64_t ka = cp * codes_per, kb = std::min(p.k, ka + codes_per);
    if (n0 >= n1 || ka >= kb) continue;
    if (screen)
      vq_screen_task(p, n0, n1, ka, kb, best.data() + cp * p.n + n0, arg.data() + cp * p.n + n0);
    else
      run_task(p, n0, n1, ka, kb, best.data() + cp * p.n + n0, arg.data() + cp * p.n + n0);
  }
  for (int64_t r = 0; r < p.n; ++r) {
    float b = best[r];
    int64_t a = arg[r];
    for (int64_t cp = 1; cp < code_parts; ++cp) {
      if (best[cp * p.n + r] < b) {
        b = best[cp * p.n + r];
        a = arg[cp * p.n + r];
      }
    }
    p.indices[r] = a;
  }
  if (p.distance) {
#pragma omp parallel num_threads(team)
    {
      std::vector<float> zrow(static_cast<size_t>(p.d)), crow(static_cast<size_t>(p.d));
#pragma omp for schedule(static)
      for (int64_t r = 0; r < p.n; ++r) p.distance[r] = chosen_distance(p, r, p.indices[r], zrow.data(), crow.data());
    }
  }
}

void vq_counts_cpu(const VqCountsParams& p) {
  std::fill(p.counts, p.counts + p.k, int64_t{0});
  if (p.n == 0) return;
  const int threads = p.n < (1 << 16) ? 1 : omp_get_max_threads();
  if (threads == 1) {
    for (int64_t i = 0; i < p.n; ++i) {
      const uint64_t v = static_cast<uint64_t>(p.indices[i * p.idx_stride]);
      if (v < static_cast<uint64_t>(p.k)) ++p.counts[v];  // out of range (negative too): not counted
    }
    return;
  }
  // One private histogram per thread, summed: no atomics in the hot loop.
  std::vector<int64_t> local(static_cast<size_t>(threads * p.k), 0);
#pragma omp parallel num_threads(threads)
  {
    int64_t* h = local.data() + omp_get_thread_num() * p.k;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < p.n; ++i) {
      const uint64_t v = static_cast<uint64_t>(p.indices[i * p.idx_stride]);
      if (v < static_cast<uint64_t>(p.k)) ++h[v];
    }
  }
  for (int t = 0; t < threads; ++t)
    for (int64_t c = 0; c < p.k; ++c) p.counts[c] += local[t * p.k + c];
}

}  // namespace genfast
