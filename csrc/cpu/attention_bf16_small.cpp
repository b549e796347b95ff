// The bf16 "small" CPU attention way (csrc/attention_fp32.h, genfast/ops/attention_cpu_fp32.py):
// the fp32 "small" way's structure (attention_fp32_small.cpp: OpenMP over (batch, head), query
// rows in blocks that stay in the core's L2, one C++ call for all heads) on AVX-512 BF16 dot
// products. vdpbf16ps multiplies PAIRS of bf16 along a GEMM's inner dimension into fp32 sums, so
// every operand is read as 32-bit words holding two consecutive-k elements:
//   A (broadcast): the word of row r at pair kk sits at a.p + r * rs + kk * cs (two adjacent bf16);
//   B (packed):    panels of w columns, [panel][pair][w] words, zero-padded; w = panel_width(N):
//                  head dims up to 80 in ONE register block of 16-column vectors plus, for 8
//                  past a multiple of 16 (72: DiT-XL/2, PixArt), one 8-column (ymm) vector; with
//                  32-column panels 72 had left a 16-column tail at half the rate.
// Operands whose pairs are not adjacent in memory (p^T and ds^T for dv and dk, whose inner
// dimension is the query rows) are written pair-interleaved by the softmax backward rows
// ([row pair][key] words), so no GEMM reads a transposed view.
//
// Numerics: scores, softmax, lse, rowsum(p dp) and the dk / dv sums in fp32; p and ds rounded to
// bf16 for the GEMMs that read them, as plain bf16 PyTorch does (and FlashAttention on GPUs).
// The scores themselves stay fp32 (the "heads" way rounds them to bf16 between its GEMMs).
#include <omp.h>

#include "cpu/attention_bf16_rows.h"

namespace genfast {

#ifdef GENFAST_HAVE_AVX512
namespace {
using namespace vec512;
using namespace bf16_rows;

inline int64_t panel_width(int64_t n) { return n <= 80 ? std::max<int64_t>(8, (n + 7) / 8 * 8) : 32; }

struct Pairs {  // an A operand: see the file comment
  const u16* p;
  int64_t rs, cs;
};

GENFAST_AVX512 inline __m512bh bcast(const u16* p) {
  u32 w;
  std::memcpy(&w, p, 4);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(w));
}

// C[0:ROWS, 0:nr] (+)= A[0:ROWS, pairs 0:k2] B-panel of NF vectors of 16 columns and, with HALF,
// one of 8 (ymm: head dims 8 past a multiple of 16, 72 above all, pay for 8 columns, not 16);
// nr <= panel width, vectors wholly past nr compute zeros that are not stored. CT float: fp32
// (acc_c adds to C); CT BFloat16: rounded to bf16, row r first scaled by row_scale[r] when given.
template <int ROWS, int NF, bool HALF, typename CT>
GENFAST_AVX512 void micro(int64_t k2, Pairs a, const u32* pb, CT* c, int64_t ldc, int64_t nr, bool acc_c,
                          const float* row_scale) {
  constexpr int64_t w = 16 * NF + (HALF ? 8 : 0);
  __m512 acc[ROWS][NF > 0 ? NF : 1];
  __m256 acc_h[ROWS];
#pragma GCC unroll 12
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 5
    for (int v = 0; v < NF; ++v) acc[r][v] = _mm512_setzero_ps();
    acc_h[r] = _mm256_setzero_ps();
  }
  for (int64_t kk = 0; kk < k2; ++kk) {
    __m512bh b[NF > 0 ? NF : 1];
#pragma GCC unroll 5
    for (int v = 0; v < NF; ++v) b[v] = (__m512bh)_mm512_loadu_si512(pb + kk * w + 16 * v);
    __m256bh bh{};
    if constexpr (HALF) bh = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + kk * w + 16 * NF));
    const u16* ak = a.p + kk * a.cs;
#pragma GCC unroll 12
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh x = bcast(ak + r * a.rs);
#pragma GCC unroll 5
      for (int v = 0; v < NF; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, b[v]);
      if constexpr (HALF) acc_h[r] = _mm256_dpbf16_ps(acc_h[r], (__m256bh)_mm512_castsi512_si256((__m512i)x), bh);
    }
  }
  const int64_t half_lanes = nr - 16 * NF;  // of the 8-column vector
  const __mmask8 th = half_lanes <= 0 ? 0 : half_lanes >= 8 ? 0xff : static_cast<__mmask8>((1u << half_lanes) - 1);
