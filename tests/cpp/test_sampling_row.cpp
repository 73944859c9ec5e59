// Host tests of the shared per-row sampling math (apd/sampling_row.h), run by ctest.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "apd/sampling_params.h"
#include "apd/sampling_row.h"

#include "expect.h"

static const float kInf = std::numeric_limits<float>::infinity();
static const float kNaN = std::numeric_limits<float>::quiet_NaN();

static void test_order_key() {
  // Monotone over a sorted list of floats spanning signs, subnormals and infinities.
  const float xs[] = {-kInf, -3.0e38f, -2.5f, -1.0f, -1e-40f, 0.0f, 1e-45f, 1e-40f, 0.5f, 1.0f, 7.0f, 3.0e38f, kInf};
  const int n = sizeof(xs) / sizeof(xs[0]);
  for (int i = 0; i + 1 < n; ++i) {
    EXPECT(apd::order_key(xs[i]) < apd::order_key(xs[i + 1]));
    EXPECT(apd::desc_key(xs[i]) > apd::desc_key(xs[i + 1]));
  }
  for (int i = 0; i < n; ++i) {
    EXPECT(apd::key_to_float(apd::order_key(xs[i])) == xs[i]);
    EXPECT(apd::desc_key_to_float(apd::desc_key(xs[i])) == xs[i]);
  }
  // -0 and +0 are equal values, so they tie.
  EXPECT(apd::order_key(-0.0f) == apd::order_key(0.0f));
}

static void test_scores() {
  // True division, not a multiply by the reciprocal: 1/3 rounds, so these differ.
  const float l = 0.7f, tau = 0.3f;
  EXPECT(apd::temper(l, tau) == l / tau);
  EXPECT(apd::official_score(l, tau) == (l / tau) / tau);
  EXPECT(apd::official_score(l, tau) == apd::temper(apd::temper(l, tau), tau));
  // Perturbed score = z + Gumbel noise of (seed, step, pos, v), block form agrees.
  const uint64_t seed = 1234567890123ull, step = 5;
  const int64_t pos = 42, v = 4 * 17 + 2;
  const apd::Philox4 blk = apd::noise_block(seed, step, pos, v);
  EXPECT(apd::perturbed_score(1.5f, seed, step, pos, v) == 1.5f + apd::gumbel_noise(seed, step, pos, v));
  EXPECT(apd::perturbed_score(1.5f, blk, v) == apd::perturbed_score(1.5f, seed, step, pos, v));
  // The skip bound holds for the extreme uniforms.
  EXPECT(apd::gumbel_from_bits(0xffffffffu) < apd::kGumbelMax);
  EXPECT(apd::gumbel_from_bits(0u) < apd::kGumbelMax);
  // Lowest index wins on equal scores.
  EXPECT(apd::better(2.0f, 9, 1.0f, 0));
  EXPECT(apd::better(1.0f, 3, 1.0f, 4));
  EXPECT(!apd::better(1.0f, 4, 1.0f, 3));
  EXPECT(!apd::better(1.0f, 0, 2.0f, 9));
}

static void test_bad_rows() {
  EXPECT(!apd::row_is_bad(0.0f));
  EXPECT(!apd::row_is_bad(-3.0e38f));
  EXPECT(apd::row_is_bad(kNaN));
  EXPECT(apd::row_is_bad(kInf));
  EXPECT(apd::row_is_bad(-kInf));
  // nan_max propagates NaN from either side; plain max does not.
  EXPECT(std::isnan(apd::nan_max(1.0f, kNaN)));
  EXPECT(std::isnan(apd::nan_max(kNaN, 1.0f)));
  EXPECT(apd::nan_max(1.0f, 2.0f) == 2.0f);
}

static void test_lse() {
  const float xs[] = {0.5f, -1.0f, 3.0f, -kInf, 2.0f, 0.0f};
  apd::LseAcc acc, left, right;
  double mx = -INFINITY, s = 0.0;
  for (float x : xs) mx = std::fmax(mx, double(x));
  for (int i = 0; i < 6; ++i) {
    apd::lse_push(acc, xs[i]);
    apd::lse_push(i < 3 ? left : right, xs[i]);
    s += std::exp(double(xs[i]) - mx);
  }
  const double want = mx + std::log(s);
  EXPECT(std::fabs(apd::lse_value(acc) - want) < 1e-6);
  EXPECT(std::fabs(apd::lse_value(apd::lse_merge(left, right)) - want) < 1e-6);
  apd::LseAcc all_neg_inf;
  apd::lse_push(all_neg_inf, -kInf);
  EXPECT(apd::lse_value(all_neg_inf) == -kInf);
  apd::LseAcc with_nan;
  apd::lse_push(with_nan, 1.0f);
  apd::lse_push(with_nan, kNaN);
  EXPECT(std::isnan(apd::lse_value(with_nan)));
}

