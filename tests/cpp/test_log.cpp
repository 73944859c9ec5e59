// apd::log_fp32 (philox.h), the log of the Gumbel noise: exhaustive accuracy
// over every u the generator can produce and every -log(u), against the fp64
// log; special values; and one pinned checksum of all 2^23 Gumbel values, so
// that a platform or compiler that changes a single noise bit fails here.
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "apd/common.h"
#include "apd/philox.h"

#include "expect.h"

// Distance in ulps of fp32 `got` from the exact value `want` (fp64 stands in
// for exact: its error is 2^-29 fp32 ulps), measured in units of the fp32 ulp
// at `want`.
static double ulp_error(float got, double want) {
  int e;
  std::frexp(want, &e);                      // |want| in [2^(e-1), 2^e)
  const double ulp = std::ldexp(1.0, e - 24);  // fp32 ulp in that binade
  return std::fabs(double(got) - want) / ulp;
}

static void test_exhaustive_u() {
  double worst_outer = 0.0, worst_inner = 0.0;
  for (uint32_t k = 0; k < (1u << 23); ++k) {
    const float u = apd::uniform_from_bits(k << 9);
    const float inner = -apd::log_fp32(u);
    worst_inner = std::fmax(worst_inner, ulp_error(-inner, std::log(double(u))));
    const float g = -apd::log_fp32(inner);
    worst_outer = std::fmax(worst_outer, ulp_error(-g, std::log(double(inner))));
  }
  std::printf("log_fp32 max error: %.4f ulp on u, %.4f ulp on -log(u)\n", worst_inner, worst_outer);
  EXPECT(worst_inner <= 1.0);
  EXPECT(worst_outer <= 1.0);
}

// Every fp32 in a few binades around 1 and at the ends of the range.
static void test_binades() {
  double worst = 0.0;
  const float starts[] = {0.25f, 0.5f, 1.0f, 2.0f, 1e-40f, 1e-30f, 1e30f};
  for (float x0 : starts) {
    uint32_t b = apd::float_to_bits(x0);
    for (uint32_t i = 0; i < (1u << 23); i += 7) {
      const float x = apd::bits_to_float(b + i);
      if (!(x > 0.0f) || std::isinf(x) || x == 1.0f) continue;
      worst = std::fmax(worst, ulp_error(apd::log_fp32(x), std::log(double(x))));
    }
  }
  std::printf("log_fp32 max error over sampled binades: %.4f ulp\n", worst);
  EXPECT(worst <= 1.0);
}

static void test_specials() {
  EXPECT(apd::log_fp32(1.0f) == 0.0f);
  EXPECT(apd::log_fp32(0.0f) == -INFINITY);
  EXPECT(std::isnan(apd::log_fp32(-1.0f)));
  EXPECT(std::isnan(apd::log_fp32(NAN)));
  EXPECT(apd::log_fp32(INFINITY) == INFINITY);
  EXPECT(apd::log_fp32(2.0f) == float(std::log(2.0)));
}

// FNV-1a over the bits of all 2^23 Gumbel values (word x -> g). The pinned
// value was produced by this implementation; any change of a noise bit (a
// different compiler, -march, libm, or a host/device split) changes it.
static constexpr uint64_t kGumbelChecksum = 0xe42c05eeb0750b1aull;

static void test_checksum() {
  uint64_t h = 1469598103934665603ull;
  for (uint32_t k = 0; k < (1u << 23); ++k) {
    const uint32_t bits = apd::float_to_bits(apd::gumbel_from_bits(k << 9));
    for (int j = 0; j < 4; ++j) {
      h ^= (bits >> (8 * j)) & 0xffu;
      h *= 1099511628211ull;
    }
  }
  std::printf("gumbel checksum 0x%016llx\n", (unsigned long long)h);
  EXPECT(h == kGumbelChecksum);
}

// FNV-1a over the Gumbel bits of the words (127 i) << 9, i < 65536: pinned
// here AND in tests/test_compat_official.py, which hashes apd_ext.reference's
// noise for the same words, so the Python reference and the C++ noise are
// the same bits.
static constexpr uint64_t kGumbelSubsetChecksum = 0x037b1468c28b92a7ull;

static void test_subset_checksum() {
  uint64_t h = 1469598103934665603ull;
  for (uint32_t i = 0; i < 65536u; ++i) {
    const uint32_t bits = apd::float_to_bits(apd::gumbel_from_bits((127u * i) << 9));
    for (int j = 0; j < 4; ++j) {
      h ^= (bits >> (8 * j)) & 0xffu;
      h *= 1099511628211ull;
    }
  }
  std::printf("gumbel subset checksum 0x%016llx\n", (unsigned long long)h);
  EXPECT(h == kGumbelSubsetChecksum);
}

int main() {
  test_subset_checksum();
  test_specials();
  test_exhaustive_u();
  test_binades();
  test_checksum();
  if (failures) std::fprintf(stderr, "%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
