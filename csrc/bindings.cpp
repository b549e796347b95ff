// The pybind11 modules, one source compiled three times (setup.py):
//   -DGENFAST_MODULE_CPU       genfast._C         the C++ CPU kernels
//   -DGENFAST_MODULE_CUDA      genfast._cuda      the CUDA kernels (launch on the given stream)
//   -DGENFAST_MODULE_CUDA_EMU  genfast._cuda_emu  the same CUDA kernels run on the CPU (tests)
// Every function takes plain ints (data pointers, sizes, strides) and floats: no torch here, so
// the modules work with any torch version (DESIGN.md §2). The GIL is released around kernels.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "bind_util.h"
#include "flow_step.h"
#include "modulate.h"
#include "modulate_bind.h"
#include "vq.h"
#include "kl_bind.h"
#include "attention.h"
#include "attention_fp32.h"
#include "gelu.h"

#if defined(GENFAST_MODULE_CUDA) || defined(GENFAST_MODULE_CUDA_EMU)
#define GENFAST_CUDA_SIDE 1
#endif
#if defined(GENFAST_MODULE_CUDA)
#include <cuda_runtime_api.h>
#endif
#ifdef GENFAST_CUDA_SIDE
#include <initializer_list>

#include "attention_flash.h"
#endif

namespace py = pybind11;
namespace genfast {
namespace {

#ifdef GENFAST_CUDA_SIDE
// A CUDA launch error becomes a Python RuntimeError naming the kernel.
void check_launch(int err, const char* what) {
  if (err == 0) return;
#if defined(GENFAST_MODULE_CUDA)
  throw std::runtime_error(std::string("genfast: ") + what + " launch failed: " +
                           cudaGetErrorString(static_cast<cudaError_t>(err)));
#else
  throw std::runtime_error(std::string("genfast: emulated ") + what + " failed with code " + std::to_string(err));
#endif
}
#endif

void flow_step(uintptr_t out, uintptr_t x, uintptr_t vc, uintptr_t vu, int64_t rows, int64_t cols,
               int64_t out_rs, int64_t out_cs, int64_t x_rs, int64_t x_cs, int64_t vc_rs, int64_t vc_cs,
               int64_t vu_rs, int64_t vu_cs, uintptr_t dt, int64_t dt_stride, double dt_value, uintptr_t w,
               int64_t w_stride, double w_value, int32_t dtype, uintptr_t stream) {
  const FlowStepParams p = make_flow_step_params(out, x, vc, vu, rows, cols, out_rs, out_cs, x_rs, x_cs, vc_rs,
                                                 vc_cs, vu_rs, vu_cs, dt, dt_stride, dt_value, w, w_stride,
                                                 w_value, dtype);
  py::gil_scoped_release nogil;
#ifdef GENFAST_CUDA_SIDE
  check_launch(flow_step_cuda(p, reinterpret_cast<void*>(stream)), "flow_step");
#else
  (void)stream;
  flow_step_cpu(p);
#endif
}

// The sampler's common call (contiguous tensors, float dt and w) with 9 arguments instead of 22:
// pybind11's per-argument conversion is ~1 us of the ~3 us a small step costs.
void flow_step_contiguous(uintptr_t out, uintptr_t x, uintptr_t vc, uintptr_t vu, int64_t rows, int64_t cols,
                          double dt_value, double w_value, int32_t dtype, uintptr_t stream) {
  flow_step(out, x, vc, vu, rows, cols, cols, 1, cols, 1, cols, 1, cols, 1, 0, 0, dt_value, 0, 0, w_value, dtype,
            stream);
}

#ifdef GENFAST_CUDA_SIDE
#define GENFAST_RUN(fn, p, stream) check_launch(fn##_cuda(p, reinterpret_cast<void*>(stream)), #fn)
#else
#define GENFAST_RUN(fn, p, stream) ((void)(stream), fn##_cpu(p))
#endif

void modulate_fwd(uintptr_t out, uintptr_t x, uintptr_t shift, uintptr_t scale, uintptr_t mean, uintptr_t rstd,
                  int64_t B, int64_t N, int64_t C, const std::array<int64_t, 8>& strides, double eps, bool rms,
                  int32_t dtype, uintptr_t stream) {
  const ModulateParams p = make_modulate_params(out, x, shift, scale, mean, rstd, B, N, C, strides, eps, rms, dtype);
  py::gil_scoped_release nogil;
  GENFAST_RUN(modulate_fwd, p, stream);
}

void modulate_bwd(uintptr_t dx, uintptr_t dshift, uintptr_t dscale, uintptr_t partial, uintptr_t grad, uintptr_t x,
                  uintptr_t scale, uintptr_t mean, uintptr_t rstd, int64_t B, int64_t N, int64_t C,
                  const std::array<int64_t, 8>& strides, int64_t chunk_rows, bool per_sample, bool rms, int32_t dtype,
                  uintptr_t addend, uintptr_t stream) {
  const ModulateBwdParams p = make_modulate_bwd_params(dx, dshift, dscale, partial, grad, x, scale, mean, rstd, B, N,
                                                       C, strides, chunk_rows, per_sample, rms, dtype, addend);
  py::gil_scoped_release nogil;
  GENFAST_RUN(modulate_bwd, p, stream);
}

void gated_residual_fwd(uintptr_t out, uintptr_t x, uintptr_t gate, uintptr_t y, int64_t B, int64_t N, int64_t C,
                        const std::array<int64_t, 8>& strides, int32_t dtype, uintptr_t stream) {
  const GatedResidualParams p = make_gated_params(out, x, gate, y, B, N, C, strides, dtype);
  py::gil_scoped_release nogil;
  GENFAST_RUN(gated_residual_fwd, p, stream);
}

void gated_residual_bwd(uintptr_t dy, uintptr_t dgate, uintptr_t partial, uintptr_t grad, uintptr_t gate, uintptr_t y,
                        int64_t B, int64_t N, int64_t C, const std::array<int64_t, 6>& strides, int64_t chunk_rows,
                        bool per_sample, int32_t dtype, uintptr_t dbias, uintptr_t bias_partial, uintptr_t stream) {
  const GatedResidualBwdParams p = make_gated_bwd_params(dy, dgate, partial, grad, gate, y, B, N, C, strides,
                                                         chunk_rows, per_sample, dtype, dbias, bias_partial);
  py::gil_scoped_release nogil;
  GENFAST_RUN(gated_residual_bwd, p, stream);
}

void kl_forward(uintptr_t z, uintptr_t kl, uintptr_t mu, uintptr_t logvar, uintptr_t noise, uintptr_t seed,
                int64_t rows, int64_t cols, const std::vector<int64_t>& strides, double lo, double hi, bool clamp,
                bool kl_per_row, uintptr_t partial, int64_t row_blocks, int32_t dtype, uintptr_t stream) {
  const KLForwardParams p = make_kl_forward(z, kl, mu, logvar, noise, seed, rows, cols, strides, lo, hi, clamp,
                                            kl_per_row, partial, row_blocks, dtype);
  py::gil_scoped_release nogil;
#ifdef GENFAST_CUDA_SIDE
  check_launch(kl_forward_cuda(p, reinterpret_cast<void*>(stream)), "kl_forward");
#else
  (void)stream;
  kl_forward_cpu(p);
#endif
}

void kl_backward(uintptr_t dmu, uintptr_t dlogvar, uintptr_t dz, uintptr_t gkl, uintptr_t mu, uintptr_t logvar,
                 uintptr_t noise, uintptr_t seed, int64_t rows, int64_t cols, const std::vector<int64_t>& strides,
                 double lo, double hi, bool clamp, int32_t dtype, uintptr_t stream) {
  const KLBackwardParams p =
      make_kl_backward(dmu, dlogvar, dz, gkl, mu, logvar, noise, seed, rows, cols, strides, lo, hi, clamp, dtype);
  py::gil_scoped_release nogil;
#ifdef GENFAST_CUDA_SIDE
  check_launch(kl_backward_cuda(p, reinterpret_cast<void*>(stream)), "kl_backward");
#else
  (void)stream;
  kl_backward_cpu(p);
#endif
}

void vq_nearest(uintptr_t z, int64_t n, int64_t d, int64_t z_inner, int64_t z_os, int64_t z_rs, int64_t z_cs,
                int32_t z_dtype, uintptr_t codebook, int64_t k, int64_t c_rs, int64_t c_cs, int32_t c_dtype,
                int32_t metric, int32_t precision, uintptr_t indices, uintptr_t distance, uintptr_t stream) {
  const VqParams p = make_vq_params(z, n, d, z_inner, z_os, z_rs, z_cs, z_dtype, codebook, k, c_rs, c_cs, c_dtype,
                                    metric, precision, indices, distance);
  py::gil_scoped_release nogil;
#ifdef GENFAST_CUDA_SIDE
  check_launch(vq_nearest_cuda(p, reinterpret_cast<void*>(stream)), "vq_nearest");
#else
  (void)stream;
  vq_nearest_cpu(p);
#endif
}

void vq_counts(uintptr_t indices, int64_t n, int64_t idx_stride, int64_t k, uintptr_t counts, uintptr_t stream) {
  const VqCountsParams p{reinterpret_cast<const int64_t*>(indices), n, idx_stride, k, reinterpret_cast<int64_t*>(counts)};
  py::gil_scoped_release nogil;
#ifdef GENFAST_CUDA_SIDE
  check_launch(vq_counts_cuda(p, reinterpret_cast<void*>(stream)), "vq_counts");
#else
  (void)stream;
  vq_counts_cpu(p);
#endif
}

#ifndef GENFAST_CUDA_SIDE
// The CPU attention path's fused softmax rows (csrc/attention.h); genfast._C only.
AttnRowsParams attn_rows_params(int64_t groups, int64_t rows, int64_t nk, int64_t heads, int64_t q0, double scale,
                                bool causal, uintptr_t mask, int64_t mask_bs, uintptr_t lse, int64_t lse_gs,
                                int32_t dtype, bool from_p = false) {
  if (dtype < kFloat32 || dtype > kBFloat16) throw py::value_error("genfast: unknown dtype code");
  return AttnRowsParams{groups, rows, nk, heads, q0, static_cast<float>(scale), causal ? 1 : 0,
                        reinterpret_cast<const uint8_t*>(mask), mask_bs, reinterpret_cast<float*>(lse), lse_gs, dtype,
                        from_p ? 1 : 0};
}

void attn_softmax_rows(uintptr_t s, uintptr_t p, int64_t groups, int64_t rows, int64_t nk, int64_t heads, int64_t q0,
                       double scale, bool causal, uintptr_t mask, int64_t mask_bs, uintptr_t lse, int64_t lse_gs,
                       int32_t dtype) {
  const AttnRowsParams a = attn_rows_params(groups, rows, nk, heads, q0, scale, causal, mask, mask_bs, lse, lse_gs, dtype);
  py::gil_scoped_release nogil;
  attn_softmax_rows_cpu(a, reinterpret_cast<const void*>(s), reinterpret_cast<void*>(p));
}

void attn_softmax_bwd_rows(uintptr_t s, uintptr_t dp, uintptr_t p, uintptr_t ds, int64_t groups, int64_t rows,
                           int64_t nk, int64_t heads, int64_t q0, double scale, bool causal, uintptr_t mask,
                           int64_t mask_bs, uintptr_t lse, int64_t lse_gs, int32_t dtype, bool from_p) {
  const AttnRowsParams a =
      attn_rows_params(groups, rows, nk, heads, q0, scale, causal, mask, mask_bs, lse, lse_gs, dtype, from_p);
  py::gil_scoped_release nogil;
  attn_softmax_bwd_rows_cpu(a, reinterpret_cast<const void*>(s), reinterpret_cast<const void*>(dp),
                            reinterpret_cast<void*>(p), reinterpret_cast<void*>(ds));
}

// The fp32 "onednn" way's backward over one head's transposed scores (csrc/attention_fp32.h).
void attn_softmax_bwd_cols(uintptr_t st, uintptr_t dpt, int64_t nk, int64_t nq, int64_t q0, double scale, bool causal,
                           uintptr_t mask, uintptr_t lse, uintptr_t delta) {
  const AttnColsParams a{nk, nq, q0, static_cast<float>(scale), causal ? 1 : 0, reinterpret_cast<const uint8_t*>(mask),
                         reinterpret_cast<const float*>(lse), reinterpret_cast<const float*>(delta)};
  py::gil_scoped_release nogil;
  attn_softmax_bwd_cols_cpu(a, reinterpret_cast<float*>(st), reinterpret_cast<float*>(dpt));
}

// The fp32 "small" way (csrc/attention_fp32.h). Tensors as (ptr, sB, sH, sN, sD) tuples of ints,
// outputs as (ptr, sB, sH, sN) with a unit last stride; sizes (B, H, Nq, Nk, D, query rows per block).
AttnHeadIn attn_head_in(const std::vector<int64_t>& t) {
  if (t.size() != 5) throw py::value_error("genfast: attention tensor spec must be (ptr, sB, sH, sN, sD)");
  return AttnHeadIn{reinterpret_cast<const void*>(static_cast<uintptr_t>(t[0])), t[1], t[2], t[3], t[4]};
}
AttnHeadOut attn_head_out(const std::vector<int64_t>& t) {
  if (t.size() != 4) throw py::value_error("genfast: attention output spec must be (ptr, sB, sH, sN)");
  return AttnHeadOut{reinterpret_cast<void*>(static_cast<uintptr_t>(t[0])), t[1], t[2], t[3]};
}
void check_small_dtype(int32_t dtype) {
  if (dtype != kFloat32 && dtype != kBFloat16)
    throw py::value_error("genfast: the small attention way takes fp32 or bf16");
}
AttnSmallParams attn_small_params(const std::vector<int64_t>& sizes, double scale, bool causal, uintptr_t mask,
                                  int64_t mask_bs, const std::vector<int64_t>& q, const std::vector<int64_t>& k,
                                  const std::vector<int64_t>& v, uintptr_t lse) {
  if (sizes.size() != 6) throw py::value_error("genfast: sizes must be (B, H, Nq, Nk, D, query rows per block)");
  if (sizes[5] < 1) throw py::value_error("genfast: query rows per block must be >= 1");
  AttnSmallParams a{};
  a.b = sizes[0], a.h = sizes[1], a.nq = sizes[2], a.nk = sizes[3], a.d = sizes[4], a.bq = sizes[5];
  a.scale = static_cast<float>(scale), a.causal = causal ? 1 : 0;
  a.mask = reinterpret_cast<const uint8_t*>(mask), a.mask_bs = mask_bs;
  a.q = attn_head_in(q), a.k = attn_head_in(k), a.v = attn_head_in(v), a.lse = reinterpret_cast<float*>(lse);
  return a;
}
#endif

// GELU(tanh) backward + bias gradient (csrc/gelu.h): every module (the C++ CPU kernel in _C).
void gelu_tanh_backward_bias(uintptr_t dh, uintptr_t dbias, uintptr_t partial, uintptr_t grad, uintptr_t h, int64_t M,
                             int64_t K, int64_t chunk_rows, int64_t chunk_group, int32_t dtype, uintptr_t stream) {
  check_dtype_code(dtype);
  if (chunk_rows < 1 || chunk_group < 1) throw py::value_error("genfast: chunk_rows and chunk_group must be >= 1");
  const GeluBiasBwdParams p{reinterpret_cast<void*>(dh), reinterpret_cast<void*>(dbias),
                            reinterpret_cast<float*>(partial), reinterpret_cast<const void*>(grad),
                            reinterpret_cast<const void*>(h), M, K, chunk_rows, chunk_group, dtype};
  py::gil_scoped_release nogil;
  GENFAST_RUN(gelu_tanh_backward_bias, p, stream);
}

// Column sums of up to three [M, width_i] tensors (csrc/gelu.h ColumnSumsParams): every module.
void column_sums(const std::vector<uintptr_t>& src, const std::vector<int64_t>& widths, uintptr_t out,
                 uintptr_t partial, int64_t M, int64_t chunk_rows, int64_t chunk_group, int32_t dtype, uintptr_t stream) {
  check_dtype_code(dtype);
  if (src.empty() || src.size() > 3 || widths.size() != src.size())
    throw py::value_error("genfast: column_sums takes 1 to 3 tensors, one width each");
  if (chunk_rows < 1 || chunk_group < 1) throw py::value_error("genfast: chunk_rows and chunk_group must be >= 1");
  ColumnSumsParams p{};
  p.n = static_cast<int32_t>(src.size());
  for (int t = 0; t < p.n; ++t) p.src[t] = reinterpret_cast<const void*>(src[t]), p.width[t] = widths[t];
  p.out = reinterpret_cast<void*>(out), p.partial = reinterpret_cast<float*>(partial);
  p.M = M, p.chunk_rows = chunk_rows, p.chunk_group = chunk_group, p.dtype = dtype;
  py::gil_scoped_release nogil;
  GENFAST_RUN(column_sums, p, stream);
}

void bind_all(py::module_& m) {
  m.def("vq_nearest", &vq_nearest, "Nearest codebook row per row of z, O(n) memory (see csrc/vq.h).",
        py::arg("z"), py::arg("n"), py::arg("d"), py::arg("z_inner"), py::arg("z_os"), py::arg("z_rs"),
        py::arg("z_cs"), py::arg("z_dtype"), py::arg("codebook"), py::arg("k"), py::arg("c_rs"), py::arg("c_cs"),
        py::arg("c_dtype"), py::arg("metric"), py::arg("precision"), py::arg("indices"), py::arg("distance"),
        py::arg("stream") = 0);
  m.def("vq_counts", &vq_counts, "Per-code counts of int64 indices in [0, k) (see csrc/vq.h).",
        py::arg("indices"), py::arg("n"), py::arg("idx_stride"), py::arg("k"), py::arg("counts"),
        py::arg("stream") = 0);
#ifndef GENFAST_CUDA_SIDE
  m.def("attn_softmax_rows", &attn_softmax_rows, "Fused scale + mask + softmax + log-sum-exp over score rows (csrc/attention.h).",
        py::arg("s"), py::arg("p"), py::arg("groups"), py::arg("rows"), py::arg("nk"), py::arg("heads"), py::arg("q0"),
        py::arg("scale"), py::arg("causal"), py::arg("mask"), py::arg("mask_bs"), py::arg("lse"), py::arg("lse_gs"),
        py::arg("dtype"));
  m.def("attn_softmax_bwd_rows", &attn_softmax_bwd_rows, "Fused softmax backward over score rows (csrc/attention.h).",
        py::arg("s"), py::arg("dp"), py::arg("p"), py::arg("ds"), py::arg("groups"), py::arg("rows"), py::arg("nk"),
        py::arg("heads"), py::arg("q0"), py::arg("scale"), py::arg("causal"), py::arg("mask"), py::arg("mask_bs"),
        py::arg("lse"), py::arg("lse_gs"), py::arg("dtype"), py::arg("from_p") = false);
  m.def("attn_softmax_bwd_cols", &attn_softmax_bwd_cols,
        "fp32 softmax backward over transposed scores, in place (csrc/attention_fp32.h).", py::arg("st"),
        py::arg("dpt"), py::arg("nk"), py::arg("nq"), py::arg("q0"), py::arg("scale"), py::arg("causal"),
        py::arg("mask"), py::arg("lse"), py::arg("delta"));
  m.def("attn_small_supported", &attn_small_supported);
  m.def("attn_amx_supported", &attn_amx_supported, "The CPU and the OS give this process AMX-BF16 tiles.");
  // One binding per direction for both dtypes: fp32 (attn_small_*_cpu, its backward reads out) and
  // bf16 (attn_small16_*_cpu); both read or fill p_keep (p in the call's dtype).
  m.def("attn_small_forward", [](const std::vector<int64_t>& sizes, double scale, bool causal, uintptr_t mask,
                                 int64_t mask_bs, const std::vector<int64_t>& q, const std::vector<int64_t>& k,
                                 const std::vector<int64_t>& v, const std::vector<int64_t>& out, uintptr_t lse,
                                 int32_t dtype, uintptr_t p_keep, bool amx) {
    check_small_dtype(dtype);
    AttnSmallParams a = attn_small_params(sizes, scale, causal, mask, mask_bs, q, k, v, lse);
    a.out = attn_head_out(out), a.p_keep = reinterpret_cast<void*>(p_keep), a.amx = amx ? 1 : 0;
    py::gil_scoped_release nogil;
    if (dtype == kBFloat16)
      attn_small16_forward_cpu(a);
    else
      attn_small_forward_cpu(a);
  }, "fp32 / bf16 attention forward, all heads in one call; p_keep: 0 or p's [B*H, Nq, Nk] buffer; "
     "amx (bf16): on AMX tiles where the CPU has them (csrc/attention_fp32.h).");
  m.def("attn_small_backward", [](const std::vector<int64_t>& sizes, double scale, bool causal, uintptr_t mask,
                                  int64_t mask_bs, const std::vector<int64_t>& q, const std::vector<int64_t>& k,
                                  const std::vector<int64_t>& v, const std::vector<int64_t>& dout, uintptr_t lse,
                                  const std::vector<int64_t>& out, uintptr_t p_keep, const std::vector<int64_t>& dq,
                                  const std::vector<int64_t>& dk, const std::vector<int64_t>& dv, int32_t dtype,
                                  bool amx) {
    check_small_dtype(dtype);
    AttnSmallParams a = attn_small_params(sizes, scale, causal, mask, mask_bs, q, k, v, lse);
    a.amx = amx ? 1 : 0;
    a.dout = attn_head_in(dout), a.o = attn_head_in(out);
    a.p_keep = reinterpret_cast<void*>(p_keep);
    a.dq = attn_head_out(dq), a.dk = attn_head_out(dk), a.dv = attn_head_out(dv);
    py::gil_scoped_release nogil;
    if (dtype == kBFloat16)
      attn_small16_backward_cpu(a);
    else
      attn_small_backward_cpu(a);
  }, "fp32 / bf16 attention backward, all heads in one call; out: the forward's (fp32 reads it); p_keep: 0 "
     "(recompute) or the forward's p; amx as the forward's (csrc/attention_fp32.h).");
  m.def("gelu_tanh", [](uintptr_t x, uintptr_t y, int64_t n, int32_t dtype) {
          py::gil_scoped_release nogil;
          gelu_tanh_cpu(reinterpret_cast<const void*>(x), reinterpret_cast<void*>(y), n, dtype);
        }, "GELU(tanh) over n contiguous elements (csrc/gelu.h).", py::arg("x"), py::arg("y"), py::arg("n"), py::arg("dtype"));
  m.def("gelu_tanh_bias_fp32", [](uintptr_t x, uintptr_t y, uintptr_t bias, int64_t rows, int64_t cols) {
          py::gil_scoped_release nogil;
          gelu_tanh_bias_fp32_cpu(reinterpret_cast<float*>(x), reinterpret_cast<float*>(y),
                                  reinterpret_cast<const float*>(bias), rows, cols);
        }, "fp32: h = x + bias (kept in x), y = GELU(tanh)(h) over [rows, cols] (csrc/gelu.h).", py::arg("x"), py::arg("y"),
        py::arg("bias"), py::arg("rows"), py::arg("cols"));
  m.def("gated_residual_bias_fp32", [](uintptr_t out, uintptr_t x, uintptr_t gate, int64_t gate_sb, uintptr_t y,
                                       uintptr_t bias, int64_t B, int64_t N, int64_t C, bool keep_y) {
          py::gil_scoped_release nogil;
          gated_residual_bias_fp32_cpu(reinterpret_cast<float*>(out), reinterpret_cast<const float*>(x),
                                       reinterpret_cast<const float*>(gate), gate_sb, reinterpret_cast<float*>(y),
                                       reinterpret_cast<const float*>(bias), B, N, C, keep_y);
        }, "fp32: x + gate * (y + bias), per-sample gate; keep_y writes y + bias back (csrc/modulate.h).",
        py::arg("out"), py::arg("x"), py::arg("gate"), py::arg("gate_sb"), py::arg("y"), py::arg("bias"), py::arg("B"),
        py::arg("N"), py::arg("C"), py::arg("keep_y"));
  m.def("gelu_tanh_backward", [](uintptr_t g, uintptr_t x, uintptr_t dx, int64_t n, int32_t dtype) {
          py::gil_scoped_release nogil;
          gelu_tanh_backward_cpu(reinterpret_cast<const void*>(g), reinterpret_cast<const void*>(x),
                                 reinterpret_cast<void*>(dx), n, dtype);
        }, "dx = g * GELU(tanh)'(x) over n contiguous elements (csrc/gelu.h).", py::arg("g"), py::arg("x"),
        py::arg("dx"), py::arg("n"), py::arg("dtype"));
#endif
  m.def("flow_step", &flow_step,
        "Fused rectified-flow Euler / CFG step over [rows, cols] strided views (see csrc/flow_step.h).",
        py::arg("out"), py::arg("x"), py::arg("vc"), py::arg("vu"), py::arg("rows"), py::arg("cols"),
        py::arg("out_rs"), py::arg("out_cs"), py::arg("x_rs"), py::arg("x_cs"), py::arg("vc_rs"),
        py::arg("vc_cs"), py::arg("vu_rs"), py::arg("vu_cs"), py::arg("dt"), py::arg("dt_stride"),
        py::arg("dt_value"), py::arg("w"), py::arg("w_stride"), py::arg("w_value"), py::arg("dtype"),
        py::arg("stream") = 0);
  m.def("flow_step_contiguous", &flow_step_contiguous,
        "flow_step for contiguous out/x/vc/vu [rows, cols] and scalar dt, w (the sampler's call).");
  // adaLN modulate / gated residual (csrc/modulate.h); strides as tuples in the structs' order.
  m.def("modulate_fwd", &modulate_fwd, "adaLN modulate forward (csrc/modulate.h)", py::arg("out"), py::arg("x"),
        py::arg("shift"), py::arg("scale"), py::arg("mean"), py::arg("rstd"), py::arg("B"), py::arg("N"), py::arg("C"),
        py::arg("strides"), py::arg("eps"), py::arg("rms"), py::arg("dtype"), py::arg("stream") = 0);
  m.def("modulate_bwd", &modulate_bwd, "adaLN modulate fused backward (csrc/modulate.h)", py::arg("dx"),
        py::arg("dshift"), py::arg("dscale"), py::arg("partial"), py::arg("grad"), py::arg("x"), py::arg("scale"),
        py::arg("mean"), py::arg("rstd"), py::arg("B"), py::arg("N"), py::arg("C"), py::arg("strides"),
        py::arg("chunk_rows"), py::arg("per_sample"), py::arg("rms"), py::arg("dtype"), py::arg("addend") = 0,
        py::arg("stream") = 0);
  m.def("gated_residual_fwd", &gated_residual_fwd, "x + gate * y (csrc/modulate.h)", py::arg("out"), py::arg("x"),
        py::arg("gate"), py::arg("y"), py::arg("B"), py::arg("N"), py::arg("C"), py::arg("strides"), py::arg("dtype"),
        py::arg("stream") = 0);
  m.def("gated_residual_bwd", &gated_residual_bwd, "gated residual backward: dy, dgate, dbias (csrc/modulate.h)",
        py::arg("dy"), py::arg("dgate"), py::arg("partial"), py::arg("grad"), py::arg("gate"), py::arg("y"),
        py::arg("B"), py::arg("N"), py::arg("C"), py::arg("strides"), py::arg("chunk_rows"), py::arg("per_sample"),
        py::arg("dtype"), py::arg("dbias") = 0, py::arg("bias_partial") = 0, py::arg("stream") = 0);
  // reparam_kl: see csrc/kl.h and csrc/kl_bind.h for the stride lists.
  m.def("kl_forward", &kl_forward, "Reparameterized sample + KL forward (csrc/kl.h).");
  m.def("kl_backward", &kl_backward, "Reparameterized sample + KL backward (csrc/kl.h).");
#ifdef GENFAST_CUDA_SIDE
  m.def("kl_row_blocks", &kl_cuda_row_blocks, "Column blocks per row of the CUDA forward's KL scratch.");
#endif
  m.def("gelu_tanh_backward_bias", &gelu_tanh_backward_bias,
        "dh = grad * GELU(tanh)'(h) and dbias = column sums of dh over [M, K] (csrc/gelu.h)", py::arg("dh"),
        py::arg("dbias"), py::arg("partial"), py::arg("grad"), py::arg("h"), py::arg("M"), py::arg("K"),
        py::arg("chunk_rows"), py::arg("chunk_group"), py::arg("dtype"), py::arg("stream") = 0);
  m.def("column_sums", &column_sums, "column sums of up to three [M, width] tensors in one pass (csrc/gelu.h)",
        py::arg("src"), py::arg("widths"), py::arg("out"), py::arg("partial"), py::arg("M"), py::arg("chunk_rows"),
        py::arg("chunk_group"), py::arg("dtype"), py::arg("stream") = 0);
}

#ifdef GENFAST_CUDA_SIDE
// Flash attention forward (csrc/attention_flash.h): fp16 / bf16, head dim <= 128; strides in elements.
void attention_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, uintptr_t mask, int64_t q_b,
                   int64_t q_h, int64_t q_n, int64_t k_b, int64_t k_h, int64_t k_n, int64_t v_b, int64_t v_h,
                   int64_t v_n, int64_t o_b, int64_t o_h, int64_t o_n, int64_t mask_b, int64_t mask_n, int64_t B,
                   int64_t H, int64_t Nq, int64_t Nk, int64_t D, double scale, bool causal, int32_t dtype,
                   uintptr_t stream) {
  if (dtype != kFloat16 && dtype != kBFloat16) throw py::value_error("genfast: attention_fwd takes fp16 or bf16");
  if (D < 1 || D > 128) throw py::value_error("genfast: attention_fwd takes head dims 1..128");
  const AttentionParams p{reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(k),
                          reinterpret_cast<const void*>(v), reinterpret_cast<void*>(o), reinterpret_cast<float*>(lse),
                          reinterpret_cast<const uint8_t*>(mask), q_b, q_h, q_n, k_b, k_h, k_n, v_b, v_h, v_n, o_b,
                          o_h, o_n, mask_b, mask_n, B, H, Nq, Nk, D, static_cast<float>(scale), causal ? 1 : 0,
                          dtype};
  py::gil_scoped_release nogil;
  check_launch(attention_fwd_cuda(p, reinterpret_cast<void*>(stream)), "attention_fwd");
}

// Flash attention backward (csrc/attention_flash.h): dq, dk, dv from dout and the forward's lse (fp32
// [B, H, Nq] contiguous). delta: fp32 [B, H, Nq] workspace, filled with rowsum(dout * o) from o
// (o = 0: delta holds it already).
void attention_bwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t dout, uintptr_t lse, uintptr_t delta,
                   uintptr_t o, py::tuple o_s, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t mask, py::tuple q_s, py::tuple k_s,
                   py::tuple v_s, py::tuple do_s, py::tuple dq_s, py::tuple dk_s, py::tuple dv_s, py::tuple mask_s,
                   int64_t B, int64_t H, int64_t Nq, int64_t Nk, int64_t D, double scale, bool causal, int32_t dtype,
                   uintptr_t stream) {
  if (dtype != kFloat16 && dtype != kBFloat16) throw py::value_error("genfast: attention_bwd takes fp16 or bf16");
  if (D < 1 || D > 128) throw py::value_error("genfast: attention_bwd takes head dims 1..128");
  // (b, h, n) or (b, n) strides from a tuple, into the named fields
  auto strides = [](const py::tuple& t, std::initializer_list<int64_t*> out, const char* name) {
    if (t.size() != out.size()) throw py::value_error(std::string("genfast: attention_bwd: wrong number of ") + name + " strides");
    size_t i = 0;
    for (int64_t* o : out) *o = t[i++].cast<int64_t>();
  };
  AttentionBwdParams p{};
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.dout = reinterpret_cast<const void*>(dout);
  p.lse = reinterpret_cast<const float*>(lse);
  p.delta = reinterpret_cast<float*>(delta);
  p.o = reinterpret_cast<const void*>(o);
  strides(o_s, {&p.o_b, &p.o_h, &p.o_n}, "o");
  p.dq = reinterpret_cast<void*>(dq);
  p.dk = reinterpret_cast<void*>(dk);
  p.dv = reinterpret_cast<void*>(dv);
  p.mask = reinterpret_cast<const uint8_t*>(mask);
  strides(q_s, {&p.q_b, &p.q_h, &p.q_n}, "q");
  strides(k_s, {&p.k_b, &p.k_h, &p.k_n}, "k");
  strides(v_s, {&p.v_b, &p.v_h, &p.v_n}, "v");
  strides(do_s, {&p.do_b, &p.do_h, &p.do_n}, "dout");
  strides(dq_s, {&p.dq_b, &p.dq_h, &p.dq_n}, "dq");
  strides(dk_s, {&p.dk_b, &p.dk_h, &p.dk_n}, "dk");
  strides(dv_s, {&p.dv_b, &p.dv_h, &p.dv_n}, "dv");
  strides(mask_s, {&p.mask_b, &p.mask_n}, "mask");
  p.B = B, p.H = H, p.Nq = Nq, p.Nk = Nk, p.D = D;
  p.scale = static_cast<float>(scale);
  p.causal = causal ? 1 : 0;
  p.dtype = dtype;
  py::gil_scoped_release nogil;
  check_launch(attention_bwd_cuda(p, reinterpret_cast<void*>(stream)), "attention_bwd");
}
void bind_attention_flash(py::module_& m) {
  m.def("attention_fwd", &attention_fwd,
        "Flash attention forward, fp16/bf16, head dim <= 128: writes o and the fp32 lse (csrc/attention_flash.h).",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("mask"), py::arg("q_b"),
        py::arg("q_h"), py::arg("q_n"), py::arg("k_b"), py::arg("k_h"), py::arg("k_n"), py::arg("v_b"), py::arg("v_h"),
        py::arg("v_n"), py::arg("o_b"), py::arg("o_h"), py::arg("o_n"), py::arg("mask_b"), py::arg("mask_n"),
        py::arg("B"), py::arg("H"), py::arg("Nq"), py::arg("Nk"), py::arg("D"), py::arg("scale"), py::arg("causal"),
        py::arg("dtype"), py::arg("stream") = 0);
  m.def("attention_bwd", &attention_bwd,
        "Flash attention backward, fp16/bf16, head dim <= 128: writes dq, dk, dv (csrc/attention_flash.h). Strides as "
        "(b, h, n) tuples, the mask's as (b, n).",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("dout"), py::arg("lse"), py::arg("delta"), py::arg("o"), py::arg("o_strides"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("mask"), py::arg("q_strides"), py::arg("k_strides"),
        py::arg("v_strides"), py::arg("dout_strides"), py::arg("dq_strides"), py::arg("dk_strides"),
        py::arg("dv_strides"), py::arg("mask_strides"), py::arg("B"), py::arg("H"), py::arg("Nq"), py::arg("Nk"),
        py::arg("D"), py::arg("scale"), py::arg("causal"), py::arg("dtype"), py::arg("stream") = 0);
}
#endif

}  // namespace
}  // namespace genfast

