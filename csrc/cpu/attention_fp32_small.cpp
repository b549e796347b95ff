// The fp32 "small" CPU attention way (csrc/attention_fp32.h, genfast/ops/attention_cpu_fp32.py):
// all heads in one call, OpenMP over (batch, head); per head, the GEMMs run single-threaded on an
// AVX-512 micro-kernel (MR rows x 16 or 32 columns of C in registers, A broadcast straight from
// memory with any strides, B packed into 32-column panels), the softmax rows between them.
// Query rows go in blocks (bq, chosen by the caller) so that a thread's [bq, Nk] score blocks stay
// near its core's L2 at any length; k^T / v^T / k / v are packed once per head. No per-GEMM
// library call and no 2-thread split of a small GEMM: ~300 GFLOP/s on 2 AVX-512 cores, where
// torch's fp32 flash kernel (MKL-class micro-GEMMs) reaches ~190.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_fp32.h"
#include "cpu/attention_small.h"
#include "cpu/dtype.h"
#include "cpu/vec512.h"

namespace genfast {

#ifdef GENFAST_HAVE_AVX512
namespace {
using namespace vec512;
constexpr int64_t MR = 12, NR = 32;
// A D-wide product's last panel takes up to 16 more columns (WIDE_NR: 72 = 32 + 40, 80 = 32 + 48) on
// an 8 x 48 register block (WIDE_MR), instead of a 16-column panel on a 12 x 16 block, which is
// bound by its 12 A broadcasts per 12 FMAs and, at D = 72, uses half its lanes.
constexpr int64_t WIDE_MR = 8, WIDE_NR = 48;

// Columns of the panel at n0 of an [*, n] operand: NR, the rest, or with wide_tail the last 33-48.
inline int64_t panel_cols(int64_t n, int64_t n0, bool wide_tail) {
  const int64_t rest = n - n0;
  return wide_tail && rest > NR && rest <= WIDE_NR ? rest : std::min(NR, rest);
}
inline int64_t panel_width(int64_t cols) { return cols > NR ? WIDE_NR : NR; }
constexpr float kInf = std::numeric_limits<float>::infinity();

struct View {  // element (r, c) at p[r * rs + c * cs]
  const float* p;
  int64_t rs, cs;
};

// B [K, N] into panels of NR columns (the last one up to WIDE_NR with wide_tail, see panel_cols),
// [panel][k][width], zero-padded; panel n0 starts at dst + n0 K. k^T (a view with unit rows) goes
// through 16 x 16 register transposes, rows with unit columns through masked vectors.
GENFAST_AVX512 void pack_b(View b, int64_t k_len, int64_t n, float* dst, bool wide_tail = false) {
  for (int64_t n0 = 0, nr; n0 < n; n0 += nr) {
    nr = panel_cols(n, n0, wide_tail);
    const int64_t w = panel_width(nr);
    if (b.rs == 1 && b.cs != 1) {
      transpose32(b.p + n0 * b.cs, b.cs, nr, k_len, dst, w);  // columns nr .. padded 16: zeros
      for (int64_t c = (nr + 15) / 16 * 16; c < w; c += 16)
        for (int64_t k = 0; k < k_len; ++k) _mm512_storeu_ps(dst + k * w + c, _mm512_setzero_ps());
    } else {
      for (int64_t k = 0; k < k_len; ++k) {
        const float* src = b.p + k * b.rs + n0 * b.cs;
        float* d = dst + k * w;
        if (b.cs == 1) {
          for (int64_t c = 0; c < w; c += 16) _mm512_storeu_ps(d + c, _mm512_maskz_loadu_ps(tail(std::max<int64_t>(0, nr - c)), src + c));
          continue;
        }
        int64_t c = 0;
        for (; c < nr; ++c) d[c] = src[c * b.cs];
        for (; c < w; ++c) d[c] = 0.0f;
      }
    }
    dst += k_len * w;
  }
}

// C[0:ROWS, 0:nr] = A[0:ROWS, 0:K] B-panel[0:K, 0:nr] (NV vectors of 16 columns, nr <= 16 * NV),
// A's element (r, k) at ap[r * ars + k * acs]. A's view goes in as scalars, not as a View by value:
// the caller's copy of a struct argument was read back with one wider load that could not be
// forwarded from its two stores, which then waited for the previous call's C stores to drain
// (~10 % of a backward, 2 threads, Xeon).
template <int ROWS, int NV>
GENFAST_AVX512 void micro(int64_t k_len, const float* ap, int64_t ars, int64_t acs, const float* pb, float* c,
                          int64_t ldc, int64_t nr_acc) {
  constexpr int64_t PW = NV == 3 ? WIDE_NR : NR;  // the panel's row width
  const int64_t nr = nr_acc >> 1;
  const bool acc_c = nr_acc & 1;
  __m512 acc[ROWS][NV];
#pragma GCC unroll 12
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_len; ++k) {
    __m512 b[NV];
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(pb + k * PW + 16 * v);
    const float* ak = ap + k * acs;
#pragma GCC unroll 12
    for (int r = 0; r < ROWS; ++r) {
      const __m512 x = _mm512_set1_ps(ak[r * ars]);
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(x, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) {
      const __mmask16 t = tail(nr - 16 * v);
      store(c + r * ldc + 16 * v, t, acc_c ? _mm512_add_ps(acc[r][v], load(c + r * ldc + 16 * v, t)) : acc[r][v]);
    }
}

template <int NV>
GENFAST_AVX512 void micro_rows(int64_t rows, int64_t k_len, const float* ap, int64_t ars, int64_t acs, const float* pb,
                               float* c, int64_t ldc, int64_t nr_acc) {
  constexpr int MAX_ROWS = NV == 3 ? WIDE_MR : MR;  // (no larger blocks: they would spill)
  switch (rows) {  // the row tail of C gets its own register block
#define GENFAST_ROWS_CASE(R) \
  case R:                                                                   \
    if constexpr (R <= MAX_ROWS) micro<R, NV>(k_len, ap, ars, acs, pb, c, ldc, nr_acc); \
    break;
    GENFAST_ROWS_CASE(1) GENFAST_ROWS_CASE(2) GENFAST_ROWS_CASE(3) GENFAST_ROWS_CASE(4) GENFAST_ROWS_CASE(5)
    GENFAST_ROWS_CASE(6) GENFAST_ROWS_CASE(7) GENFAST_ROWS_CASE(8) GENFAST_ROWS_CASE(9) GENFAST_ROWS_CASE(10)
    GENFAST_ROWS_CASE(11) GENFAST_ROWS_CASE(12)
#undef GENFAST_ROWS_CASE
  }
}

inline int64_t padded(int64_t n) { return ((n + NR - 1) / NR) * NR; }

// Row stride of a [rows, nk] score block: nk rounded up to 16 floats, plus 16. Rows a multiple of
// 4 KiB apart (nk = 1024) all fall in one L1 set, and the GEMMs that read a block by columns
// (p^T dout, ds^T q: one row per k step) then missed L1 on every load (fp32 backward at 1024
// keys, 1 thread, Xeon); the pad spreads them, 64-byte aligned.
inline int64_t score_ld(int64_t nk) { return (nk + 15) / 16 * 16 + 16; }

// C [M, N] (row stride ldc, unit columns) = (C +) A [M, K] B [K, N], B packed by pack_b with
// packed_k >= K rows (a prefix of the keys under the causal mask uses the first K) and the same n
// and wide_tail.
GENFAST_AVX512 void gemm_packed(int64_t m, int64_t n, int64_t k_len, View a, const float* pack, int64_t packed_k,
                                float* c, int64_t ldc, bool acc_c = false, bool wide_tail = false) {
  for (int64_t n0 = 0, nr; n0 < n; n0 += nr) {
    nr = panel_cols(n, n0, wide_tail);
    const float* pb = pack + n0 * packed_k;
    if (nr > NR) {
      for (int64_t m0 = 0; m0 < m; m0 += WIDE_MR)
        micro_rows<3>(std::min(WIDE_MR, m - m0), k_len, a.p + m0 * a.rs, a.rs, a.cs, pb, c + m0 * ldc + n0, ldc,
                      nr << 1 | (acc_c ? 1 : 0));
      continue;
    }
    for (int64_t m0 = 0; m0 < m; m0 += MR) {
      const int64_t rows = std::min(MR, m - m0), nr_acc = nr << 1 | (acc_c ? 1 : 0);
      if (nr > 16)
        micro_rows<2>(rows, k_len, a.p + m0 * a.rs, a.rs, a.cs, pb, c + m0 * ldc + n0, ldc, nr_acc);
      else
        micro_rows<1>(rows, k_len, a.p + m0 * a.rs, a.rs, a.cs, pb, c + m0 * ldc + n0, ldc, nr_acc);
    }
  }
}

using small_attn::keys_on;

// Row i of s [nk] (raw scores): e = exp(scale s - max) over the keys in play (0 elsewhere),
// written over s, unnormalised (forward_head scales the row of e v by 1 / sum: D columns, not
// Nk). Returns sum e and sets mx = max(scale s) (-inf with no key in play: e = 0, sum 0). Base 2
// inside: scale log2(e) folded into one FMA; two passes over s, the first without a store.
GENFAST_AVX512 float exp_row(const AttnSmallParams& a, const uint8_t* m, int64_t i, int64_t nk, float* s, float& mx) {
  const __m512 c2 = _mm512_set1_ps(a.scale * kLog2e), ninf = _mm512_set1_ps(-kInf);
  const bool plain = small_attn::all_keys_on(a, m, i, nk);  // tail masks only
  __m512 vmax = ninf;
  for (int64_t j = 0; j < nk; j += 16) {
    const __mmask16 on = plain ? tail(nk - j) : keys_on(a, m, i, j, nk);
    vmax = _mm512_mask_max_ps(vmax, on, vmax, _mm512_mul_ps(_mm512_maskz_loadu_ps(on, s + j), c2));
  }
  const float mx2 = _mm512_reduce_max_ps(vmax);
  mx = mx2 * kLn2;
  if (mx2 == -kInf) {
    for (int64_t j = 0; j < nk; j += 16) _mm512_mask_storeu_ps(s + j, tail(nk - j), _mm512_setzero_ps());
    return 0.0f;
  }
  const __m512 vm = _mm512_set1_ps(mx2);
  __m512 vsum0 = _mm512_setzero_ps(), vsum1 = vsum0;
  int64_t j = 0;
  for (; j + 32 <= nk && plain; j += 32) {  // two independent sums
    const __m512 e0 = exp2_nonpos(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), c2, vm));
    const __m512 e1 = exp2_nonpos(_mm512_fmsub_ps(_mm512_loadu_ps(s + j + 16), c2, vm));
    _mm512_storeu_ps(s + j, e0);
    _mm512_storeu_ps(s + j + 16, e1);
    vsum0 = _mm512_add_ps(vsum0, e0);
    vsum1 = _mm512_add_ps(vsum1, e1);
  }
  for (; j < nk; j += 16) {
    const __mmask16 on = plain ? tail(nk - j) : keys_on(a, m, i, j, nk);
    const __m512 e = _mm512_maskz_mov_ps(on, exp2_nonpos(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(on, s + j), c2, vm)));
    _mm512_mask_storeu_ps(s + j, tail(nk - j), e);
    vsum0 = _mm512_add_ps(vsum0, e);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(vsum0, vsum1));
}

