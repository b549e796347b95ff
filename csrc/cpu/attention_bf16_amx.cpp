// The bf16 "small" CPU attention way on AMX tiles (Intel Xeon from Sapphire Rapids on: amx-bf16),
// picked by attn_small16_*_cpu where the CPU has them (attention_bf16_small.cpp runs the same
// algorithm on AVX-512 BF16 dot products elsewhere). Why: on such a CPU one core's tdpbf16ps ran
// ~3.2 TFLOP/s against ~83 GFLOP/s for vdpbf16ps (measured, 2-core Xeon, micro-benchmark). Every
// tile operand starts on a 64-byte boundary with a row stride of a multiple of 64 bytes (the
// Scratch areas are aligned): a tile load whose rows straddle cache lines took 14.8 ns against
// 2.2 (1 KiB), and with one load per tdpbf16ps it bounded these GEMMs at ~0.6-0.9 TFLOP/s a core;
// aligned they run 1.3-1.9 (K = 96 and 256, 2 x 2 blocks), and the softmax rows (shared,
// attention_bf16_rows.h) take about half of a forward.
//
// Tiles (one fixed configuration): 0-3 the fp32 C blocks [16 x 16] of a 32 x 32 block of C,
// 4-5 A [16 rows x 32 bf16], 6-7 B [16 pair rows x 16 words]. Every operand a tile reads is
// padded so that no load leaves its buffer and the inner dimension is a multiple of 32 with
// zeros in both A and B past the real one (0 x garbage could be NaN); rows of A and columns of B
// past the real ones only reach C entries that are never read (fp32 C buffers take whole tiles;
// the dk / dv sums, which persist over blocks, get zero p / ds columns there).
// Nk16 below: key_stride(Nk), a multiple of 16 off multiples of 256.
//   s = q k^T:      A = the q block copied into [rows, D32], B = k^T packed [D32 / 2][Nk16].
//   out = e v:      A = e (bf16) [rows, Nk32],               B = v packed [Nk32 / 2][D16].
//   dv^T += dout^T p, dk^T += q^T ds: A = dout^T / q^T of the block [D, rows32], B = p / ds as the
//                   softmax backward rows write them already (pair rows of queries x keys), so dv
//                   and dk are summed transposed in fp32 [D16, Nk16] and written out once per head.
//   dq = ds k:      A = ds (bf16) [rows, Nk32],              B = k packed [Nk32 / 2][D16].
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cpu/attention_bf16_rows.h"

