// ThreadSanitizer check of csrc/cuda/kl.cu (DESIGN.md §8): the forward (tile reductions through
// __shared__ + the row-sum kernel) and the backward, run with one OS thread per CUDA thread, must
// be race-free and right. Run by tests/test_kl.py; by hand:
//   g++ -std=c++17 -O1 -g -fsanitize=thread -DGENFAST_EMULATE -fno-strict-aliasing -pthread -Icsrc
//       csrc/emu/kl_tsan_check.cpp -x c++ csrc/cuda/kl.cu -o /tmp/kl_tsan && /tmp/kl_tsan
// Prints "kl: results ok|wrong"; exits 0 when right (TSan's exit code replaces that on a report).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda/common.cuh"
#include "kl.h"
#include "philox.h"

int main() {
  genfast_emu::set_runner(genfast_emu::Runner::kThreads);
  // 2 rows of 1030 columns (row 1 starts mid Philox group; 2 tiles a row, the second mostly empty)
  const int64_t rows = 2, cols = 1030, n = rows * cols;
  std::vector<float> mu(n), lv(n), z(n, -1.f), dz(n), dmu(n), dlv(n), kl(rows), gk = {0.5f, -2.0f};
  std::vector<int64_t> seed = {12345, 6};
  for (int64_t i = 0; i < n; ++i) {
    mu[i] = std::sin(0.01f * i);
    lv[i] = 2.0f * std::cos(0.013f * i);
    dz[i] = std::cos(0.007f * i);
  }
  const int64_t tiles = genfast::kl_cuda_row_blocks(cols);
  std::vector<float> partial(rows * tiles);
  genfast::KLCommon in;
  std::memset(&in, 0, sizeof in);
  in.mu = mu.data(), in.logvar = lv.data(), in.seed = seed.data();
  in.rows = rows, in.cols = cols, in.mu_rs = in.lv_rs = cols, in.mu_cs = in.lv_cs = 1;
  in.clamp_lo = -1.5f, in.clamp_hi = 1.5f, in.clamp = 1, in.dtype = genfast::kFloat32;
  genfast::KLForwardParams f;
  std::memset(&f, 0, sizeof f);
  f.in = in, f.z = z.data(), f.z_rs = cols, f.z_cs = 1, f.kl = kl.data(), f.kl_rs = 1, f.kl_per_row = 1;
  f.partial = partial.data(), f.row_blocks = tiles;
  genfast::KLBackwardParams b;
  std::memset(&b, 0, sizeof b);
  b.in = in, b.dz = dz.data(), b.dz_rs = cols, b.dz_cs = 1, b.gkl = gk.data(), b.gkl_rs = 1, b.gkl_cs = 0;
  b.dmu = dmu.data(), b.dlogvar = dlv.data(), b.dmu_rs = b.dlv_rs = cols, b.dmu_cs = b.dlv_cs = 1;
  bool ok = genfast::kl_forward_cuda(f, nullptr) == 0 && genfast::kl_backward_cuda(b, nullptr) == 0;
  for (int64_t r = 0; r < rows && ok; ++r) {
    double sum = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t g = r * cols + c;
      float e[4];
      genfast::philox::normals4(static_cast<uint64_t>(g / 4), 12345, 6, e[0], e[1], e[2], e[3]);
      const float l = std::fmin(std::fmax(lv[g], -1.5f), 1.5f), s = std::exp(0.5f * l);
      const float zw = mu[g] + e[g % 4] * s, klw = 0.5f * (mu[g] * mu[g] + s * s - 1.0f - l);
      const bool pass = lv[g] >= -1.5f && lv[g] <= 1.5f;
      const float dmw = dz[g] + gk[r] * mu[g], dlw = pass ? 0.5f * (dz[g] * e[g % 4] * s + gk[r] * (s * s - 1.0f)) : 0.f;
      ok = ok && std::fabs(z[g] - zw) < 1e-4f && std::fabs(dmu[g] - dmw) < 1e-4f && std::fabs(dlv[g] - dlw) < 1e-4f;
      sum += klw;
    }
    ok = ok && std::fabs(kl[r] - sum) < 1e-3 * (1 + std::fabs(sum));
  }
  printf("kl: results %s\n", ok ? "ok" : "wrong");
  return ok ? 0 : 1;
}
