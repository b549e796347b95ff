// exp(x) for x <= 0, shared by the CPU attention kernels (csrc/cpu/attention*.cpp).
#pragma once
#include <cstdint>
#include <cstring>

namespace genfast {
// exp(x) for x <= 0 (every argument here is s - max or s - lse): 2^n * e^r, |r| <= ln2 / 2, a
// degree-6 polynomial for e^r (relative error ~2e-7); x < -87 flushes to 0 (and -inf gives 0).
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  // round to nearest by the 1.5 * 2^23 trick: vectorises without -ffast-math (roundf does not)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x <= -87.0f ? 0.0f : p * two_n;
}
}  // namespace genfast