// Row i: p over s, ds = p (dp - delta) scale over dp. p = exp(scale s - lse) (0 off the keys in
// play; base 2 as the forward's rows, exp2 of one FMA, no per-vector key mask where every key is in
// play), or the forward's kept row (0 off the keys in play already), copied into s for the p^T dout
// GEMM: the block's padded rows, not the kept p's Nk-float ones, spread over the cache sets.
GENFAST_AVX512 void softmax_bwd_row(const AttnSmallParams& a, const uint8_t* m, int64_t i, int64_t nk, float lse,
                                    float delta, const float* kept, float* s, float* dp) {
  const __m512 scale = _mm512_set1_ps(a.scale), c2 = _mm512_set1_ps(a.scale * kLog2e);
  const __m512 vl = _mm512_set1_ps(lse * kLog2e), vd = _mm512_set1_ps(delta);
  const bool plain = small_attn::all_keys_on(a, m, i, nk);
  for (int64_t j = 0; j < nk; j += 16) {
    const __mmask16 t = tail(nk - j);
    const __m512 p = kept ? _mm512_maskz_loadu_ps(t, kept + j)
                          : _mm512_maskz_mov_ps(plain ? t : keys_on(a, m, i, j, nk),
                                                exp2_nonpos(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(t, s + j), c2, vl)));
    const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(t, dp + j), vd)), scale);
    _mm512_mask_storeu_ps(s + j, t, p);
    _mm512_mask_storeu_ps(dp + j, t, ds);
  }
}