#if defined(GENFAST_MODULE_CPU)
PYBIND11_MODULE(_C, m) {
  m.doc() = "genfast C++ CPU kernels";
  genfast::bind_all(m);
}
#elif defined(GENFAST_MODULE_CUDA)
PYBIND11_MODULE(_cuda, m) {
  m.doc() = "genfast CUDA kernels";
  genfast::bind_all(m);
  genfast::bind_attention_flash(m);
}
#elif defined(GENFAST_MODULE_CUDA_EMU)
#include "emu/launch_log.h"

PYBIND11_MODULE(_cuda_emu, m) {
  m.doc() = "genfast CUDA kernels run on the CPU through csrc/emu (tests only)";
  genfast::bind_all(m);
  genfast::bind_attention_flash(m);
  m.def("emu_launches", [] {
    py::list out;
    for (const auto& r : genfast_emu::take_launch_log())
      out.append(py::make_tuple(r.kernel, py::make_tuple(r.grid_x, r.grid_y, r.grid_z), r.block_x));
    return out;
  }, "(kernel as the launch wrote it, grid, block.x) of each emulated launch since the last call, oldest "
     "first (at most the last 256; csrc/emu/launch_log.h). For tests of a dispatch.");
}
#else
#error "compile bindings.cpp with one of GENFAST_MODULE_CPU / GENFAST_MODULE_CUDA / GENFAST_MODULE_CUDA_EMU"
#endif
