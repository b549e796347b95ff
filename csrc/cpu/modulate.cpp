// adaLN modulate on the CPU, forward and backward (math and layout in modulate.h; the gated
// residual is in gated_residual.cpp). One row of C elements is one work item: it stays in L1/L2 between the passes
// (statistics, then the modulated output), so x is read from memory once. Rows are processed 16
// fp32 lanes at a time (vec16.h), sums in a fixed lane order; per-sample gradients
// go through fixed-size row chunks and an ordered sum, so results never depend on thread count.
// 16-bit rows with per-sample scale / shift / gate: each thread converts its sample's modulation to
// fp32 once, not once a row (the conversions cost about as much as x's own).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/modulate_common.h"
#include "cpu/vec16.h"
#include "modulate.h"

namespace genfast {
namespace {

// ------------------------------------------------------------------------------------ forward
// sum(x - m) (POW 1) or sum((x - m)^2) (POW 2) over a row: four independent 16-lane accumulators
// (one would wait on the add latency every step), combined in a fixed order. copy (or nullptr): also
// stores the row as fp32 there, in the same pass; ahead (or nullptr): a row prefetched a cache line
// per 32 elements meanwhile (see modulate_row).
template <typename T, int POW>
GENFAST_INLINE float row_sum_dev(const T* __restrict x, int64_t C, float m, float* __restrict copy = nullptr,
                                 const T* ahead = nullptr) {
  using namespace vec;
  auto term = [&](int64_t c) {
    const f32x16 v = load(x + c);
    if (copy) store(copy + c, v);
    return POW == 1 ? v - m : (v - m) * (v - m);
  };
  f32x16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t c = 0;
  for (; c + 64 <= C; c += 64) {
    if (ahead) {
      __builtin_prefetch(ahead + c);
      __builtin_prefetch(ahead + c + 32);
    }
    a0 += term(c);
    a1 += term(c + 16);
    a2 += term(c + 32);
    a3 += term(c + 48);
  }
  for (; c + 16 <= C; c += 16) a0 += term(c);
  float s = hsum((a0 + a1) + (a2 + a3));
  for (; c < C; ++c) {
    const float xc = load1(x + c);
    if (copy) copy[c] = xc;
    const float d = xc - m;
    s += POW == 1 ? d : d * d;
  }
  return s;
}

template <typename T>
GENFAST_VEC_CLONES void modulate_row_nocache(T* __restrict out, const T* __restrict x, const T* __restrict shift,
                                     const T* __restrict scale, int64_t C, float eps, int rms, float* mean_o,
                                     float* rstd_o) {
  using namespace vec;
  const int64_t C16 = C & ~int64_t{15};
  const float mean = rms ? 0.f : row_sum_dev<T, 1>(x, C, 0.f) / static_cast<float>(C);
  // mean((x - mean)^2), never E[x^2] - mean^2: fp16 inputs of magnitude 1e3 stay accurate.
  const float q = row_sum_dev<T, 2>(x, C, mean);
  const float rstd = 1.f / std::sqrt(q / static_cast<float>(C) + eps);
  for (int64_t c = 0; c < C16; c += 16) {
    f32x16 v = (load(x + c) - mean) * rstd * (1.f + load(scale + c));
    if (shift) v += load(shift + c);
    store(out + c, v);
  }
  for (int64_t c = C16; c < C; ++c) {
    float v = (load1(x + c) - mean) * rstd * (1.f + load1(scale + c));
    if (shift) v += load1(shift + c);
    store1(out + c, v);
  }
  if (mean_o) {  // (null: an inference call, nothing saves them)
    *mean_o = mean;
    *rstd_o = rstd;
  }
}

// The same for 16-bit rows of up to kRowBuf channels: converted to fp32 once, into `buf` (an
// L1-resident row), which the later passes read instead of converting again (~12% for bf16).
// `ahead` (or nullptr): a row two rows on, prefetched a cache line per 32 elements while this one
// converts. The hardware prefetcher stops at page boundaries, which a 2304-byte row keeps crossing:
// measured -10 % on the bf16 [8, 256, 1152] forward with x out of cache (AVX2 AMD EPYC), 0 in cache.
// S = float: scale / shift already fp32, scale as 1 + scale (per-sample modulation, converted once
// per sample by the caller: the same values, so the same bits).
template <typename T, typename S>
GENFAST_VEC_CLONES void modulate_row(T* __restrict out, const T* __restrict x, const S* __restrict shift,
                                     const S* __restrict scale, int64_t C, float eps, int rms, float* mean_o,
                                     float* rstd_o, float* __restrict buf, const T* ahead) {
  using namespace vec;
  constexpr bool one_plus = std::is_same_v<S, float> && sizeof(T) == 2;  // scale holds 1 + scale
  const int64_t C16 = C & ~int64_t{15};
  const float* xf;
  float sum;
  if constexpr (sizeof(T) == 2) {
    sum = row_sum_dev<T, 1>(x, C, 0.f, buf, ahead);  // converted into buf and summed in one pass
    xf = buf;
  } else {
    sum = rms ? 0.f : row_sum_dev<T, 1>(x, C, 0.f);
    xf = x;
  }
  const float mean = rms ? 0.f : sum / static_cast<float>(C);
  // mean((x - mean)^2), never E[x^2] - mean^2: fp16 inputs of magnitude 1e3 stay accurate.
  const float q = row_sum_dev<float, 2>(xf, C, mean);
  const float rstd = 1.f / std::sqrt(q / static_cast<float>(C) + eps);
  for (int64_t c = 0; c < C16; c += 16) {
    f32x16 v = (load(xf + c) - mean) * rstd * (one_plus ? load(scale + c) : 1.f + load(scale + c));
    if (shift) v += load(shift + c);
    store(out + c, v);
  }
  for (int64_t c = C16; c < C; ++c) {
    float v = (xf[c] - mean) * rstd * (one_plus ? load1(scale + c) : 1.f + load1(scale + c));
    if (shift) v += load1(shift + c);
    store1(out + c, v);
  }
  if (mean_o) {  // (null: an inference call, nothing saves them)
    *mean_o = mean;
    *rstd_o = rstd;
  }
}

constexpr int64_t kRowBuf = 8192;  // fp32 row cache per thread (32 KiB); wider 16-bit rows convert per pass


template <typename T>
void modulate_fwd(const ModulateParams& p) {
  const int64_t rows = p.B * p.N;
  const bool cache = sizeof(T) == 2 && p.C <= kRowBuf;
  const bool convert = cache && convert_per_sample<T>(p.N, p.scale_sn == 0 && (!p.shift || p.shift_sn == 0));
#pragma omp parallel if (rows * p.C >= kParallelMin)
  {
    alignas(64) float buf[sizeof(T) == 2 ? kRowBuf : 1];
    SampleRowF32<T> scale1p(convert, p.C, true), shift_f(convert && p.shift, p.C);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / p.N, n = r % p.N;
      const T* shift = p.shift ? static_cast<const T*>(p.shift) + b * p.shift_sb + n * p.shift_sn : nullptr;
      T* out = static_cast<T*>(p.out) + b * p.out_sb + n * p.out_sn;
      const T* x = static_cast<const T*>(p.x) + b * p.x_sb + n * p.x_sn;
      const T* scale = static_cast<const T*>(p.scale) + b * p.scale_sb + n * p.scale_sn;
      float* mean_r = p.mean ? p.mean + r : nullptr;
      float* rstd_r = p.rstd ? p.rstd + r : nullptr;
      const int64_t r2 = std::min(r + 2, rows - 1);  // (rows cached in buf only: the others never read it)
      const T* ahead = cache ? static_cast<const T*>(p.x) + (r2 / p.N) * p.x_sb + (r2 % p.N) * p.x_sn : nullptr;
      if (const float* sc1 = scale1p.of(scale, b)) {
        modulate_row<T, float>(out, x, shift_f.of(shift, b), sc1, p.C, p.eps, p.rms, mean_r, rstd_r, buf,
                               ahead);
      } else if (cache) {
        modulate_row<T, T>(out, x, shift, scale, p.C, p.eps, p.rms, mean_r, rstd_r, buf, ahead);
      } else {
        modulate_row_nocache<T>(out, x, shift, scale, p.C, p.eps, p.rms, mean_r, rstd_r);
      }
    }
  }
}

// ----------------------------------------------------------------------------------- backward
// One row: dx (when wanted) and the row's dscale/dshift contributions, either accumulated into
// fp32 sums (per sample: acc_scale/acc_shift) or written out (per token: ds_row/dsh_row).
//   xhat = (x - mean) * rstd, dxhat = g * (1 + scale)
//   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))     (rms: no mean(dxhat) term)
// S = float: scale holds 1 + scale in fp32 (16-bit per-sample rows: converted once per sample by the
// caller, as in the forward; the same values, so the same bits).
template <typename T, typename S>
GENFAST_VEC_CLONES void modulate_bwd_row(T* __restrict dx, const T* __restrict g, const T* __restrict x,
                                         const S* __restrict scale, float mean, float rstd, int64_t C, int rms,
                                         float* __restrict acc_scale, float* __restrict acc_shift,
                                         T* __restrict ds_row, T* __restrict dsh_row, float* __restrict gbuf,
                                         float* __restrict xbuf, const T* __restrict add) {
  // gbuf/xbuf (16-bit rows of up to kRowBuf channels, else nullptr): g and x converted to fp32 in
  // the first pass, read back by the second.
  using namespace vec;
  constexpr bool one_plus = std::is_same_v<S, float> && sizeof(T) == 2;
  auto scale1p = [scale](int64_t c) { return one_plus ? load(scale + c) : 1.f + load(scale + c); };
  auto scale1p1 = [scale](int64_t c) { return one_plus ? load1(scale + c) : 1.f + load1(scale + c); };
  const int64_t C16 = C & ~int64_t{15};
  f32x16 va[2] = {}, vb[2] = {};  // sum(dxhat), sum(dxhat * xhat); two chains each for the add latency
  auto step = [&](int64_t c, int k) {
    const f32x16 gc = load(g + c), xc = load(x + c), xh = (xc - mean) * rstd;
    if (gbuf) {
      store(gbuf + c, gc);
      store(xbuf + c, xc);
    }
    const f32x16 dxh = gc * scale1p(c);
    va[k] += dxh;
    vb[k] += dxh * xh;
    if (acc_scale) store(acc_scale + c, load(acc_scale + c) + gc * xh);
    if (acc_shift) store(acc_shift + c, load(acc_shift + c) + gc);
    if (ds_row) store(ds_row + c, gc * xh);
    if (dsh_row) store(dsh_row + c, gc);
  };
  int64_t c16 = 0;
  for (; c16 + 32 <= C16; c16 += 32) {
    step(c16, 0);
    step(c16 + 16, 1);
  }
  if (c16 < C16) step(c16, 0);
  float a = hsum(va[0] + va[1]), bsum = hsum(vb[0] + vb[1]);
  for (int64_t c = C16; c < C; ++c) {
    const float gc = load1(g + c), xh = (load1(x + c) - mean) * rstd;
    const float dxh = gc * scale1p1(c);
    a += dxh;
    bsum += dxh * xh;
    if (acc_scale) acc_scale[c] += gc * xh;
    if (acc_shift) acc_shift[c] += gc;
    if (ds_row) store1(ds_row + c, gc * xh);
    if (dsh_row) store1(dsh_row + c, gc);
  }
  if (!dx) return;
  const float inv_c = 1.f / static_cast<float>(C);
  const float ma = rms ? 0.f : a * inv_c, mb = bsum * inv_c;
  if (gbuf) {
    for (int64_t c = 0; c < C16; c += 16) {
      const f32x16 xh = (load(xbuf + c) - mean) * rstd;
      const f32x16 dxh = load(gbuf + c) * scale1p(c);
      store(dx + c, rstd * (dxh - ma - xh * mb));
    }
  } else {
    for (int64_t c = 0; c < C16; c += 16) {
      const f32x16 xh = (load(x + c) - mean) * rstd;
      const f32x16 dxh = load(g + c) * scale1p(c);
      store(dx + c, rstd * (dxh - ma - xh * mb));
    }
  }
  for (int64_t c = C16; c < C; ++c) {
    const float xh = (load1(x + c) - mean) * rstd;
    const float dxh = load1(g + c) * scale1p1(c);
    store1(dx + c, rstd * (dxh - ma - xh * mb));
  }
  if (!add) return;
  // dx as stored plus the addend (the bits of a separate add), in a loop of its own over the row,
  // still in L1: in the loops above the compiler may contract rstd * (...) + add into an FMA
  for (int64_t c = 0; c < C16; c += 16) store(dx + c, load(dx + c) + load(add + c));
  for (int64_t c = C16; c < C; ++c) store1(dx + c, load1(dx + c) + load1(add + c));
}


template <typename T>
void modulate_bwd(const ModulateBwdParams& p) {
  const int64_t C = p.C;
  auto row_ptrs = [&](int64_t b, int64_t n, T*& dx, const T*& g, const T*& x, const T*& sc, const T*& add) {
    dx = p.dx ? static_cast<T*>(p.dx) + b * p.dx_sb + n * p.dx_sn : nullptr;
    add = p.addend ? static_cast<const T*>(p.addend) + b * p.dx_sb + n * p.dx_sn : nullptr;
    g = static_cast<const T*>(p.grad) + b * p.g_sb + n * p.g_sn;
    x = static_cast<const T*>(p.x) + b * p.x_sb + n * p.x_sn;
    sc = static_cast<const T*>(p.scale) + b * p.scale_sb + n * p.scale_sn;
  };
  const bool cache = sizeof(T) == 2 && C <= kRowBuf && p.dx;
  if (!p.per_sample) {
    const int64_t rows = p.B * p.N;
#pragma omp parallel if (rows * C >= kParallelMin)
    {
      alignas(64) float gbuf[sizeof(T) == 2 ? kRowBuf : 1], xbuf[sizeof(T) == 2 ? kRowBuf : 1];
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        T* dx;
        const T *g, *x, *sc, *add;
        row_ptrs(r / p.N, r % p.N, dx, g, x, sc, add);
        modulate_bwd_row<T, T>(dx, g, x, sc, p.mean[r], p.rstd[r], C, p.rms, nullptr, nullptr,
                            p.dscale ? static_cast<T*>(p.dscale) + r * C : nullptr,
                            p.dshift ? static_cast<T*>(p.dshift) + r * C : nullptr, cache ? gbuf : nullptr,
                            cache ? xbuf : nullptr, add);
      }
    }
    return;
  }
  const int64_t nchunks = (p.N + p.chunk_rows - 1) / p.chunk_rows;
  const int64_t items = p.B * nchunks;
  // The rows of chunk k of sample b: their dx, and their dscale / dshift sums added into acc_*.
  // scale1p: sample b's 1 + scale in fp32 (16-bit rows; see modulate_bwd_row), else nullptr.
  auto chunk = [&](int64_t b, int64_t k, float* acc_scale, float* acc_shift, float* gbuf, float* xbuf,
                   const float* scale1p) {
    for (int64_t n = k * p.chunk_rows; n < std::min(p.N, (k + 1) * p.chunk_rows); ++n) {
      T* dx;
      const T *g, *x, *sc, *add;
      row_ptrs(b, n, dx, g, x, sc, add);
      const int64_t r = b * p.N + n;
      float* as = p.dscale ? acc_scale : nullptr;
      float* ah = p.dshift ? acc_shift : nullptr;
      if (scale1p)
        modulate_bwd_row<T, float>(dx, g, x, scale1p, p.mean[r], p.rstd[r], C, p.rms, as, ah, nullptr, nullptr,
                                   cache ? gbuf : nullptr, cache ? xbuf : nullptr, add);
      else
        modulate_bwd_row<T, T>(dx, g, x, sc, p.mean[r], p.rstd[r], C, p.rms, as, ah, nullptr, nullptr,
                               cache ? gbuf : nullptr, cache ? xbuf : nullptr, add);
    }
  };
  const bool convert_scale = convert_per_sample<T>(p.N, true);  // (this is the per-sample path)
  auto scale_b = [&](int64_t b) { return static_cast<const T*>(p.scale) + b * p.scale_sb; };
  const bool sums = p.dscale || p.dshift;
  if (sums && !p.partial) {
    // No workspace given (the CPU path, enough samples per thread): one thread per sample adds its
    // chunks' sums in the same order as reduce_partials (same bits), in the same parallel region
    // as dx: no second region (each one waits on every core) and no [B, nchunks, 2, C] buffer.
#pragma omp parallel if (p.B * p.N * C >= kParallelMin)
    {
      alignas(64) float gbuf[sizeof(T) == 2 ? kRowBuf : 1], xbuf[sizeof(T) == 2 ? kRowBuf : 1];
      std::vector<float> work(4 * C);  // chunk sums (scale, shift), then the sample's totals
      float *acc_scale = work.data(), *acc_shift = acc_scale + C, *tot_scale = acc_shift + C,
            *tot_shift = tot_scale + C;
      SampleRowF32<T> scale1p_f(convert_scale, C, true);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < p.B; ++b) {
        std::fill(tot_scale, tot_scale + 2 * C, 0.f);
        const float* scale1p = scale1p_f.of(scale_b(b), b);
        for (int64_t k = 0; k < nchunks; ++k) {
          std::fill(acc_scale, acc_scale + 2 * C, 0.f);
          chunk(b, k, acc_scale, acc_shift, gbuf, xbuf, scale1p);
          for (int64_t c = 0; c < 2 * C; ++c) tot_scale[c] += acc_scale[c];
        }
        for (int64_t c = 0; c < C; ++c) {
          if (p.dscale) vec::store1(static_cast<T*>(p.dscale) + b * C + c, tot_scale[c]);
          if (p.dshift) vec::store1(static_cast<T*>(p.dshift) + b * C + c, tot_shift[c]);
        }
      }
    }
    return;
  }
