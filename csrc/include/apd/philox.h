// Philox4x32-10 counter-based generator and the Gumbel noise of DESIGN.md §3.
// One definition for host and device, so CPU and CUDA draw bit-identical noise.
#pragma once
#include <cmath>
#include <cstdint>

#include "apd/common.h"

namespace apd {

struct Philox4 { uint32_t x[4]; };

namespace detail {
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

APD_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = uint64_t(a) * uint64_t(b);
  *hi = uint32_t(p >> 32);
  *lo = uint32_t(p);
}
}  // namespace detail

// Random123 philox4x32 with 10 rounds; the key is bumped after each round.
APD_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    detail::mulhilo32(detail::kPhiloxM0, ctr.x[0], &hi0, &lo0);
    detail::mulhilo32(detail::kPhiloxM1, ctr.x[2], &hi1, &lo1);
    ctr = Philox4{{hi1 ^ ctr.x[1] ^ k0, lo1, hi0 ^ ctr.x[3] ^ k1, lo0}};
    k0 += detail::kPhiloxW0;
    k1 += detail::kPhiloxW1;
  }
  return ctr;
}

// The four raw words that serve vocab entries [4*(v/4), 4*(v/4)+4) at one
// (seed, step, position). Kernels that walk a row call this once per 4 entries.
APD_HD Philox4 noise_block(uint64_t seed, uint64_t step, int64_t pos, int64_t v) {
  Philox4 ctr{{uint32_t(uint64_t(v) >> 2), uint32_t(pos), uint32_t(step), uint32_t(step >> 32)}};
  return philox4x32_10(ctr, uint32_t(seed), uint32_t(seed >> 32));
}

// u = ((x >> 9) + 0.5) * 2^-23: exact in fp32 and strictly inside (0, 1).
APD_HD float uniform_from_bits(uint32_t x) {
  return (float(x >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

// fp32 fused multiply-add, one rounding on host and device alike (the host's
// fmaf is exact with or without hardware FMA: glibc falls back to software).
APD_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fmaf(a, b, c);
#endif
}

// Natural log in fp32 written once for host and device, so that the Gumbel
// noise does not depend on glibc's logf, its version, or nvcc's logf (they
// differ by one ulp on ~14% of the 2^23 u values). Every step is an exact
// bit operation, an exact subtraction or an explicit FMA, so the result is
// the same bits on any IEEE machine and under any -march/-ffp-contract.
// Error <= 1 ulp against the fp64 log (tests/cpp/test_log.cpp checks every u
// and every -log(u) exhaustively).
// x = 2^e * m with m in [2/3, 4/3]; log x = e ln2 + log1p(f), f = m - 1 in
// [-1/3, 1/3]; log1p(f) = f + f^2 (f P(f) - 1/2), P a degree-8 polynomial
// fitted (weighted least squares to near-minimax, relative error 2e-9) to
// (log1p(f) - f + f^2/2) / f^3. ln2 is split so that e * kLn2Hi is exact.
APD_HD float log_fp32(float x) {
  if (!(x > 0.0f) || x == INFINITY) {  // 0 -> -inf, < 0 or NaN -> NaN, inf -> inf
    return x == 0.0f ? -INFINITY : (x == INFINITY ? INFINITY : NAN);
  }
  int e_sub = 0;
  if (x < 1.17549435e-38f) {  // subnormal: scale into the normal range (exact)
    x *= 8388608.0f;
    e_sub = -23;
  }
  const uint32_t bits = float_to_bits(x);
  int e = int(bits >> 23) - 127 + e_sub;
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  if (m > 1.33333337f) {  // into [2/3, 4/3]: exact halving
    m *= 0.5f;
    e += 1;
  }
  const float f = m - 1.0f;  // exact (Sterbenz)
  float p = 0.117182411f;                 //  0x1.dffaaap-4
  p = fma_rn(p, f, -0.128723681f);        // -0x1.07a048p-3
  p = fma_rn(p, f, 0.108321540f);         //  0x1.bbaf5ep-4
  p = fma_rn(p, f, -0.121898688f);        // -0x1.f34c0ap-4
  p = fma_rn(p, f, 0.142972738f);         //  0x1.24cee4p-3
  p = fma_rn(p, f, -0.166799799f);        // -0x1.559b22p-3
  p = fma_rn(p, f, 0.199998543f);         //  0x1.9998d6p-3
  p = fma_rn(p, f, -0.249998122f);        // -0x1.ffff04p-3
  p = fma_rn(p, f, 0.333333343f);         //  0x1.555556p-2
  const float q = fma_rn(p, f, -0.5f);    // f P(f) - 1/2
  const float s = f * f;
  constexpr float kLn2Hi = 0.693145752f;     // 0x1.62e400p-1: 12 significant bits
  constexpr float kLn2Lo = 1.42860677e-06f;  // 0x1.7f7d1cp-20: ln2 - kLn2Hi
  const float ef = float(e);
  const float r = fma_rn(s, q, fma_rn(ef, kLn2Lo, f));  // log1p(f) + e kLn2Lo
  return fma_rn(ef, kLn2Hi, r);                         // e kLn2Hi is exact; one rounding
}

// Gumbel(0, 1) sample from one raw word, in fp32: -log(-log(u)), both logs
// log_fp32 (bit-identical on the CPU and on CUDA).
APD_HD float gumbel_from_bits(uint32_t x) {
  const float u = uniform_from_bits(x);
  return -log_fp32(-log_fp32(u));
}

// g(seed, step, p, v) of DESIGN.md §3, one entry at a time.
APD_HD float gumbel_noise(uint64_t seed, uint64_t step, int64_t pos, int64_t v) {
  const Philox4 r = noise_block(seed, step, pos, v);
  return gumbel_from_bits(r.x[v & 3]);
}

}  // namespace apd