static void test_mixture() {
  const apd::MixtureRow r = apd::make_mixture_row(0.7f, 2.5f, -1.25f);
  const float d = 1.0f, a = -0.5f;
  EXPECT(apd::mixture_coupled(d, a, r) == 0.7f * (d - 2.5f) + (1.0f - 0.7f) * (a + 1.25f));
  // R = 1 / R = 0 return the row itself (shift invariance), so R = 1 redraws the draft.
  EXPECT(apd::mixture_coupled(d, a, apd::make_mixture_row(1.0f, 2.5f, -1.25f)) == d);
  EXPECT(apd::mixture_coupled(d, a, apd::make_mixture_row(0.0f, 2.5f, -1.25f)) == a);
  EXPECT(apd::mixture_argmax(d, a, 0.7f, 1.0f - 0.7f) == 0.7f * d + 0.3f * a);
}

static void test_kept_set() {
  EXPECT(apd::effective_top_k(0, 10) == 10);
  EXPECT(apd::effective_top_k(-3, 10) == 10);
  EXPECT(apd::effective_top_k(3, 10) == 3);
  EXPECT(apd::effective_top_k(10, 10) == 10);
  EXPECT(!apd::filter_active(0, 1.0f, 10));
  EXPECT(apd::filter_active(3, 1.0f, 10));
  EXPECT(apd::filter_active(0, 0.9f, 10));
  const apd::KeptSet k{apd::desc_key(2.0f), 5};
  EXPECT(apd::in_kept_set(apd::desc_key(3.0f), 9, k));    // strictly above the threshold
  EXPECT(apd::in_kept_set(apd::desc_key(2.0f), 5, k));    // tie, index within the cut
  EXPECT(!apd::in_kept_set(apd::desc_key(2.0f), 6, k));   // tie past the cut
  EXPECT(!apd::in_kept_set(apd::desc_key(1.0f), 0, k));   // below
  EXPECT(apd::in_kept_set(apd::desc_key(-kInf), 7, apd::keep_all()));
  // Top-p inside ties: before 0.5, each 0.1, target 0.75 -> j = 3 (0.8 >= 0.75).
  EXPECT(apd::ties_to_reach(0.5, 0.1, 10, 0.75) == 3);
  EXPECT(apd::ties_to_reach(0.5, 0.1, 10, 0.4) == 1);
  EXPECT(apd::ties_to_reach(0.5, 0.1, 2, 5.0) == 2);
  EXPECT(apd::ties_to_reach(0.5, 0.25, 4, 1.0) == 2);  // exact hit counts as reached
}

static void test_accept_prefix() {
  const int64_t eos[] = {99};
  const int64_t d[] = {5, 6, 7, 8, 9};
  int64_t t[] = {-1, 6, 7, 1, 9};
  // a_0 = 1 even when target_0 is -1; stops at the first mismatch.
  EXPECT(apd::accept_prefix_row(d, t, 5, 100, eos, 1) == 3);
  EXPECT(apd::accept_prefix_row(d, t, 2, 100, eos, 1) == 2);  // valid_len cap
  EXPECT(apd::accept_prefix_row(d, t, 0, 100, eos, 1) == 0);
  EXPECT(apd::accept_prefix_row(d, t, 1, 100, eos, 1) == 1);
  EXPECT(apd::accept_prefix_row(d, t, 5, 7, eos, 1) == 2);    // draft 7 >= V never matches
  t[3] = 8;
  EXPECT(apd::accept_prefix_row(d, t, 5, INT64_MAX, eos, 0) == 5);
  // EOS cut just after the first accepted EOS (position 0 included).
  const int64_t eos2[] = {3, 7};
  EXPECT(apd::accept_prefix_row(d, t, 5, INT64_MAX, eos2, 2) == 3);
  const int64_t eos3[] = {5};
  EXPECT(apd::accept_prefix_row(d, t, 5, INT64_MAX, eos3, 1) == 1);
  // An EOS beyond the accepted prefix does not cut.
  const int64_t d2[] = {1, 2, 3};
  const int64_t t2[] = {1, 4, 3};
  const int64_t eos4[] = {3};
  EXPECT(apd::accept_prefix_row(d2, t2, 3, INT64_MAX, eos4, 1) == 1);
  // Negative ids never match, even when equal.
  const int64_t d3[] = {0, -1};
  const int64_t t3[] = {0, -1};
  EXPECT(apd::accept_prefix_row(d3, t3, 2, INT64_MAX, eos, 0) == 1);
  // Negative stop ids are the padding of per-row [B, E] lists: never an EOS,
  // not even for a bad row's draft -1 (which would otherwise cut at 1).
  const int64_t d4[] = {-1, 2, 3};
  const int64_t t4[] = {0, 2, 3};
  const int64_t pad[] = {-1, -1};
  EXPECT(apd::accept_prefix_row(d4, t4, 3, INT64_MAX, pad, 2) == 3);
  const int64_t pad3[] = {-1, 2};
  EXPECT(apd::accept_prefix_row(d4, t4, 3, INT64_MAX, pad3, 2) == 2);
}