#pragma omp parallel if (p.B * p.N * C >= kParallelMin)
  {
    alignas(64) float gbuf[sizeof(T) == 2 ? kRowBuf : 1], xbuf[sizeof(T) == 2 ? kRowBuf : 1];
    SampleRowF32<T> scale1p_f(convert_scale, C, true);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < items; ++i) {
      const int64_t b = i / nchunks, k = i % nchunks;
      float* acc_scale = sums ? p.partial + (i * 2) * C : nullptr;
      float* acc_shift = sums ? acc_scale + C : nullptr;
      if (sums) std::fill(acc_scale, acc_scale + 2 * C, 0.f);
      chunk(b, k, acc_scale, acc_shift, gbuf, xbuf, scale1p_f.of(scale_b(b), b));
    }
  }
  if (p.dscale || p.dshift)
    reduce_partials<T>(static_cast<T*>(p.dscale), static_cast<T*>(p.dshift), p.partial, p.B, nchunks, 2 * C, C);
}

template <typename T> struct FwdFn { static void run(const ModulateParams& p) { modulate_fwd<T>(p); } };
template <typename T> struct BwdFn { static void run(const ModulateBwdParams& p) { modulate_bwd<T>(p); } };

}  // namespace

void modulate_fwd_cpu(const ModulateParams& p) {
  if (p.B * p.N == 0 || p.C == 0) return;
  by_dtype<FwdFn>(p);
}

void modulate_bwd_cpu(const ModulateBwdParams& p) {
  if (p.B * p.N == 0 || p.C == 0) return;
  by_dtype<BwdFn>(p);
}

}  // namespace genfast
