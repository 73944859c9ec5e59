// Known-answer tests for the torch-free host code, run by ctest.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "apd/common.h"
#include "apd/philox.h"

#include "expect.h"

static void test_philox_known_answers() {
  // Random123 kat_vectors for philox4x32_10.
  apd::Philox4 r = apd::philox4x32_10(apd::Philox4{{0, 0, 0, 0}}, 0, 0);
  EXPECT(r.x[0] == 0x6627e8d5u && r.x[1] == 0xe169c58du && r.x[2] == 0xbc57ac4cu && r.x[3] == 0x9b00dbd8u);
  r = apd::philox4x32_10(apd::Philox4{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
                         0xa4093822u, 0x299f31d0u);
  EXPECT(r.x[0] == 0xd16cfe09u && r.x[1] == 0x94fdccebu && r.x[2] == 0x5001e420u && r.x[3] == 0x24126ea1u);
  r = apd::philox4x32_10(apd::Philox4{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}},
                         0xffffffffu, 0xffffffffu);
  EXPECT(r.x[0] == 0x408f276du && r.x[1] == 0x41c83b0eu && r.x[2] == 0xa20bc7c6u && r.x[3] == 0x6d5451fdu);
}

static void test_uniform_range() {
  EXPECT(apd::uniform_from_bits(0u) > 0.0f);
  EXPECT(apd::uniform_from_bits(0xffffffffu) < 1.0f);
  EXPECT(apd::uniform_from_bits(0u) == 0.5f * 1.1920928955078125e-07f);
  // Gumbel of the extreme words stays finite.
  EXPECT(std::isfinite(apd::gumbel_from_bits(0u)));
  EXPECT(std::isfinite(apd::gumbel_from_bits(0xffffffffu)));
}

static void test_noise_layout() {
  // Entry v uses word v % 4 of counter (v / 4, pos, step_lo, step_hi) under key (seed_lo, seed_hi).
  const uint64_t seed = 0x0123456789abcdefull, step = 0x100000002ull;
  const int64_t pos = 77, v = 4 * 1000 + 3;
  apd::Philox4 ctr{{1000u, 77u, 2u, 1u}};
  apd::Philox4 r = apd::philox4x32_10(ctr, 0x89abcdefu, 0x01234567u);
  EXPECT(apd::gumbel_noise(seed, step, pos, v) == apd::gumbel_from_bits(r.x[3]));
}

static void test_half_conversions() {
  EXPECT(apd::to_float(apd::bf16_t{0x3f80}) == 1.0f);
  EXPECT(apd::to_float(apd::fp16_t{0x3c00}) == 1.0f);
  EXPECT(apd::to_float(apd::fp16_t{0x0001}) == 5.9604644775390625e-08f);
  EXPECT(std::isinf(apd::to_float(apd::fp16_t{0x7c00})));
  EXPECT(apd::to_fp16(1.0f).bits == 0x3c00);
  EXPECT(apd::to_fp16(65520.0f).bits == 0x7c00);
  EXPECT(apd::to_fp16(5.9604644775390625e-08f).bits == 0x0001);
  EXPECT(apd::to_bf16(1.0f).bits == 0x3f80);
  // Every fp16 finite value round-trips.
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    if (((h >> 10) & 0x1f) == 0x1f) continue;
    EXPECT(apd::to_fp16(apd::to_float(apd::fp16_t{uint16_t(h)})).bits == h);
  }
}

int main() {
  test_philox_known_answers();
  test_uniform_range();
  test_noise_layout();
  test_half_conversions();
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  std::printf("apd host tests: all passed\n");
  return 0;
}