#pragma GCC unroll 12
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 5
    for (int v = 0; v < NF; ++v) {
      if (16 * v >= nr) break;
      const __mmask16 t = tail(nr - 16 * v);
      CT* cp = c + r * ldc + 16 * v;
      if constexpr (sizeof(CT) == 4)
        store(cp, t, acc_c ? _mm512_add_ps(acc[r][v], load(cp, t)) : acc[r][v]);
      else
        store(cp, t, row_scale ? _mm512_mul_ps(acc[r][v], _mm512_set1_ps(row_scale[r])) : acc[r][v]);
    }
    if constexpr (HALF) {
      CT* cp = c + r * ldc + 16 * NF;
      if constexpr (sizeof(CT) == 4) {
        _mm256_mask_storeu_ps(cp, th, acc_c ? _mm256_add_ps(acc_h[r], _mm256_maskz_loadu_ps(th, cp)) : acc_h[r]);
      } else {
        const __m256 y = row_scale ? _mm256_mul_ps(acc_h[r], _mm256_set1_ps(row_scale[r])) : acc_h[r];
        _mm_mask_storeu_epi16(cp, th, reinterpret_cast<__m128i>(_mm256_cvtneps_pbh(y)));
      }
    }
  }
}

// Rows of C per register block for NV vectors of columns (an 8-column one counts as one):
// ROWS x NV accumulators <= 25 of the 32 zmm registers (with NV B vectors and a broadcast), at
// least ~12 in flight for vdpbf16ps.
template <int NV>
constexpr int kRows = NV <= 2 ? 12 : NV == 3 ? 8 : NV == 4 ? 6 : 5;

template <int R, int NF, bool HALF, typename CT>
GENFAST_AVX512 void micro_rows(int64_t rows, int64_t k2, Pairs a, const u32* pb, CT* c, int64_t ldc, int64_t nr,
                               bool acc_c, const float* row_scale) {
  if constexpr (R > 1)  // the row tail of C gets its own register block
    if (rows < R) return micro_rows<R - 1, NF, HALF, CT>(rows, k2, a, pb, c, ldc, nr, acc_c, row_scale);
  micro<R, NF, HALF, CT>(k2, a, pb, c, ldc, nr, acc_c, row_scale);
}

template <int NF, bool HALF, typename CT>
GENFAST_AVX512 void gemm_nv(int64_t m, int64_t n, int64_t k2, Pairs a, const u32* pack, int64_t packed_k2, CT* c,
                            int64_t ldc, bool acc_c, const float* row_scale) {
  constexpr int64_t w = 16 * NF + (HALF ? 8 : 0), mr = kRows<NF + (HALF ? 1 : 0)>;
  for (int64_t n0 = 0; n0 < n; n0 += w) {
    const u32* pb = pack + (n0 / w) * packed_k2 * w;
    const int64_t nr = std::min(w, n - n0);
    for (int64_t m0 = 0; m0 < m; m0 += mr)
      micro_rows<mr, NF, HALF, CT>(std::min(mr, m - m0), k2, Pairs{a.p + m0 * a.rs, a.rs, a.cs}, pb,
                                   c + m0 * ldc + n0, ldc, nr, acc_c, row_scale ? row_scale + m0 : nullptr);
  }
}

// C [M, N] (+)= A [M, pairs k2] B, B packed in panels of w = panel_width(N) columns with
// packed_k2 >= k2 word rows each (a causal prefix of the keys uses the first k2).
template <typename CT>
GENFAST_AVX512 void gemm(int64_t m, int64_t n, int64_t k2, Pairs a, const u32* pack, int64_t packed_k2, int64_t w,
                         CT* c, int64_t ldc, bool acc_c = false, const float* row_scale = nullptr) {
  switch (w) {
#define GENFAST_W_CASE(W) \
  case W: return gemm_nv<W / 16, W % 16 != 0, CT>(m, n, k2, a, pack, packed_k2, c, ldc, acc_c, row_scale);
    GENFAST_W_CASE(8) GENFAST_W_CASE(16) GENFAST_W_CASE(24) GENFAST_W_CASE(32) GENFAST_W_CASE(40)
    GENFAST_W_CASE(48) GENFAST_W_CASE(56) GENFAST_W_CASE(64) GENFAST_W_CASE(72)
#undef GENFAST_W_CASE
    default: return gemm_nv<5, false, CT>(m, n, k2, a, pack, packed_k2, c, ldc, acc_c, row_scale);
  }
}

using small_attn::block_keys;

