"""csrc/cuda/vq.cu under ThreadSanitizer (one OS thread per CUDA thread, DESIGN.md §8): a missing
__syncthreads around the shared tiles or the code norms is a data race TSan reports (an early
version of the kernel had one on the norms; the fiber runner's tests caught it as wrong answers)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CXX = os.environ.get("CXX", "g++")
TSAN_ENV = {"TSAN_OPTIONS": "halt_on_error=0 exitcode=66", "GENFAST_EMU_RUNNER": "threads"}

DRIVER = r"""
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/common.cuh"
#include "vq.h"

// n rows near codes of a [k, d] codebook (3 code tiles, 2 d slices, 2 row blocks): the nearest
// code is unambiguous, so the kernel must return exactly the planted one.
int main() {
  const int64_t n = 70, k = 140, d = 20;
  std::mt19937 g(0);
  std::normal_distribution<float> nd;
  std::vector<float> c(k * d), z(n * d);
  std::vector<int64_t> planted(n), idx(n, -1), counts(k, -1);
  std::vector<float> dist(n);
  for (auto& v : c) v = nd(g);
  for (int64_t r = 0; r < n; ++r) {
    planted[r] = (r * 37) % k;
    for (int64_t j = 0; j < d; ++j) z[r * d + j] = c[planted[r] * d + j] + 0.01f * nd(g);
  }
  genfast::VqParams p{};
  p.z = z.data(); p.n = n; p.d = d; p.z_inner = n; p.z_os = 0; p.z_rs = d; p.z_cs = 1;
  p.z_dtype = genfast::kFloat32; p.codebook = c.data(); p.k = k; p.c_rs = d; p.c_cs = 1;
  p.c_dtype = genfast::kFloat32; p.metric = genfast::kVqL2; p.precision = genfast::kVqFp32;
  p.indices = idx.data(); p.distance = dist.data();
  int err = genfast::vq_nearest_cuda(p, nullptr);
  genfast::VqCountsParams q{idx.data(), n, 1, k, counts.data()};
  err |= genfast::vq_counts_cuda(q, nullptr);
  bool ok = err == 0;
  std::vector<int64_t> want(k, 0);
  for (int64_t r = 0; r < n; ++r) {
    ok = ok && idx[r] == planted[r] && dist[r] < 0.01f;
    ++want[planted[r]];
  }
  for (int64_t i = 0; i < k; ++i) ok = ok && counts[i] == want[i];
  std::printf("vq: results %s\n", ok ? "ok" : "wrong");
  return ok ? 0 : 1;
}
"""


def test_vq_kernels_are_race_free_under_tsan(tmp_path):
    if shutil.which(CXX) is None:
        pytest.skip(f"{CXX} not found")
    probe = tmp_path / "probe.cpp"
    probe.write_text("#include <thread>\nint x;\nint main(){std::thread t([]{x=1;}); t.join(); return x-1;}\n")
    r = subprocess.run([CXX, "-fsanitize=thread", "-pthread", str(probe), "-o", str(tmp_path / "probe")],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"{CXX} cannot build with -fsanitize=thread")
    launcher = None
    for prefix in ([], ["setarch", os.uname().machine, "-R"]):
        if prefix and not shutil.which("setarch"):
            continue
        if subprocess.run(prefix + [str(tmp_path / "probe")], capture_output=True).returncode == 0:
            launcher = prefix
            break
    if launcher is None:
        pytest.skip("ThreadSanitizer binaries do not run here")
    src = tmp_path / "vq_driver.cpp"
    src.write_text(DRIVER)
    exe = tmp_path / "vq_tsan"
    flags = ["-std=c++17", "-DGENFAST_EMULATE", "-fno-strict-aliasing", "-pthread", f"-I{CSRC}", "-Wno-unknown-pragmas",
             "-O1", "-g", "-fsanitize=thread"]
    r = subprocess.run([CXX, *flags, str(src), "-x", "c++", str(CSRC / "cuda" / "vq.cu"), "-o", str(exe)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(launcher + [str(exe)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, **TSAN_ENV})
    assert "ThreadSanitizer" not in r.stderr, r.stderr[-4000:]
    assert r.returncode == 0 and "vq: results ok" in r.stdout, (r.stdout, r.stderr[-2000:])
