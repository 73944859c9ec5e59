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

// Gumbel(0, 1) sample from one raw word, in fp32: -log(-log(u)).
APD_HD float gumbel_from_bits(uint32_t x) {
  const float u = uniform_from_bits(x);
#if defined(__CUDA_ARCH__)
  return -logf(-logf(u));
#else
  return -std::log(-std::log(u));
#endif
}

// g(seed, step, p, v) of DESIGN.md §3, one entry at a time.
APD_HD float gumbel_noise(uint64_t seed, uint64_t step, int64_t pos, int64_t v) {
  const Philox4 r = noise_block(seed, step, pos, v);
  return gumbel_from_bits(r.x[v & 3]);
}

}  // namespace apd