// Per-row settings: nullptr keeps the scalar, a vector overrides it for its row.
static void test_row_settings() {
  const apd::SamplerConfig base{0.7f, 5, 0.9f, false, apd::DType::kBFloat16};
  apd::RowSettings none;
  const apd::SamplerConfig same = apd::row_config(base, none, 3);
  EXPECT(same.temperature == 0.7f && same.top_k == 5 && same.top_p == 0.9f && !same.official);
  const float tau[] = {0.0f, 1.5f};
  const int64_t off[] = {0, 1};
  apd::RowSettings some;
  some.temperature = tau;
  some.official = off;
  const apd::SamplerConfig r1 = apd::row_config(base, some, 1);
  EXPECT(r1.temperature == 1.5f && r1.top_k == 5 && r1.top_p == 0.9f && r1.official);
  EXPECT(r1.dtype == apd::DType::kBFloat16);
  EXPECT(apd::row_config(base, some, 0).temperature == 0.0f && !apd::row_config(base, some, 0).official);
  // Mixture: the per-row R (fp64) is the scalar R; 1 - R in fp64 under
  // compat="official", in fp32 otherwise.
  apd::MixtureAcceptParams p{};
  p.R = 0.3;
  p.acceptance = apd::Acceptance::kCoupled;
  const apd::MixtureSettings m0 = apd::row_mixture(p, base, 0);
  EXPECT(m0.R == 0.3f && m0.one_minus_R == 1.0f - 0.3f && m0.acceptance == apd::Acceptance::kCoupled);
  apd::SamplerConfig off_cfg = base;
  off_cfg.official = true;
  EXPECT(apd::row_mixture(p, off_cfg, 0).one_minus_R == float(1.0 - 0.3));
  const double R[] = {0.3, 0.5};
  const int64_t acc[] = {1, 0};
  p.per_row.R = R;
  p.per_row.acceptance = acc;
  EXPECT(apd::row_mixture(p, off_cfg, 0).one_minus_R == float(1.0 - 0.3));
  EXPECT(apd::row_mixture(p, base, 0).acceptance == apd::Acceptance::kArgmax);
  EXPECT(apd::row_mixture(p, base, 1).R == 0.5f && apd::row_mixture(p, base, 1).acceptance == apd::Acceptance::kCoupled);
}

// compat="official" helpers on the examples (SEMANTICS.md).
static void test_official() {
  using apd::DType;
  // bf16: 0.5 * 1.0078125 + 0.5 * 1 = 1.00390625 rounds (to even) to 1.0: a tie with id 0.
  EXPECT(apd::official_target(1.0078125f, 1.0f, 0.5f, 0.5f, DType::kBFloat16) == 1.0f);
  EXPECT(apd::official_target(1.0f, 1.0f, 0.5f, 0.5f, DType::kBFloat16) == 1.0f);
  EXPECT(apd::official_target(1.0078125f, 1.0f, 0.5f, 0.5f, DType::kFloat32) == 1.00390625f);
  // bf16 l / tau: 12.0625 / 0.2 = 60.3125 in fp32, 60.25 in bf16.
  EXPECT(apd::official_temper(12.0625f, 0.2f, DType::kBFloat16) == 60.25f);
  EXPECT(apd::official_temper(12.0625f, 0.2f, DType::kFloat32) == 12.0625f / 0.2f);
  // top_p 0.95 is 0.94921875 in bf16 (odd last bit): C rounds above it from
  // the midpoint 0.951171875 on (ties to even go up).
  EXPECT(apd::official_top_p_threshold(0.95f, DType::kBFloat16) == 0.951171875);
  EXPECT(apd::round_to(DType::kBFloat16, 0.951171875f) > apd::round_to(DType::kBFloat16, 0.95f));
  EXPECT(apd::round_to(DType::kBFloat16, std::nextafter(0.951171875f, 0.0f)) ==
         apd::round_to(DType::kBFloat16, 0.95f));
  // An even rounded top_p: the midpoint itself still rounds down, so one more.
  const double t = apd::official_top_p_threshold(0.5f, DType::kFloat16);  // 0.5 exact, even
  EXPECT(t > 0.5 + 0.5 * 0.00048828125 && t < 0.5 + 0.5 * 0.00048828125 + 1e-15);
  EXPECT(apd::official_prob(1.0f, 3.0f, DType::kFloat16) == 0.333251953125f);
}

int main() {
  test_official();
  test_order_key();
  test_scores();
  test_bad_rows();
  test_lse();
  test_mixture();
  test_kept_set();
  test_accept_prefix();
  test_row_settings();
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_sampling_row: all passed\n");
  return 0;
}
