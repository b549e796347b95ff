// ThreadSanitizer run of csrc/cuda/modulate.cu under the CUDA emulation (DESIGN.md §8), one OS
// thread per CUDA thread: a missing __syncthreads in the block reductions, or a thread reading a
// partial-sum column another thread wrote, is a data race TSan reports. Covers the register-cached
// rows (C = 200) and the wide-row path (C = 1600), per-sample sums over several chunks, and the
// gated residual. Built and run by tests/test_modulate.py::test_cuda_kernels_under_tsan; by hand:
//   g++ -std=c++17 -O1 -g -fsanitize=thread -DGENFAST_EMULATE -fno-strict-aliasing -pthread -Icsrc
//       tests/tsan_modulate.cpp -x c++ csrc/cuda/modulate.cu -o /tmp/tsan_modulate
//   GENFAST_EMU_RUNNER=threads /tmp/tsan_modulate
#include <cstdio>
#include <vector>
#include <cmath>
#include "modulate.h"
using namespace genfast;
int main() {
  int bad = 0;
  for (int64_t C : {200, 1600}) {
    const int64_t B = 2, N = 5;
    std::vector<float> x(B * N * C), out(B * N * C), sh(B * C, 0.1f), sc(B * C, 0.2f), mean(B * N), rstd(B * N);
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * i);
    ModulateParams p{out.data(), x.data(), sh.data(), sc.data(), mean.data(), rstd.data(), B, N, C,
                     N * C, C, N * C, C, C, 0, C, 0, 1e-6f, 0, kFloat32};
    bad |= modulate_fwd_cuda(p, nullptr);
    std::vector<float> g(x.size(), 1.f), dx(x.size()), dsh(B * C), dsc(B * C), part(B * 2 * 2 * C);
    ModulateBwdParams q{dx.data(), dsh.data(), dsc.data(), part.data(), nullptr, g.data(), x.data(), sc.data(), mean.data(),
                        rstd.data(), B, N, C, N * C, C, N * C, C, N * C, C, C, 0, 3, 1, 0, kFloat32};
    bad |= modulate_bwd_cuda(q, nullptr);
    // dshift must be N for every column (g = 1)
    for (float v : dsh) if (std::fabs(v - N) > 1e-4) { bad = 1; break; }
    std::vector<float> dy(x.size()), dg(B * C), gp(B * 2 * C);
    GatedResidualParams gr{out.data(), x.data(), sc.data(), x.data(), B, N, C, N * C, C, N * C, C, C, 0, N * C, C, kFloat32};
    bad |= gated_residual_fwd_cuda(gr, nullptr);
    GatedResidualBwdParams gb{dy.data(), dg.data(), gp.data(), nullptr, nullptr, g.data(), sc.data(), x.data(), B, N, C, N * C, C, C, 0, N * C, C, 3, 1, kFloat32};
    bad |= gated_residual_bwd_cuda(gb, nullptr);
  }
  printf("modulate tsan run: %s\n", bad ? "errors" : "ok");
  return bad;
}
