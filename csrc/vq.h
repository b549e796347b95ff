// Nearest-codebook lookup (VQ) and per-code counts, shared by the CPU, CUDA and emulated-CUDA
// kernels. No PyTorch headers: the bindings fill these structs from Python ints.
//
// For every row z_n of z [n, d] the index of the code c_k of codebook [k, d] with the smallest
//   l2:      score(n, k) = ||c_k||^2 - 2 z_n . c_k            (= ||z_n - c_k||^2 - ||z_n||^2)
//   cosine:  score(n, k) = -(z_n . c_k) / max(||c_k||, eps)    (argmax of the cosine similarity;
//            dividing by ||z_n|| changes no row's argmin, so z is not normalised)
// without ever holding the n x k score matrix: tiles of z against tiles of the codebook, a
// running min and argmin per row. Scores accumulate in fp32 whatever the storage dtype.
//
// Ties go to the lowest index (as torch.argmin). A NaN score never compares smaller, so a row
// whose every score is NaN (a NaN in z) gets index 0 — what torch.argmin answers for a row of
// NaN distances — and a code containing NaN is never chosen while any code scores a number.
//
// When `distance` is given, the chosen code's distance is recomputed directly, without the
// cancellation of the expanded form: l2 -> ||z_n - c||^2, cosine -> ||z_n/|z_n| - c/|c| ||^2
// (= 2 - 2 cos), both in fp32.
#pragma once
#include <cstdint>

#include "flow_step.h"  // enum DType

namespace genfast {

enum VqMetric : int32_t { kVqL2 = 0, kVqCosine = 1 };
// kVqBf16Screen (CPUs with AVX-512 BF16; elsewhere, and on the GPU kernels, the fp32 mode runs):
// bf16 products screen the codes with a rigorous error bound, the survivors are re-scored exactly
// as the fp32 mode scores them, so the indices are the fp32 mode's (csrc/cpu/vq_screen.cpp).
enum VqPrecision : int32_t { kVqFp32 = 0, kVqBf16Screen = 1 };

// Norms below this count as this (F.normalize's eps), so a zero code scores 0, not NaN.
constexpr float kVqNormEps = 1e-12f;

struct VqParams {
  // z [n, d]: row r = o * z_inner + i starts at o * z_os + i * z_rs, column j at + j * z_cs
  // (elements), so channels-first latents permuted to channels-last ([B, H, W, C] over a
  // contiguous [B, C, H, W]: z_inner = H*W, z_os = C*H*W, z_rs = 1, z_cs = H*W) are read in place.
  const void* z;
  int64_t n, d;
  int64_t z_inner, z_os, z_rs, z_cs;
  int32_t z_dtype;  // DType
  const void* codebook;  // [k, d], strides (c_rs, c_cs) in elements
  int64_t k;
  int64_t c_rs, c_cs;
  int32_t c_dtype;  // DType (may differ from z's: bf16 z with an fp32 codebook)
  int32_t metric;   // VqMetric
  int32_t precision;  // VqPrecision
  int64_t* indices;  // [n] contiguous, written
  float* distance;   // [n] contiguous fp32, or nullptr
};

struct VqCountsParams {
  const int64_t* indices;  // [n], stride idx_stride; every value in [0, k) (checked by the caller)
  int64_t n, idx_stride;
  int64_t k;
  int64_t* counts;  // [k] contiguous, overwritten
};

// csrc/cpu/vq.cpp
void vq_nearest_cpu(const VqParams& p);
void vq_counts_cpu(const VqCountsParams& p);

// csrc/cuda/vq.cu: launch on `stream` (a cudaStream_t), return the cudaError_t as an int.
int vq_nearest_cuda(const VqParams& p, void* stream);
int vq_counts_cuda(const VqCountsParams& p, void* stream);

}  // namespace genfast
