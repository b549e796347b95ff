// Gated residual out = x + gate * y on the CPU, forward and backward (math and layout in
// modulate.h), and its fp32 variant with the bias of the Linear that made y folded in. Rows of C
// elements, 16 fp32 lanes at a time (vec16.h); per-sample gate and bias gradients go through fixed
// row chunks and an ordered sum (modulate_common.h), so results never depend on thread count.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/modulate_common.h"
#include "cpu/vec16.h"
#include "modulate.h"

namespace genfast {
namespace {

// ------------------------------------------------------------------------------ gated residual
// G = float: a 16-bit per-sample gate converted to fp32 once per sample by the caller (SampleRowF32):
// one conversion fewer per element, the same values.
template <typename T, typename G>
GENFAST_VEC_CLONES void gated_row(T* out, const T* x, const G* __restrict gate, const T* __restrict y, int64_t C) {
  // out may be x (in place): each element is read before it is written.
  using namespace vec;
  const int64_t C16 = C & ~int64_t{15};
  for (int64_t c = 0; c < C16; c += 16) store(out + c, load(x + c) + load(gate + c) * load(y + c));
  for (int64_t c = C16; c < C; ++c) store1(out + c, load1(x + c) + load1(gate + c) * load1(y + c));
}

// fp32 with the bias of the Linear that made y folded in: the same expression on y + bias.
GENFAST_VEC_CLONES void gated_bias_row(float* out, const float* x, const float* __restrict gate, float* y,
                                       const float* __restrict bias, int64_t C, bool keep_y) {
  using namespace vec;
  const int64_t C16 = C & ~int64_t{15};
  for (int64_t c = 0; c < C16; c += 16) {
    const f32x16 v = load(y + c) + load(bias + c);
    if (keep_y) store(y + c, v);
    store(out + c, load(x + c) + load(gate + c) * v);
  }
  for (int64_t c = C16; c < C; ++c) {
    const float v = y[c] + bias[c];
    if (keep_y) y[c] = v;
    out[c] = x[c] + gate[c] * v;
  }
}

template <typename T>
void gated_fwd(const GatedResidualParams& p) {
  const int64_t rows = p.B * p.N;
#pragma omp parallel if (rows * p.C >= kParallelMin)
  {
    SampleRowF32<T> gf(convert_per_sample<T>(p.N, p.gate_sn == 0), p.C);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / p.N, n = r % p.N;
      T* out = static_cast<T*>(p.out) + b * p.out_sb + n * p.out_sn;
      const T* x = static_cast<const T*>(p.x) + b * p.x_sb + n * p.x_sn;
      const T* gate = static_cast<const T*>(p.gate) + b * p.gate_sb + n * p.gate_sn;
      const T* y = static_cast<const T*>(p.y) + b * p.y_sb + n * p.y_sn;
      if (const float* g32 = gf.of(gate, b)) gated_row<T, float>(out, x, g32, y, p.C);
      else gated_row<T, T>(out, x, gate, y, p.C);
    }
  }
}

template <typename T, typename G>
GENFAST_VEC_CLONES void gated_bwd_row(T* __restrict dy, const T* __restrict g, const G* __restrict gate,
                                      const T* __restrict y, int64_t C, float* __restrict acc, T* __restrict dgate,
                                      float* __restrict bias_acc) {
  // bias_acc sums dy as stored (read back: the rounded values, as a sum over the dy tensor would)
  using namespace vec;
  const int64_t C16 = C & ~int64_t{15};
  for (int64_t c = 0; c < C16; c += 16) {
    const f32x16 gc = load(g + c);
    if (dy) store(dy + c, gc * load(gate + c));
    if (bias_acc) store(bias_acc + c, load(bias_acc + c) + load(dy + c));
    if (acc) store(acc + c, load(acc + c) + gc * load(y + c));
    if (dgate) store(dgate + c, gc * load(y + c));
  }
  for (int64_t c = C16; c < C; ++c) {
    const float gc = load1(g + c);
    if (dy) store1(dy + c, gc * load1(gate + c));
    if (bias_acc) bias_acc[c] += load1(dy + c);
    if (acc) acc[c] += gc * load1(y + c);
    if (dgate) store1(dgate + c, gc * load1(y + c));
  }
}

template <typename T>
void gated_bwd(const GatedResidualBwdParams& p) {
  const int64_t C = p.C;
  const bool gate32 = convert_per_sample<T>(p.N, p.gate_sn == 0) && p.dy;
  // g32: sample b's gate in fp32 (SampleRowF32), or nullptr
  auto row = [&](int64_t b, int64_t n, float* acc, T* dgate, float* bias_acc, const float* g32) {
    const int64_t r = b * p.N + n;
    T* dy = p.dy ? static_cast<T*>(p.dy) + r * C : nullptr;
    const T* g = static_cast<const T*>(p.grad) + b * p.g_sb + n * p.g_sn;
    const T* gate = static_cast<const T*>(p.gate) + b * p.gate_sb + n * p.gate_sn;
    const T* y = static_cast<const T*>(p.y) + b * p.y_sb + n * p.y_sn;
    if (g32) gated_bwd_row<T, float>(dy, g, g32, y, C, acc, dgate, bias_acc);
    else gated_bwd_row<T, T>(dy, g, gate, y, C, acc, dgate, bias_acc);
  };
  auto gate_b = [&](int64_t b) { return static_cast<const T*>(p.gate) + b * p.gate_sb; };
  if (!p.per_sample || !(p.dgate || p.dbias)) {
    const int64_t rows = p.B * p.N;
#pragma omp parallel if (rows * C >= kParallelMin)
    {
      SampleRowF32<T> gf(gate32, C);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = r / p.N;
        row(b, r % p.N, nullptr, p.dgate ? static_cast<T*>(p.dgate) + r * C : nullptr, nullptr, gf.of(gate_b(b), b));
      }
    }
    return;
  }
  const int64_t nchunks = (p.N + p.chunk_rows - 1) / p.chunk_rows;
  // the chunk (b, k): dgate's partial sums into acc, dy's into bias_partial[b, k] (when asked for)
  auto chunk = [&](int64_t b, int64_t k, float* acc, SampleRowF32<T>& gf) {
    float* bias_acc = p.dbias ? p.bias_partial + (b * nchunks + k) * C : nullptr;
    if (acc) std::fill(acc, acc + C, 0.f);
    if (bias_acc) std::fill(bias_acc, bias_acc + C, 0.f);
    const float* g32 = gf.of(gate_b(b), b);
    for (int64_t n = k * p.chunk_rows; n < std::min(p.N, (k + 1) * p.chunk_rows); ++n)
      row(b, n, acc, nullptr, bias_acc, g32);
  };
  if (!p.partial || !p.dgate) {  // one thread per sample, one parallel region (as modulate_bwd above)
#pragma omp parallel if (p.B * p.N * C >= kParallelMin)
    {
      std::vector<float> work(p.dgate ? 2 * C : 0);
      float *acc = p.dgate ? work.data() : nullptr, *tot = acc ? acc + C : nullptr;
      SampleRowF32<T> gf(gate32, C);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < p.B; ++b) {
        if (tot) std::fill(tot, tot + C, 0.f);
        for (int64_t k = 0; k < nchunks; ++k) {
          chunk(b, k, acc, gf);
          if (tot) for (int64_t c = 0; c < C; ++c) tot[c] += acc[c];
        }
        if (tot) for (int64_t c = 0; c < C; ++c) vec::store1(static_cast<T*>(p.dgate) + b * C + c, tot[c]);
      }
    }
  } else {
#pragma omp parallel if (p.B * p.N * C >= kParallelMin)
    {
      SampleRowF32<T> gf(gate32, C);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < p.B * nchunks; ++i) chunk(i / nchunks, i % nchunks, p.partial + i * C, gf);
    }
    reduce_partials<T>(static_cast<T*>(p.dgate), nullptr, p.partial, p.B, nchunks, C, C);
  }
  // dbias: each sample's chunks in order (fp32), then the samples in order, as the GPU kernels add them
  if (!p.dbias) return;
  float* per_sample = p.bias_partial + p.B * nchunks * C;
  reduce_partials<float>(per_sample, nullptr, p.bias_partial, p.B, nchunks, C, C);
  reduce_partials<T>(static_cast<T*>(p.dbias), nullptr, per_sample, 1, p.B, C, C);
}

template <typename T> struct GFwdFn { static void run(const GatedResidualParams& p) { gated_fwd<T>(p); } };
template <typename T> struct GBwdFn { static void run(const GatedResidualBwdParams& p) { gated_bwd<T>(p); } };

}  // namespace

void gated_residual_fwd_cpu(const GatedResidualParams& p) {
  if (p.B * p.N == 0 || p.C == 0) return;
  by_dtype<GFwdFn>(p);
}

void gated_residual_bias_fp32_cpu(float* out, const float* x, const float* gate, int64_t gate_sb, float* y,
                                  const float* bias, int64_t B, int64_t N, int64_t C, bool keep_y) {
#pragma omp parallel for schedule(static) if (B * N * C >= kParallelMin)
  for (int64_t r = 0; r < B * N; ++r)
    gated_bias_row(out + r * C, x + r * C, gate + (r / N) * gate_sb, y + r * C, bias, C, keep_y);
}

void gated_residual_bwd_cpu(const GatedResidualBwdParams& p) {
  if (p.B * p.N == 0 || p.C == 0) return;
  by_dtype<GBwdFn>(p);
}

}  // namespace genfast
