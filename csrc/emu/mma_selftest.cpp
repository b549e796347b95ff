// Self-test of the tensor-core wrappers (csrc/cuda/mma.cuh) under the CUDA emulation, run by
// tests/test_cuda_mma_emu.py. Checks mma.sync m16n8k16 (bf16 and f16) and ldmatrix x1/x2/x4
// (+ .trans) against a scalar matmul, a Q K^T -> P -> P V chain (C fragments repacked as A
// operands, V through ldmatrix.trans) as the attention kernel uses it, and that deliberately
// wrong layouts FAIL (swapped A registers, wrong C row pair, wrong half of a packed register,
// swapped B registers, a misaligned ldmatrix row). Build and run by hand:
//   g++ -std=c++17 -O1 -DGENFAST_EMULATE -fno-strict-aliasing -pthread -Icsrc csrc/emu/mma_selftest.cpp -o /tmp/mma_selftest && /tmp/mma_selftest
// The same source compiles with nvcc (nvcc -std=c++17 -arch=native -Icsrc -x cu ...) to run the
// same checks on a GPU (tests/test_cuda_mma_emu.py, GPU-marked), all but the misaligned-row one.
#include <math.h>
#include <stdio.h>

#include <random>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/mma.cuh"

namespace {

using genfast::dev::ldmatrix;
using genfast::dev::mma_16816;
using genfast::dev::pack2;

int g_failures = 0;
void check(bool ok, const char* what) {
  printf("  %-64s %s\n", what, ok ? "ok" : "FAIL");
  if (!ok) ++g_failures;
}

enum Variant {
  kLdmatrix = 0,     // A via ldmatrix.x4, B via ldmatrix.x2 from an n-major copy
  kLdmatrixTrans,    // B via ldmatrix.x2.trans from the k-major matrix
  kLdmatrixX1,       // B via two ldmatrix.x1
  kRegisters,        // fragments built from the layout formulas, no ldmatrix
  kBadSwapA,         // broken: a1 and a2 swapped
  kBadSwapB,         // broken: b0 and b1 swapped
  kBadCRows,         // broken: c0,c1 written to row g+8 and c2,c3 to row g
  kBadPackHalf,      // broken: element 2i packed into the HIGH half
  kBadAlign,         // broken: ldmatrix rows 8 bytes off their 16-byte alignment
  kNumVariants
};
const char* kNames[] = {"ldmatrix.x4 A, ldmatrix.x2 B", "ldmatrix.x2.trans B", "ldmatrix.x1 B", "register fragments",
                        "swapped A registers a1<->a2", "swapped B registers", "wrong C row pair",
                        "wrong half of a packed register", "misaligned ldmatrix row"};

// 16-bit storage of x as the kernel will see it.
template <bool BF16>
__device__ __forceinline__ unsigned short to16(float x) { return static_cast<unsigned short>(pack2<BF16>(x, 0.0f)); }

// C[16][8] = A[16][16] B[16][8] (row-major fp32 in global memory), one warp.
template <bool BF16>
__global__ void gemm_16x8x16(const float* A, const float* B, float* C, int variant) {
  __shared__ __align__(16) unsigned short sA[16][24];   // padded rows: 48 bytes, 16-byte aligned
  __shared__ __align__(16) unsigned short sBt[8][24];   // B^T: n-major, k contiguous
  __shared__ __align__(16) unsigned short sB[16][16];   // B: k-major, n contiguous (cols 8..15 unused)
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  for (int i = lane; i < 256; i += 32) sA[i / 16][i % 16] = to16<BF16>(A[i]);
  for (int i = lane; i < 128; i += 32) {
    sBt[i % 8][i / 8] = to16<BF16>(B[i]);
    sB[i / 8][i % 8] = to16<BF16>(B[i]);
  }
  __syncthreads();
  uint32_t a[4], b[2];
  const int shift = variant == kBadAlign ? 4 : 0;  // 8 bytes
  // A: matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15)
  ldmatrix<4>(a, &sA[(lane & 7) + 8 * ((lane >> 3) & 1)][8 * (lane >> 4) + shift]);
  if (variant == kLdmatrixTrans) {
    uint32_t r[2];
    ldmatrix<2, true>(r, &sB[lane & 15][0]);  // matrices (k 0-7, n 0-7), (k 8-15, n 0-7)
    b[0] = r[0], b[1] = r[1];
  } else if (variant == kLdmatrixX1) {
    uint32_t r0[1], r1[1];
    ldmatrix<1>(r0, &sBt[lane & 7][0]);
    ldmatrix<1>(r1, &sBt[lane & 7][8]);
    b[0] = r0[0], b[1] = r1[0];
  } else {
    uint32_t r[2];
    ldmatrix<2>(r, &sBt[lane & 7][8 * ((lane >> 3) & 1)]);
    b[0] = r[0], b[1] = r[1];
  }
  if (variant == kRegisters || variant == kBadPackHalf) {
    auto ld = [](const float* p) { return p[0]; };
    for (int i = 0; i < 4; ++i) {
      const int r = g + 8 * (i & 1), c = 2 * t + 8 * (i >> 1);
      const float lo = ld(&A[r * 16 + c]), hi = ld(&A[r * 16 + c + 1]);
      a[i] = variant == kBadPackHalf ? pack2<BF16>(hi, lo) : pack2<BF16>(lo, hi);
    }
    for (int i = 0; i < 2; ++i) b[i] = pack2<BF16>(B[(2 * t + 8 * i) * 8 + g], B[(2 * t + 8 * i + 1) * 8 + g]);
  }
  if (variant == kBadSwapA) {
    const uint32_t x = a[1];
    a[1] = a[2], a[2] = x;
  }
  if (variant == kBadSwapB) {
    const uint32_t x = b[0];
    b[0] = b[1], b[1] = x;
  }
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  mma_16816<BF16>(d, a, b);
  const int r0 = variant == kBadCRows ? g + 8 : g, r1 = variant == kBadCRows ? g : g + 8;
  C[r0 * 8 + 2 * t] = d[0];
  C[r0 * 8 + 2 * t + 1] = d[1];
  C[r1 * 8 + 2 * t] = d[2];
  C[r1 * 8 + 2 * t + 1] = d[3];
}

// O[16][16] = round16(Q[16][32] K[16][32]^T) V[16][16]: the attention kernel's chain in miniature.
template <bool BF16>
__global__ void chain(const float* Q, const float* K, const float* V, float* O, int bad_repack) {
  __shared__ __align__(16) unsigned short sQ[16][40], sK[16][40], sV[16][24];
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  for (int i = lane; i < 512; i += 32) sQ[i / 32][i % 32] = to16<BF16>(Q[i]), sK[i / 32][i % 32] = to16<BF16>(K[i]);
  for (int i = lane; i < 256; i += 32) sV[i / 16][i % 16] = to16<BF16>(V[i]);
  __syncthreads();
  float s[2][4] = {};  // two n-tiles of 8 keys
  for (int kk = 0; kk < 2; ++kk) {
    uint32_t a[4], kb[4];
    ldmatrix<4>(a, &sQ[(lane & 7) + 8 * ((lane >> 3) & 1)][kk * 16 + 8 * (lane >> 4)]);
    // (keys 0-7, d lo), (keys 0-7, d hi), (keys 8-15, d lo), (keys 8-15, d hi)
    ldmatrix<4>(kb, &sK[(lane & 7) + 8 * (lane >> 4)][kk * 16 + 8 * ((lane >> 3) & 1)]);
    const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
    mma_16816<BF16>(s[0], a, b0);
    mma_16816<BF16>(s[1], a, b1);
  }
  uint32_t p[4];  // C fragments of n-tiles 0 and 1 -> the A fragment of one k16 step
  for (int j = 0; j < 2; ++j) {
    p[2 * j] = bad_repack ? pack2<BF16>(s[j][1], s[j][0]) : pack2<BF16>(s[j][0], s[j][1]);
    p[2 * j + 1] = pack2<BF16>(s[j][2], s[j][3]);
  }
  float o[2][4] = {};
  uint32_t vb[4];  // (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15), transposed
  ldmatrix<4, true>(vb, &sV[(lane & 7) + 8 * ((lane >> 3) & 1)][8 * (lane >> 4)]);
  const uint32_t v0[2] = {vb[0], vb[1]}, v1[2] = {vb[2], vb[3]};
  mma_16816<BF16>(o[0], p, v0);
  mma_16816<BF16>(o[1], p, v1);
  for (int j = 0; j < 2; ++j)
    for (int i = 0; i < 4; ++i) O[(g + 8 * (i >> 1)) * 16 + j * 8 + 2 * t + (i & 1)] = o[j][i];
}

// Kernel inputs and outputs: host memory under the emulation, managed memory on a GPU.
struct Buf {
  float* p = nullptr;
  size_t n = 0;
  explicit Buf(size_t n_, float v = 0.0f) : n(n_) {
#ifdef GENFAST_EMULATE
    p = new float[n];
#else
    if (cudaMallocManaged(&p, n * sizeof(float)) != cudaSuccess) abort();
#endif
    for (size_t i = 0; i < n; ++i) p[i] = v;
  }
  ~Buf() {
#ifdef GENFAST_EMULATE
    delete[] p;
#else
    cudaFree(p);
#endif
  }
  Buf(const Buf&) = delete;
  float& operator[](size_t i) { return p[i]; }
  float operator[](size_t i) const { return p[i]; }
  float* begin() { return p; }
  float* end() { return p + n; }
  float* data() { return p; }
  size_t size() const { return n; }
};

// The launch's error; on a GPU after the kernel ran.
int launch_error() {
  int e = cudaGetLastError();
#ifndef GENFAST_EMULATE
  if (!e) e = cudaDeviceSynchronize();
#endif
  return e;
}

float round16(float x, bool bf16) {
  if (bf16) return __bfloat162float(__float2bfloat16_rn(x));
  return __half2float(__float2half_rn(x));
}

double max_rel_err(const Buf& got, const std::vector<double>& want) {
  double err = 0, scale = 1e-6;
  for (size_t i = 0; i < got.size(); ++i) {
    err = fmax(err, fabs(got[i] - want[i]));
    scale = fmax(scale, fabs(want[i]));
  }
  return err / scale;
}

template <bool BF16>
void run_gemm(std::mt19937& rng) {
  std::normal_distribution<float> nd;
  Buf A(256), B(128), C(128, NAN);
  for (auto& x : A) x = nd(rng);
  for (auto& x : B) x = nd(rng);
  std::vector<double> want(128, 0.0);
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 8; ++n)
      for (int k = 0; k < 16; ++k) want[r * 8 + n] += double(round16(A[r * 16 + k], BF16)) * round16(B[k * 8 + n], BF16);
  auto kern = &gemm_16x8x16<BF16>;
  for (int v = 0; v < kNumVariants; ++v) {
#ifndef GENFAST_EMULATE
    if (v == kBadAlign) continue;  // a misaligned ldmatrix is a sticky error on a GPU: emulation only
#endif
    std::fill(C.begin(), C.end(), NAN);
    GENFAST_LAUNCH(kern, 1, 32, 0, nullptr, A.data(), B.data(), C.data(), v);
    const int err = launch_error();
    char what[128];
    snprintf(what, sizeof what, "%s mma %s %s", BF16 ? "bf16" : "f16 ", kNames[v], v >= kBadSwapA ? "fails" : "");
    if (v == kBadAlign) {
      check(err != 0, what);
      continue;
    }
    const double e = err ? INFINITY : max_rel_err(C, want);
    check(v < kBadSwapA ? e < 1e-5 : !(e < 1e-2), what);
  }
}

