// The CUDA flash attention (csrc/cuda/attention.cu, attention_bwd.cu) under the emulation with one
// OS thread per CUDA thread, built with -fsanitize=thread: a missing __syncthreads around the shared
// K/V/Q/dO tiles is a data race TSan reports. Also checks the results against a double-precision
// scalar reference (so the run is not vacuous). Run by tests/test_cuda_mma_emu.py; by hand:
//   g++ -std=c++17 -O1 -g -fsanitize=thread -DGENFAST_EMULATE -fno-strict-aliasing -pthread -Icsrc
//       csrc/emu/attention_tsan.cpp -x c++ csrc/cuda/attention.cu csrc/cuda/attention_bwd.cu -o /tmp/attention_tsan
//   /tmp/attention_tsan      (prints "attention: results ok"; TSan's exit code 66 on a report)
// Under cp.async's emulated twin the copies are synchronous, so a missing cp.async wait is NOT
// seen here (only a missing barrier is).
#include <cmath>
#include <cstdio>
#include <algorithm>
#include <random>
#include <vector>

#include "cuda/common.cuh"
#include "attention_flash.h"

namespace {

using genfast::AttentionBwdParams;
using genfast::AttentionParams;

float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

struct Case {
  int nq, nk, d;
  bool causal, masked;
};

bool run(const Case& c, std::mt19937& rng) {
  const int nq = c.nq, nk = c.nk, d = c.d;
  std::normal_distribution<float> nd;
  std::vector<__nv_bfloat16> q(nq * d), k(nk * d), v(nk * d), o(nq * d), dout(nq * d), dq(nq * d), dk(nk * d), dv(nk * d);
  std::vector<float> qf(nq * d), kf(nk * d), vf(nk * d), dof(nq * d), lse(nq), delta(nq);
  auto fill = [&](std::vector<__nv_bfloat16>& h, std::vector<float>& f) {
    for (size_t i = 0; i < h.size(); ++i) f[i] = bf16_round(nd(rng)), h[i] = __float2bfloat16_rn(f[i]);
  };
  fill(q, qf), fill(k, kf), fill(v, vf), fill(dout, dof);
  std::vector<uint8_t> mask(nk, 1);
  if (c.masked)
    for (int j = nk / 2; j < nk; ++j) mask[j] = 0;
  const float scale = 1.0f / std::sqrt(float(d));
  auto allowed = [&](int i, int j) { return mask[j] && (!c.causal || j <= i); };

  AttentionParams p{q.data(), k.data(), v.data(), o.data(), lse.data(), c.masked ? mask.data() : nullptr,
                    0, 0, d, 0, 0, d, 0, 0, d, 0, 0, d, 0, 1, 1, 1, nq, nk, d, scale, c.causal, genfast::kBFloat16};
  if (genfast::attention_fwd_cuda(p, nullptr)) return false;
  std::fill(delta.begin(), delta.end(), NAN);  // the delta kernel fills it from o
  AttentionBwdParams b{};
  b.q = q.data(), b.k = k.data(), b.v = v.data(), b.dout = dout.data(), b.lse = lse.data(), b.delta = delta.data();
  b.dq = dq.data(), b.dk = dk.data(), b.dv = dv.data(), b.mask = c.masked ? mask.data() : nullptr;
  b.o = o.data(), b.o_n = d;
  b.q_n = b.k_n = b.v_n = b.do_n = b.dq_n = b.dk_n = b.dv_n = d;
  b.mask_n = 1, b.B = 1, b.H = 1, b.Nq = nq, b.Nk = nk, b.D = d, b.scale = scale, b.causal = c.causal;
  b.dtype = genfast::kBFloat16;
  if (genfast::attention_bwd_cuda(b, nullptr)) return false;

  // double-precision reference: P, O, dV, dS, dQ, dK
  std::vector<double> P(nq * nk, 0.0), rO(nq * d, 0.0), rdQ(nq * d, 0.0), rdK(nk * d, 0.0), rdV(nk * d, 0.0);
  for (int i = 0; i < nq; ++i) {
    double mx = -INFINITY, sum = 0;
    std::vector<double> s(nk);
    for (int j = 0; j < nk; ++j) {
      s[j] = 0;
      for (int x = 0; x < d; ++x) s[j] += double(qf[i * d + x]) * kf[j * d + x];
      s[j] *= scale;
      if (allowed(i, j)) mx = std::fmax(mx, s[j]);
    }
    for (int j = 0; j < nk; ++j) sum += allowed(i, j) ? std::exp(s[j] - mx) : 0.0;
    for (int j = 0; j < nk; ++j) P[i * nk + j] = allowed(i, j) ? std::exp(s[j] - mx) / sum : 0.0;
    double dl = 0;
    for (int j = 0; j < nk; ++j)
      for (int x = 0; x < d; ++x) rO[i * d + x] += P[i * nk + j] * vf[j * d + x];
    for (int x = 0; x < d; ++x) dl += rO[i * d + x] * dof[i * d + x];
    for (int j = 0; j < nk; ++j) {
      double dp = 0;
      for (int x = 0; x < d; ++x) dp += double(dof[i * d + x]) * vf[j * d + x];
      const double ds = P[i * nk + j] * (dp - dl);
      for (int x = 0; x < d; ++x) {
        rdV[j * d + x] += P[i * nk + j] * dof[i * d + x];
        rdQ[i * d + x] += scale * ds * kf[j * d + x];
        rdK[j * d + x] += scale * ds * qf[i * d + x];
      }
    }
  }
  auto close = [](const std::vector<__nv_bfloat16>& got, const std::vector<double>& want, const char* name) {
    double err = 0, mag = 1e-3;
    for (size_t i = 0; i < got.size(); ++i)
      err = std::fmax(err, std::fabs(__bfloat162float(got[i]) - want[i])), mag = std::fmax(mag, std::fabs(want[i]));
    const bool ok = err <= 0.03 * mag;  // bf16 P / dS roundings; a wrong tile is off by O(mag)
    if (!ok) printf("  %s: max error %.3g of max magnitude %.3g\n", name, err, mag);
    return ok;
  };
  return close(o, rO, "o") & close(dq, rdQ, "dq") & close(dk, rdK, "dk") & close(dv, rdV, "dv");
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  // two query and two key tiles each (tails included), plain, causal, masked + causal
  const Case cases[] = {{70, 70, 32, false, false}, {70, 70, 32, true, false}, {40, 70, 32, true, true}};
  bool ok = true;
  for (const Case& c : cases) ok = run(c, rng) && ok;
  printf("attention: results %s\n", ok ? "ok" : "wrong");
  return ok ? 0 : 1;
}