GENFAST_AVX512 void forward_head(const AttnSmallParams& a, int64_t bi, int64_t hi, int64_t first, int64_t last,
                                 Scratch& sc) {
  const uint8_t* m = a.mask ? a.mask + bi * a.mask_bs : nullptr;
  const u16 *q = at(a.q, bi, hi), *k = at(a.k, bi, hi), *v = at(a.v, bi, hi);
  BFloat16* out = at(a.out, bi, hi);
  const int64_t g = bi * a.h + hi, nkp = even(a.nk), k2 = pairs(a.nk);
  const int64_t wk = panel_width(a.nk), wd = panel_width(a.d);
  float* lse = a.lse + g * a.nq;
  BFloat16* keep = a.p_keep ? static_cast<BFloat16*>(a.p_keep) + g * a.nq * a.nk : nullptr;
  // words: k^T panels, v panels, then e (bf16) of one block
  u32* kt = sc.words(padded(a.nk, wk) * a.d / 2 + padded(a.d, wd) * k2 + a.bq * nkp / 2);
  u32* vp = kt + padded(a.nk, wk) * a.d / 2;
  BFloat16* p16 = reinterpret_cast<BFloat16*>(vp + padded(a.d, wd) * k2);
  float* s = sc.floats(a.bq * a.nk + a.bq);  // scores of one block, then 1 / sum e of its rows
  float* inv = s + a.bq * a.nk;
  pack_cols(k, a.k.ns, a.d, a.nk, wk, kt);
  pack_rows(v, a.v.ns, a.nk, a.d, wd, vp);
  for (int64_t i0 = first * a.bq; i0 < std::min(a.nq, last * a.bq); i0 += a.bq) {
    const int64_t rows = std::min(a.bq, a.nq - i0), nk = block_keys(a, i0 + rows);
    gemm<float>(rows, nk, a.d / 2, Pairs{q + i0 * a.q.ns, a.q.ns, 2}, kt, a.d / 2, wk, s, nk);  // s = q k^T
    for (int64_t i = 0; i < rows; ++i) {
      BFloat16* kr = keep ? keep + (i0 + i) * a.nk : nullptr;
      lse[i0 + i] = softmax_row(a, m, i0 + i, nk, s + i * nk, p16 + i * nkp, kr, inv + i);
      if (kr)
        for (int64_t j = nk; j < a.nk; ++j) kr[j] = BFloat16{0};  // causal: keys past the block
    }
    lse_rows(lse + i0, inv, rows);  // the rows' base-2 maxima into lse
    gemm<BFloat16>(rows, a.d, pairs(nk), Pairs{reinterpret_cast<const u16*>(p16), nkp, 2}, vp, k2, wd,
                   out + i0 * a.out.ns, a.out.ns, false, inv);  // out = (e v) / sum e
  }
}