namespace genfast {

#if defined(GENFAST_HAVE_AVX512) && defined(__linux__) && __GNUC__ >= 11  // GCC 11: AMX intrinsics
#define GENFAST_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,fma")))

bool attn_amx_supported() {
  static const bool ok = [] {
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
    // Linux hands out the tile state only on request (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA),
    // once per process; a kernel without it (< 5.16) refuses and the caller keeps vdpbf16ps.
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

namespace {
using namespace vec512;
using namespace bf16_rows;
using small_attn::block_keys;

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

GENFAST_AMX void tiles_on() {
  TileConfig c{};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  // GCC 12 may sink the stores past ldtilecfg once tiles_on is inlined (seen: colsb left 0, #GP)
  __asm__ volatile("" ::: "memory");
  _tile_loadconfig(&c);
}

// Where a GEMM's C goes: fp32 stored or added, or bf16 (each row scaled by row_scale[r] if given).
struct Out {
  enum Kind { kStore, kAdd, kBf16 } kind;
  void* p;
  int64_t ld;
  const float* row_scale;
};

GENFAST_AMX inline void put(const Out& o, int64_t r, int64_t j, __m512 x, __mmask16 t) {
  if (o.row_scale) x = _mm512_mul_ps(x, _mm512_set1_ps(o.row_scale[r]));
  store(static_cast<BFloat16*>(o.p) + r * o.ld + j, t, x);
}

// One MT x NT block of 16 x 16 tiles of C (+)= A B over k (a multiple of 32), C at c (row stride
// ldc floats): loaded first with add, else started at 0.
template <int MT, int NT>
GENFAST_AMX void tile_block(int64_t k, const u16* a, int64_t lda, const u32* b, int64_t ldb, float* c, int64_t ldc,
                            bool add) {
  const int64_t cs = ldc * 4;
  if (add) {
    _tile_loadd(0, c, cs);
    if constexpr (NT > 1) _tile_loadd(1, c + 16, cs);
    if constexpr (MT > 1) _tile_loadd(2, c + 16 * ldc, cs);
    if constexpr (MT > 1 && NT > 1) _tile_loadd(3, c + 16 * ldc + 16, cs);
  } else {
    _tile_zero(0);
    if constexpr (NT > 1) _tile_zero(1);
    if constexpr (MT > 1) _tile_zero(2);
    if constexpr (MT > 1 && NT > 1) _tile_zero(3);
  }
  for (int64_t k0 = 0; k0 < k; k0 += 32) {  // each load just before its first use: measured ~5 %
    _tile_loadd(4, a + k0, lda * 2);
    _tile_loadd(6, b + (k0 / 2) * ldb, ldb * 4);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT > 1) {
      _tile_loadd(7, b + (k0 / 2) * ldb + 16, ldb * 4);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (MT > 1) {
      _tile_loadd(5, a + 16 * lda + k0, lda * 2);
      _tile_dpbf16ps(2, 5, 6);
    }
    if constexpr (MT > 1 && NT > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, cs);
  if constexpr (NT > 1) _tile_stored(1, c + 16, cs);
  if constexpr (MT > 1) _tile_stored(2, c + 16 * ldc, cs);
  if constexpr (MT > 1 && NT > 1) _tile_stored(3, c + 16 * ldc + 16, cs);
}

GENFAST_AMX void tile_block_any(int64_t mr, int64_t nr, int64_t k, const u16* a, int64_t lda, const u32* b,
                                int64_t ldb, float* c, int64_t ldc, bool add) {
  if (mr > 16)
    nr > 16 ? tile_block<2, 2>(k, a, lda, b, ldb, c, ldc, add) : tile_block<2, 1>(k, a, lda, b, ldb, c, ldc, add);
  else
    nr > 16 ? tile_block<1, 2>(k, a, lda, b, ldb, c, ldc, add) : tile_block<1, 1>(k, a, lda, b, ldb, c, ldc, add);
}

// C [m, n] = A [m, k] B into o: A bf16 rows of stride lda (readable up to row padded(m, 16)), B
// pair words of row stride ldb >= padded(n, 16), k a multiple of 32 (see the file comment). fp32
// C (kStore, kAdd) is written by the tiles in place: it must take padded(m, 16) rows of stride
// >= padded(n, 16); bf16 C goes through a block in fp32 and only its m x n entries are written.
GENFAST_AMX void gemm(int64_t m, int64_t n, int64_t k, const u16* a, int64_t lda, const u32* b, int64_t ldb,
                      const Out& o) {
  alignas(64) float c[32 * 32];
  // Rows of A per chunk: ~24 KiB, so that a chunk stays in L1 while the B panels of 32 columns
  // pass by (each reused by the chunk's 32-row blocks): tile loads from L2 starved the tiles.
  const int64_t chunk = std::max<int64_t>(32, (24 << 10) / (2 * k) / 32 * 32);
  for (int64_t c0 = 0; c0 < m; c0 += chunk)
    for (int64_t n0 = 0; n0 < n; n0 += 32) {
      const int64_t nr = std::min<int64_t>(32, n - n0);
      for (int64_t m0 = c0; m0 < std::min(m, c0 + chunk); m0 += 32) {
        const int64_t mr = std::min<int64_t>(32, m - m0);
        const u16* am = a + m0 * lda;
        if (o.kind != Out::kBf16) {
          tile_block_any(mr, nr, k, am, lda, b + n0, ldb, static_cast<float*>(o.p) + m0 * o.ld + n0, o.ld,
                         o.kind == Out::kAdd);
          continue;
        }
        tile_block_any(mr, nr, k, am, lda, b + n0, ldb, c, 32, false);
        for (int64_t r = 0; r < mr; ++r)
          for (int64_t j = 0; j < nr; j += 16) put(o, m0 + r, n0 + j, _mm512_load_ps(c + r * 32 + j), tail(nr - j));
      }
    }
}

// Row stride (words or floats) of the [.., keys] operands: padded to 16, and off multiples of
// 1 KiB, whose rows all fall in the same few L1 sets (measured ~8 % on the s GEMM).
inline int64_t key_stride(int64_t nk) {
  const int64_t n16 = padded(nk, 16);
  return n16 % 256 ? n16 : n16 + 16;
}

// rows x cols of x (row stride rs) into dst [rows][ld] bf16, zeros in columns cols .. ld - 1.
inline void copy_rows(const u16* x, int64_t rs, int64_t rows, int64_t cols, u16* dst, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(dst + i * ld, x + i * rs, cols * 2);
    std::memset(dst + i * ld + cols, 0, (ld - cols) * 2);
  }
}

// x^T for x [rows, cols] (row stride rs) into dst [cols][ld] (ld >= padded(rows, 16)), zeros in
// columns rows .. ld - 1: 16 x 16 blocks widened to 32-bit lanes, transposed in registers and
// narrowed (element by element it took ~8 % of a backward).
GENFAST_AVX512 void copy_transposed(const u16* x, int64_t rs, int64_t rows, int64_t cols, u16* dst, int64_t ld) {
  transpose_blocks(
      rows, cols,
      [&](int64_t r, int64_t c0, __mmask16 t) GENFAST_AVX512 {
        return _mm512_castsi512_ps(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(t, x + r * rs + c0)));
      },
      [&](int64_t c, int64_t r0, __m512 v) GENFAST_AVX512 {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c * ld + r0), _mm512_cvtepi32_epi16(_mm512_castps_si512(v)));
      });
  for (int64_t c = 0; c < cols; ++c) std::memset(dst + c * ld + padded(rows, 16), 0, (ld - padded(rows, 16)) * 2);
}

// dst[c * ldd + r] = bf16(src[r * lds + c]) for r < rows, c < cols (the dk / dv sums, kept
// transposed in fp32, into the gradients): 16 x 16 register transposes, 16 words a store.
GENFAST_AVX512 void store_transposed_bf16(const float* src, int64_t lds, int64_t rows, int64_t cols, BFloat16* dst,
                                          int64_t ldd) {
  transpose_blocks(
      rows, cols,
      [&](int64_t r, int64_t c0, __mmask16 t) GENFAST_AVX512 { return _mm512_maskz_loadu_ps(t, src + r * lds + c0); },
      [&](int64_t c, int64_t r0, __m512 v) GENFAST_AVX512 { store(dst + c * ldd + r0, tail(rows - r0), v); });
}

GENFAST_AMX void forward_head(const AttnSmallParams& a, int64_t bi, int64_t hi, int64_t first, int64_t last,
                              Scratch& sc) {
  const uint8_t* m = a.mask ? a.mask + bi * a.mask_bs : nullptr;
  const u16 *q = at(a.q, bi, hi), *k = at(a.k, bi, hi), *v = at(a.v, bi, hi);
  BFloat16* out = at(a.out, bi, hi);
  const int64_t g = bi * a.h + hi, d32 = padded(a.d, 32), d16 = padded(a.d, 16);
  const int64_t ldn = key_stride(a.nk), nk32 = padded(a.nk, 32), bq16 = padded(a.bq, 16);
  float* lse = a.lse + g * a.nq;
  BFloat16* keep = a.p_keep ? static_cast<BFloat16*>(a.p_keep) + g * a.nq * a.nk : nullptr;
  // words: k^T, v, then the q block and e (bf16)
  const int64_t n_kt = d32 / 2 * ldn, n_v = nk32 / 2 * d16;
  u32* kt = sc.words(n_kt + n_v + bq16 * (d32 + nk32) / 2);
  u32* vp = kt + n_kt;
  u16* qb = reinterpret_cast<u16*>(vp + n_v);
  u16* e16 = qb + bq16 * d32;
  float* s = sc.floats(bq16 * ldn + a.bq);  // scores of one block (row stride ldn), 1 / sum e of its rows
  float* inv = s + bq16 * ldn;
  pack_cols(k, a.k.ns, a.d, a.nk, ldn, kt);
  std::fill(kt + a.d / 2 * ldn, kt + n_kt, 0u);
  pack_rows(v, a.v.ns, a.nk, a.d, d16, vp);
  std::fill(vp + pairs(a.nk) * d16, vp + n_v, 0u);
  tiles_on();
  for (int64_t i0 = first * a.bq; i0 < std::min(a.nq, last * a.bq); i0 += a.bq) {
    const int64_t rows = std::min(a.bq, a.nq - i0), nk = block_keys(a, i0 + rows), lde = padded(nk, 32);
    copy_rows(q + i0 * a.q.ns, a.q.ns, rows, a.d, qb, d32);
    gemm(rows, nk, d32, qb, d32, kt, ldn, Out{Out::kStore, s, ldn, nullptr});  // s = q k^T
    for (int64_t i = 0; i < rows; ++i) {
      BFloat16* kr = keep ? keep + (i0 + i) * a.nk : nullptr;
      BFloat16* er = reinterpret_cast<BFloat16*>(e16 + i * lde);
      lse[i0 + i] = softmax_row(a, m, i0 + i, nk, s + i * ldn, er, kr, inv + i);
      std::memset(er + even(nk), 0, (lde - even(nk)) * 2);
      if (kr)
        for (int64_t j = nk; j < a.nk; ++j) kr[j] = BFloat16{0};  // causal: keys past the block
    }
    lse_rows(lse + i0, inv, rows);  // the rows' base-2 maxima into lse
    gemm(rows, a.d, lde, e16, lde, vp, d16, Out{Out::kBf16, out + i0 * a.out.ns, a.out.ns, inv});  // (e v) / sum e
  }
  _tile_release();
}

GENFAST_AMX void backward_head(const AttnSmallParams& a, int64_t bi, int64_t hi, Scratch& sc) {
  const uint8_t* m = a.mask ? a.mask + bi * a.mask_bs : nullptr;
  const u16 *q = at(a.q, bi, hi), *k = at(a.k, bi, hi), *v = at(a.v, bi, hi), *dout = at(a.dout, bi, hi);
  BFloat16 *dq = at(a.dq, bi, hi), *dk = at(a.dk, bi, hi), *dv = at(a.dv, bi, hi);
  const int64_t g = bi * a.h + hi, d32 = padded(a.d, 32), d16 = padded(a.d, 16);
  const int64_t ldn = key_stride(a.nk), nk32 = padded(a.nk, 32), bq32 = padded(a.bq, 32);
  const float* lse = a.lse + g * a.nq;
  const BFloat16* kept = a.p_keep ? static_cast<const BFloat16*>(a.p_keep) + g * a.nq * a.nk : nullptr;
  // words: k^T, v^T, k, then p and ds pair rows; bf16: q, dout blocks, q^T, dout^T blocks, ds rows
  const int64_t n_kt = d32 / 2 * ldn, n_k = nk32 / 2 * d16, n_pt = bq32 / 2 * ldn;
  u32* kt = sc.words(2 * n_kt + n_k + 2 * n_pt + (2 * bq32 * d32 + 2 * d16 * bq32 + bq32 * nk32) / 2);
  u32 *vt = kt + n_kt, *kp = vt + n_kt, *pt = kp + n_k, *dst = pt + n_pt;
  u16 *qb = reinterpret_cast<u16*>(dst + n_pt), *dob = qb + bq32 * d32, *qt = dob + bq32 * d32;
  u16 *dot = qt + d16 * bq32, *ds16 = dot + d16 * bq32;
  // floats: s and dp of one block, then the dk^T and dv^T sums [D16, Nk16]
  float* s = sc.floats(2 * bq32 * ldn + 2 * d16 * ldn);  // s, dp: row stride ldn
  float *dp = s + bq32 * ldn, *dkt = dp + bq32 * ldn, *dvt = dkt + d16 * ldn;
  // the first block's dk^T / dv^T GEMMs store (every block adds to the same keys) where there is no
  // causal mask; with one, later blocks reach keys the first does not: zeros first
  if (a.causal) std::fill(dkt, dkt + 2 * d16 * ldn, 0.0f);
  if (!kept) {
    pack_cols(k, a.k.ns, a.d, a.nk, ldn, kt);
    std::fill(kt + a.d / 2 * ldn, kt + n_kt, 0u);
  }
  pack_cols(v, a.v.ns, a.d, a.nk, ldn, vt);
  std::fill(vt + a.d / 2 * ldn, vt + n_kt, 0u);
  pack_rows(k, a.k.ns, a.nk, a.d, d16, kp);
  std::fill(kp + pairs(a.nk) * d16, kp + n_k, 0u);
  tiles_on();
  for (int64_t i0 = 0; i0 < a.nq; i0 += a.bq) {
    const int64_t rows = std::min(a.bq, a.nq - i0), nk = block_keys(a, i0 + rows);
    const int64_t lds = padded(nk, 32), rows32 = padded(rows, 32);
    copy_rows(dout + i0 * a.dout.ns, a.dout.ns, rows, a.d, dob, d32);
    copy_transposed(dout + i0 * a.dout.ns, a.dout.ns, rows, a.d, dot, bq32);
    copy_transposed(q + i0 * a.q.ns, a.q.ns, rows, a.d, qt, bq32);
    if (!kept) {
      copy_rows(q + i0 * a.q.ns, a.q.ns, rows, a.d, qb, d32);
      gemm(rows, nk, d32, qb, d32, kt, ldn, Out{Out::kStore, s, ldn, nullptr});  // s = q k^T
    }
    gemm(rows, nk, d32, dob, d32, vt, ldn, Out{Out::kStore, dp, ldn, nullptr});  // dp = dout v^T
    for (int64_t i = 0; i < rows; i += 2)
      softmax_bwd_pair(a, m, i0 + i, std::min<int64_t>(2, rows - i), nk, lse + i0 + i,
                       kept ? kept + (i0 + i) * a.nk : nullptr, a.nk, s + i * ldn, dp + i * ldn, ldn,
                       reinterpret_cast<BFloat16*>(ds16 + i * lds), lds, pt + (i / 2) * ldn, dst + (i / 2) * ldn);
    // The dk / dv tiles add whole 16-key columns: p, ds = 0 for the keys past this block's (causal)
    // and, as the inner dimension's pad, for the row pairs past its rows.
    const int64_t nk16 = padded(nk, 16);
    for (int64_t ii = 0; ii < pairs(rows) && nk < nk16; ++ii) {
      std::fill(pt + ii * ldn + nk, pt + ii * ldn + nk16, 0u);
      std::fill(dst + ii * ldn + nk, dst + ii * ldn + nk16, 0u);
    }
    std::fill(pt + pairs(rows) * ldn, pt + rows32 / 2 * ldn, 0u);
    std::fill(dst + pairs(rows) * ldn, dst + rows32 / 2 * ldn, 0u);
    const Out::Kind sum = i0 == 0 && !a.causal ? Out::kStore : Out::kAdd;
    gemm(a.d, nk, rows32, dot, bq32, pt, ldn, Out{sum, dvt, ldn, nullptr});   // dv^T += dout^T p
    gemm(a.d, nk, rows32, qt, bq32, dst, ldn, Out{sum, dkt, ldn, nullptr});   // dk^T += q^T ds
    gemm(rows, a.d, lds, ds16, lds, kp, d16, Out{Out::kBf16, dq + i0 * a.dq.ns, a.dq.ns, nullptr});  // dq = ds k
  }
  _tile_release();
  store_transposed_bf16(dkt, ldn, a.d, a.nk, dk, a.dk.ns);
  store_transposed_bf16(dvt, ldn, a.d, a.nk, dv, a.dv.ns);
}
}  // namespace

void attn_small16_amx_forward_cpu(const AttnSmallParams& a) {
  small_attn::for_query_parts<Scratch>(a, [&](int64_t bi, int64_t hi, int64_t first, int64_t last, Scratch& sc) {
    forward_head(a, bi, hi, first, last, sc);
  });
}

void attn_small16_amx_backward_cpu(const AttnSmallParams& a) {
  small_attn::for_heads<Scratch>(a, 1, [&](int64_t bi, int64_t hi, int64_t, Scratch& sc) {
    backward_head(a, bi, hi, sc);
  });
}
#else
bool attn_amx_supported() { return false; }
void attn_small16_amx_forward_cpu(const AttnSmallParams&) {}
void attn_small16_amx_backward_cpu(const AttnSmallParams&) {}
#endif

}  // namespace genfast