template <bool BF16>
void run_chain(std::mt19937& rng) {
  std::normal_distribution<float> nd;
  Buf Q(512), K(512), V(256), O(256);
  for (auto& x : Q) x = nd(rng);
  for (auto& x : K) x = nd(rng);
  for (auto& x : V) x = nd(rng);
  std::vector<double> want(256, 0.0);
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float s = 0.0f;  // fp32 like the tensor core, then rounded to 16 bits like the repack
      for (int k = 0; k < 32; ++k) s += round16(Q[r * 32 + k], BF16) * round16(K[n * 32 + k], BF16);
      const double p = round16(s, BF16);
      for (int d = 0; d < 16; ++d) want[r * 16 + d] += p * round16(V[n * 16 + d], BF16);
    }
  auto kern = &chain<BF16>;
  for (int bad = 0; bad < 2; ++bad) {
    GENFAST_LAUNCH(kern, 1, 32, 0, nullptr, Q.data(), K.data(), V.data(), O.data(), bad);
    const int err = launch_error();
    const double e = err ? INFINITY : max_rel_err(O, want);
    char what[128];
    snprintf(what, sizeof what, "%s chain QK^T -> P -> PV (ldmatrix.x4, .x4.trans)%s", BF16 ? "bf16" : "f16 ",
             bad ? ": wrong repack half fails" : "");
    // the rounding of P may differ by one 16-bit ulp where fp32 sums differ in order
    check(bad ? !(e < 2e-2) : e < (BF16 ? 1e-2 : 2e-3), what);
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  run_gemm<true>(rng);
  run_gemm<false>(rng);
  run_chain<true>(rng);
  run_chain<false>(rng);
  printf(g_failures ? "%d FAILED\n" : "all mma/ldmatrix checks passed\n", g_failures);
  return g_failures ? 1 : 0;
}