GENFAST_AVX512 void backward_head(const AttnSmallParams& a, int64_t bi, int64_t hi, Scratch& sc) {
  const uint8_t* m = a.mask ? a.mask + bi * a.mask_bs : nullptr;
  const u16 *q = at(a.q, bi, hi), *k = at(a.k, bi, hi), *v = at(a.v, bi, hi), *dout = at(a.dout, bi, hi);
  BFloat16 *dq = at(a.dq, bi, hi), *dk = at(a.dk, bi, hi), *dv = at(a.dv, bi, hi);
  const int64_t g = bi * a.h + hi, nkp = even(a.nk), k2 = pairs(a.nk), bq2 = pairs(a.bq), d2 = a.d / 2;
  const int64_t wk = panel_width(a.nk), wd = panel_width(a.d);
  const float* lse = a.lse + g * a.nq;
  const BFloat16* kept = a.p_keep ? static_cast<const BFloat16*>(a.p_keep) + g * a.nq * a.nk : nullptr;
  // words: k^T, v^T, k panels, one block's dout / q panels, p^T and ds^T pairs, ds (bf16) rows
  const int64_t n_kt = padded(a.nk, wk) * d2, n_k = padded(a.d, wd) * k2, n_blk = padded(a.d, wd) * bq2;
  u32* kt = sc.words(2 * n_kt + n_k + n_blk + 2 * bq2 * a.nk + a.bq * nkp / 2);
  u32 *vt = kt + n_kt, *kp = vt + n_kt, *blk = kp + n_k, *pt = blk + n_blk, *dst = pt + bq2 * a.nk;
  BFloat16* ds16 = reinterpret_cast<BFloat16*>(dst + bq2 * a.nk);
  // floats: s and dp of one block, then the dk and dv sums [nk, D]
  float* s = sc.floats(2 * a.bq * a.nk + 2 * a.nk * a.d);
  float *dp = s + a.bq * a.nk, *dk_acc = dp + a.bq * a.nk, *dv_acc = dk_acc + a.nk * a.d;
  std::fill(dk_acc, dk_acc + 2 * a.nk * a.d, 0.0f);
  if (!kept) pack_cols(k, a.k.ns, a.d, a.nk, wk, kt);
  pack_cols(v, a.v.ns, a.d, a.nk, wk, vt);
  pack_rows(k, a.k.ns, a.nk, a.d, wd, kp);
  for (int64_t i0 = 0; i0 < a.nq; i0 += a.bq) {
    const int64_t rows = std::min(a.bq, a.nq - i0), nk = block_keys(a, i0 + rows);
    const Pairs qb{q + i0 * a.q.ns, a.q.ns, 2}, dob{dout + i0 * a.dout.ns, a.dout.ns, 2};
    if (!kept) gemm<float>(rows, nk, d2, qb, kt, d2, wk, s, nk);  // s = q k^T
    gemm<float>(rows, nk, d2, dob, vt, d2, wk, dp, nk);            // dp = dout v^T
    for (int64_t i = 0; i < rows; i += 2)
      softmax_bwd_pair(a, m, i0 + i, std::min<int64_t>(2, rows - i), nk, lse + i0 + i,
                       kept ? kept + (i0 + i) * a.nk : nullptr, a.nk, s + i * nk, dp + i * nk, nk, ds16 + i * nkp, nkp,
                       pt + (i / 2) * a.nk, dst + (i / 2) * a.nk);
    // pair-interleaved p^T / ds^T: key j's word for row pair ii at (ii * nk + j): rs 2, cs 2 nk
    pack_rows(dout + i0 * a.dout.ns, a.dout.ns, rows, a.d, wd, blk);
    gemm<float>(nk, a.d, pairs(rows), Pairs{reinterpret_cast<const u16*>(pt), 2, 2 * a.nk}, blk, pairs(rows), wd, dv_acc,
                a.d, true);  // dv += p^T dout
    pack_rows(q + i0 * a.q.ns, a.q.ns, rows, a.d, wd, blk);
    gemm<float>(nk, a.d, pairs(rows), Pairs{reinterpret_cast<const u16*>(dst), 2, 2 * a.nk}, blk, pairs(rows), wd, dk_acc,
                a.d, true);  // dk += ds^T q
    gemm<BFloat16>(rows, a.d, pairs(nk), Pairs{reinterpret_cast<const u16*>(ds16), nkp, 2}, kp, k2, wd,
                   dq + i0 * a.dq.ns, a.dq.ns);  // dq = ds k
  }
  for (int64_t j = 0; j < a.nk; ++j)
    for (int64_t c = 0; c < a.d; c += 16) {
      store(dk + j * a.dk.ns + c, tail(a.d - c), _mm512_maskz_loadu_ps(tail(a.d - c), dk_acc + j * a.d + c));
      store(dv + j * a.dv.ns + c, tail(a.d - c), _mm512_maskz_loadu_ps(tail(a.d - c), dv_acc + j * a.d + c));
    }
}
}  // namespace

void attn_small16_forward_cpu(const AttnSmallParams& a) {
  if (a.b * a.h == 0 || a.nq == 0 || a.nk == 0) return;
  if (a.amx && attn_amx_supported()) return attn_small16_amx_forward_cpu(a);
  small_attn::for_query_parts<Scratch>(a, [&](int64_t bi, int64_t hi, int64_t first, int64_t last, Scratch& sc) {
    forward_head(a, bi, hi, first, last, sc);
  });
}

void attn_small16_backward_cpu(const AttnSmallParams& a) {
  if (a.b * a.h == 0 || a.nq == 0 || a.nk == 0) return;
  if (a.amx && attn_amx_supported()) return attn_small16_amx_backward_cpu(a);
  // dk and dv sum over all query blocks of a head: one thread per head
  small_attn::for_heads<Scratch>(a, 1, [&](int64_t bi, int64_t hi, int64_t, Scratch& sc) {
    backward_head(a, bi, hi, sc);
  });
}
#else
void attn_small16_forward_cpu(const AttnSmallParams&) {}
void attn_small16_backward_cpu(const AttnSmallParams&) {}
#endif

}  // namespace genfast