// delta = rowsum(dout * out) of one query row, the term softmax_bwd_row subtracts: D products (as
// FlashAttention's backward) where rowsum(p dp) would take Nk, computed here per block rather than
// as a [B, H, Nq] pass of its own before the call (0.8 ms of a 96 ms DiT-S fp32 step on the Xeon).
// dout's row may have any column stride, out's (made by the forward) is unit.
GENFAST_AVX512 float row_delta(const float* dout, int64_t dcs, const float* out, int64_t d) {
  if (dcs != 1) {
    float sum = 0.0f;
    for (int64_t c = 0; c < d; ++c) sum += dout[c * dcs] * out[c];
    return sum;
  }
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += 16) {
    const __mmask16 t = tail(d - c);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(t, dout + c), _mm512_maskz_loadu_ps(t, out + c), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

const float* base(const AttnHeadIn& t, int64_t bi, int64_t hi) {
  return static_cast<const float*>(t.p) + bi * t.bs + hi * t.hs;
}
View head(const AttnHeadIn& t, int64_t bi, int64_t hi) { return View{base(t, bi, hi), t.ns, t.ds}; }
View head_t(const AttnHeadIn& t, int64_t bi, int64_t hi) { return View{base(t, bi, hi), t.ds, t.ns}; }
float* head(const AttnHeadOut& t, int64_t bi, int64_t hi) { return static_cast<float*>(t.p) + bi * t.bs + hi * t.hs; }

// B panels: k^T and v^T [D, Nk] and k or v [Nk, D] packed once per head, plus one per-block
// operand (dout or q rows [bq, D]).
int64_t pack_floats(const AttnSmallParams& a) {
  return 2 * padded(a.nk) * a.d + 2 * padded(a.d) * std::max(a.nk, a.bq);
}

using small_attn::block_keys;

// A thread's score blocks and B panels (small_attn::for_heads keeps them between calls), bounded
// by bq (attention_cpu.py SMALL_BLOCK_BYTES) and O(Nk D) panels.
struct Scratch {
  std::vector<float> scores, pack, inv;
  // score_blocks [bq, Nk] blocks (1 forward, 2 backward) and the panels of pack_floats(a), 64-byte
  // aligned (the micro-kernel's B loads then never straddle cache lines: -5 % on a 16x256x72
  // forward, 1 thread, Xeon); 1 / sum e of a forward block's rows
  float* score_blocks(const AttnSmallParams& a, int64_t blocks) {
    return small_attn::aligned_area(scores, static_cast<size_t>(blocks * a.bq * score_ld(a.nk)));
  }
  float* panels(const AttnSmallParams& a) { return small_attn::aligned_area(pack, static_cast<size_t>(pack_floats(a))); }
  float* row_sums(const AttnSmallParams& a) {
    if (inv.size() < static_cast<size_t>(a.bq)) inv.resize(a.bq);
    return inv.data();
  }
};

// Row i of p = e / sum e into the kept p (0 past the nk keys of a causal block): streaming stores
// where the row is 64-byte aligned, so the kept p (written once, read by the backward) costs no
// read-for-ownership of its lines and does not push the block's scores out of the cache.
GENFAST_AVX512 void keep_row(const float* e, int64_t nk, int64_t row_len, float inv, float* p) {
  const __m512 r = _mm512_set1_ps(inv);
  const auto pj = [&](int64_t j) GENFAST_AVX512 {
    return j < nk ? _mm512_mul_ps(_mm512_maskz_loadu_ps(tail(nk - j), e + j), r) : _mm512_setzero_ps();
  };
  int64_t j = 0;
  if ((reinterpret_cast<uintptr_t>(p) & 63) == 0)
    for (; j + 16 <= row_len; j += 16) _mm512_stream_ps(p + j, pj(j));
  for (; j < row_len; j += 16) _mm512_mask_storeu_ps(p + j, tail(row_len - j), pj(j));
}

// Query blocks first .. last - 1 of one head (k^T and v packed once for them); with a.p_keep, p
// into the head's rows there too (the backward then reads it instead of recomputing q k^T and the
// exponentials).
GENFAST_AVX512 void forward_head(const AttnSmallParams& a, int64_t bi, int64_t hi, int64_t first, int64_t last,
                                 float* s, float* pack, float* inv) {
  const uint8_t* m = a.mask ? a.mask + bi * a.mask_bs : nullptr;
  const View q = head(a.q, bi, hi);
  float* out = head(a.out, bi, hi);
  float* lse = a.lse + (bi * a.h + hi) * a.nq;
  float* keep = a.p_keep ? static_cast<float*>(a.p_keep) + (bi * a.h + hi) * a.nq * a.nk : nullptr;
  // k^T and v packed once for all query blocks (causal blocks read a prefix of the keys: the
  // first nk rows of v's panels, the first nk columns of k^T's)
  float *kt = pack, *v = pack + padded(a.nk) * a.d;
  pack_b(head_t(a.k, bi, hi), a.d, a.nk, kt);
  pack_b(head(a.v, bi, hi), a.nk, a.d, v, true);
  for (int64_t i0 = first * a.bq; i0 < std::min(a.nq, last * a.bq); i0 += a.bq) {
    const int64_t rows = std::min(a.bq, a.nq - i0), nk = block_keys(a, i0 + rows), ld = score_ld(nk);
    gemm_packed(rows, nk, a.d, View{q.p + i0 * q.rs, q.rs, q.cs}, kt, a.d, s, ld);  // s = q k^T
    for (int64_t i = 0; i < rows; ++i) {
      float mx;
      const float sum = exp_row(a, m, i0 + i, nk, s + i * ld, mx);
      lse[i0 + i] = sum > 0.0f ? mx + std::log(sum) : kInf;
      inv[i] = sum > 0.0f ? 1.0f / sum : 0.0f;
      if (keep) keep_row(s + i * ld, nk, a.nk, inv[i], keep + (i0 + i) * a.nk);
    }
    gemm_packed(rows, a.d, nk, View{s, ld, 1}, v, a.nk, out + i0 * a.out.ns, a.out.ns, false, true);  // e v
    for (int64_t i = 0; i < rows; ++i) {  // p v: the rows of e v over their sums
      float* o = out + (i0 + i) * a.out.ns;
      const __m512 r = _mm512_set1_ps(inv[i]);
      for (int64_t c = 0; c < a.d; c += 16) {
        const __mmask16 t = tail(a.d - c);
        _mm512_mask_storeu_ps(o + c, t, _mm512_mul_ps(_mm512_maskz_loadu_ps(t, o + c), r));
      }
    }
  }
  if (keep) _mm_sfence();  // the streamed rows are visible before the call returns
}

// With a.p_keep: p read from the forward's kept rows (no q k^T, no exponentials), ds over dp.
GENFAST_AVX512 void backward_head(const AttnSmallParams& a, int64_t bi, int64_t hi, float* s, float* pack) {
  const uint8_t* m = a.mask ? a.mask + bi * a.mask_bs : nullptr;
  const View q = head(a.q, bi, hi), dout = head(a.dout, bi, hi), o = head(a.o, bi, hi);
  float *dq = head(a.dq, bi, hi), *dk = head(a.dk, bi, hi), *dv = head(a.dv, bi, hi);
  const float* kept = a.p_keep ? static_cast<const float*>(a.p_keep) + (bi * a.h + hi) * a.nq * a.nk : nullptr;
  float *kt = pack, *vt = kt + padded(a.nk) * a.d, *k = vt + padded(a.nk) * a.d;
  float* blk = k + padded(a.d) * std::max(a.nk, a.bq);
  if (!kept) pack_b(head_t(a.k, bi, hi), a.d, a.nk, kt);
  pack_b(head_t(a.v, bi, hi), a.d, a.nk, vt);
  pack_b(head(a.k, bi, hi), a.nk, a.d, k, true);
  const int64_t row0 = (bi * a.h + hi) * a.nq;
  for (int64_t i0 = 0; i0 < a.nq; i0 += a.bq) {
    const int64_t rows = std::min(a.bq, a.nq - i0), nk = block_keys(a, i0 + rows), ld = score_ld(nk);
    float* dp = s + rows * ld;
    const View qb{q.p + i0 * q.rs, q.rs, q.cs}, dob{dout.p + i0 * dout.rs, dout.rs, dout.cs};
    if (!kept) gemm_packed(rows, nk, a.d, qb, kt, a.d, s, ld);  // s = q k^T
    gemm_packed(rows, nk, a.d, dob, vt, a.d, dp, ld);            // dp = dout v^T
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = i0 + i;
      const float delta = row_delta(dout.p + r * dout.rs, dout.cs, o.p + r * o.rs, a.d);
      softmax_bwd_row(a, m, r, nk, a.lse[row0 + r], delta, kept ? kept + r * a.nk : nullptr, s + i * ld, dp + i * ld);
    }
    // with causal, keys past this block's last row are 0 in p and ds: left out (nk). The first
    // block stores its sums (the keys it leaves out start at zero), later ones add to them.
    const bool acc = i0 > 0;
    if (!acc)
      for (int64_t j = nk; j < a.nk; ++j) {
        std::fill(dk + j * a.dk.ns, dk + j * a.dk.ns + a.d, 0.0f);
        std::fill(dv + j * a.dv.ns, dv + j * a.dv.ns + a.d, 0.0f);
      }
    pack_b(dob, rows, a.d, blk, true);
    gemm_packed(nk, a.d, rows, View{s, 1, ld}, blk, rows, dv, a.dv.ns, acc, true);  // dv (+)= p^T dout
    pack_b(qb, rows, a.d, blk, true);
    gemm_packed(nk, a.d, rows, View{dp, 1, ld}, blk, rows, dk, a.dk.ns, acc, true);  // dk (+)= ds^T q
    gemm_packed(rows, a.d, nk, View{dp, ld, 1}, k, a.nk, dq + i0 * a.dq.ns, a.dq.ns, false, true);  // dq = ds k
  }
}
}  // namespace

bool attn_small_supported() { return vec512::cpu_has_avx512_bf16(); }

void attn_small_forward_cpu(const AttnSmallParams& a) {
  if (a.b * a.h == 0 || a.nq == 0 || a.nk == 0) return;
  small_attn::for_query_parts<Scratch>(a, [&](int64_t bi, int64_t hi, int64_t first, int64_t last, Scratch& sc) {
    forward_head(a, bi, hi, first, last, sc.score_blocks(a, 1), sc.panels(a), sc.row_sums(a));
  });
}

void attn_small_backward_cpu(const AttnSmallParams& a) {
  if (a.b * a.h == 0 || a.nq == 0 || a.nk == 0) return;
  // dk and dv sum over all query blocks of a head: one thread per head
  small_attn::for_heads<Scratch>(a, 1, [&](int64_t bi, int64_t hi, int64_t, Scratch& sc) {
    backward_head(a, bi, hi, sc.score_blocks(a, 2), sc.panels(a));
  });
}
#else
bool attn_small_supported() { return false; }
void attn_small_forward_cpu(const AttnSmallParams&) {}
void attn_small_backward_cpu(const AttnSmallParams&) {}
#endif

}  // namespace genfast
