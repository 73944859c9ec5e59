// CPU kernels of the sampling core (DESIGN.md §4): sample_draft,
// mixture_accept, accept_prefix. Torch-free: raw pointers and strides from
// apd/sampling_params.h, OpenMP over rows, the per-row math of
// apd/sampling_row.h (shared with the CUDA kernels).
//
// One row of V entries is sampled without sorting the vocabulary:
//   no filter (top_k off, top_p >= 1): ONE fused pass computing z, the bad-row
//     max and the argmax of z + g, generating Gumbel noise only for entries
//     that can still win (z + kGumbelMax > best so far);
//   with a filter: pass 1 writes z to a per-thread buffer and takes the max;
//     pass 2 builds a 2048-bin histogram of (count, softmax mass) over the top
//     11 bits of the descending order key; the bin where the cumulative count
//     (top_k) or mass (top_p) crosses its target is gathered (pass 3, keys
//     only), refined by a second 11-bit radix level when large, and sorted;
//     pass 4 takes the argmax of z + g over the kept prefix, counting ties in
//     index order so the lowest-index ties are the ones kept.
// Noise is regenerated from Philox (one call per 4 entries), never stored.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "apd/common.h"
#include "apd/philox.h"
#include "apd/sampling_params.h"
#include "apd/sampling_row.h"

namespace apd {
namespace cpu {
namespace detail {

constexpr int kL1Bits = 11;                       // level-1 radix digit: dk >> 21
constexpr int kL1Shift = 32 - kL1Bits;
constexpr int kL1Bins = 1 << kL1Bits;
constexpr int kL2Bits = 11;                       // level-2 digit: (dk >> 10) & 2047
constexpr int kL2Shift = kL1Shift - kL2Bits;
constexpr int kL2Bins = 1 << kL2Bits;
constexpr int64_t kSortDirect = 4096;             // sort the crossing bin directly below this

// Per-thread buffers, sized once per call for the largest row.
struct Scratch {
  std::vector<float> z;         // [V] tempered values of the current row
  std::vector<uint32_t> keys;   // [V] descending keys of the crossing bin
  std::vector<float> cand_z;    // [V] candidate values (mass above the floor), index order
  std::vector<int32_t> cand_i;  // [V] their vocabulary indices
  std::vector<int64_t> cnt;     // [kL1Bins] histogram counts
  std::vector<int32_t> cnt4;    // [4, kL1Bins] interleaved partial counts
  std::vector<double> mass;     // [kL1Bins] histogram softmax masses (unnormalised)
  void reserve(int64_t V) {
    z.resize(V);
    keys.resize(V);
    cand_z.resize(V);
    cand_i.resize(V);
    cnt.resize(kL1Bins);
    cnt4.resize(4 * kL1Bins);
    mass.resize(kL1Bins);
  }
};

// exp(z - max) as the histogram sees it. Entries with z - max <= -48 count as
// mass 0: together they weigh < V e^-48 (< 4e-16 for V < 2^18) relative to the
// max entry's mass 1, far below fp32 rounding of top_p itself (6e-8), so no
// cut moves; skipping them avoids most exp calls at small temperatures and the
// very slow subnormal results below -87.
constexpr float kMassFloor = -48.0f;

// The mass of one entry as the filter sees it: exp(z - max) (default), or,
// under compat="official", the probability torch's softmax gives it in the
// logits' dtype (official_prob; total = the row's sum of exp(z - max)).
struct MassFn {
  float maxz;
  bool official = false;
  DType dtype = DType::kFloat32;
  float total = 1.0f;
  double operator()(float z) const {
    const float t = z - maxz;
    if (!(t > kMassFloor)) return 0.0;
    const float e = std::exp(t);
    return official ? double(official_prob(e, total, dtype)) : double(e);
  }
};

// Position in sorted order where a cumulative target is crossed.
struct Crossing {
  uint32_t dk;          // descending key of the crossing value
  int64_t count_less;   // entries strictly before that value in sorted order
  double mass_less;     // their mass
  int64_t count_eq;     // entries equal to that value
  double each;          // mass of one of them
};

// Find where the cumulative count (by_mass = false, target K >= 1) or mass
// (by_mass = true, target T) of the sorted order first reaches the target.
// Falls back to the last value of the row when rounding keeps the target out
// of reach. z [V] is the row, h the level-1 histogram of it.
inline Crossing find_crossing(const float* z, int64_t V, const MassFn& mass_of, Scratch& s, bool by_mass,
                              double target) {
  auto reached = [&](int64_t c, double m) { return by_mass ? m >= target : double(c) >= target; };
  // Level 1: the histogram.
  int64_t cnt = 0, prev_cnt = 0;
  double mass = 0.0, prev_mass = 0.0;
  int bin = -1;
  for (int b = 0; b < kL1Bins; ++b) {
    if (s.cnt[b] == 0) continue;
    bin = b;
    prev_cnt = cnt;
    prev_mass = mass;
    cnt += s.cnt[b];
    mass += s.mass[b];
    if (reached(cnt, mass)) break;
  }
  cnt = prev_cnt;
  mass = prev_mass;
  // Gather the crossing bin's keys.
  uint32_t* keys = s.keys.data();
  int64_t n = 0;
  for (int64_t v = 0; v < V; ++v) {
    const uint32_t dk = desc_key(z[v]);
    if (int(dk >> kL1Shift) == bin) keys[n++] = dk;
  }
  // Level 2 on large bins, then sort what is left.
  if (n > kSortDirect) {
    int64_t c2[kL2Bins] = {};
    double m2[kL2Bins] = {};
    for (int64_t i = 0; i < n; ++i) {
      const int d = int((keys[i] >> kL2Shift) & (kL2Bins - 1));
      ++c2[d];
      m2[d] += mass_of(desc_key_to_float(keys[i]));
    }
    int sub = -1;
    int64_t c_acc = cnt;
    double m_acc = mass;
    for (int d = 0; d < kL2Bins; ++d) {
      if (c2[d] == 0) continue;
      sub = d;
      cnt = c_acc;
      mass = m_acc;
      c_acc += c2[d];
      m_acc += m2[d];
      if (reached(c_acc, m_acc)) break;
    }
    int64_t k = 0;
    for (int64_t i = 0; i < n; ++i)
      if (int((keys[i] >> kL2Shift) & (kL2Bins - 1)) == sub) keys[k++] = keys[i];
    n = k;
  }
  std::sort(keys, keys + n);
  Crossing x{keys[n - 1], cnt, mass, 0, 0.0};
  for (int64_t i = 0; i < n;) {
    int64_t j = i + 1;
    while (j < n && keys[j] == keys[i]) ++j;
    const double each = mass_of(desc_key_to_float(keys[i]));
    x = Crossing{keys[i], cnt, mass, j - i, each};
    if (reached(cnt + (j - i), mass + double(j - i) * each)) break;
    cnt += j - i;
    mass += double(j - i) * each;
    i = j;
  }
  return x;
}

// The kept prefix as (threshold key, number of lowest-index ties kept).
struct Cut {
  uint32_t dk;
  int64_t ties;
};

// SEMANTICS.md "Ties and order": default K-then-top-p, or compat="official"
// top-p-then-K. z [V] finite-max row already in s.z; fills s.cnt / s.mass.
inline Cut filter_cut(const float* z, int64_t V, float maxz, const SamplerConfig& cfg, Scratch& s) {
  MassFn mass_of{maxz};
  if (cfg.official && cfg.top_p < 1.0f) {  // dtype-rounded softmax: needs the row sum first
    double total = 0.0;
    for (int64_t v = 0; v < V; ++v) {
      const float t = z[v] - maxz;
      if (t > kMassFloor) total += std::exp(t);
    }
    mass_of = MassFn{maxz, true, cfg.dtype, float(total)};
  }
  // Counts go to 4 interleaved copies: a row's values crowd into few bins, and
  // back-to-back increments of one counter would serialise on store forwarding.
  std::fill(s.cnt4.begin(), s.cnt4.end(), 0);
  std::fill(s.mass.begin(), s.mass.end(), 0.0);
  int32_t* c4 = s.cnt4.data();
  for (int64_t v = 0; v < V; ++v) {
    const int b = int(desc_key(z[v]) >> kL1Shift);
    ++c4[(v & 3) * kL1Bins + b];
    if (mass_of.official) {
      s.mass[b] += mass_of(z[v]);
    } else {
      const float t = z[v] - maxz;
      if (t > kMassFloor) s.mass[b] += std::exp(t);  // == mass_of(z[v])
    }
  }
  double total = 0.0;
  for (int b = 0; b < kL1Bins; ++b) {
    s.cnt[b] = int64_t(c4[b]) + c4[kL1Bins + b] + c4[2 * kL1Bins + b] + c4[3 * kL1Bins + b];
    total += s.mass[b];
  }

  const int64_t K = effective_top_k(cfg.top_k, V);
  const bool use_p = cfg.top_p < 1.0f;
  auto by_count = [&](int64_t k) {
    const Crossing x = find_crossing(z, V, mass_of, s, false, double(k));
    return std::make_pair(Cut{x.dk, k - x.count_less}, x.mass_less + double(k - x.count_less) * x.each);
  };
  auto by_mass = [&](double T) {
    const Crossing x = find_crossing(z, V, mass_of, s, true, T);
    const int64_t j = ties_to_reach(x.mass_less, x.each, x.count_eq, T);
    return std::make_pair(Cut{x.dk, j}, x.count_less + j);
  };
  if (!cfg.official) {
    Cut cut{0xffffffffu, INT64_MAX};
    double mass_k = total;
    if (K < V) std::tie(cut, mass_k) = by_count(K);
    if (use_p) {
      const auto [pc, n] = by_mass(double(cfg.top_p) * mass_k);
      if (n <= K) cut = pc;  // else rounding put the top-p cut past K: keep K
    }
    return cut;
  }
  // compat="official": top-p over the whole row with the released code's
  // rounded probabilities and strict `> top_p` test, then top_k keeping every
  // entry >= the k-th largest value (ties at the cut all stay), both prefixes
  // of the sorted order, so the kept set is the shorter one.
  Cut cut{0xffffffffu, INT64_MAX};
  int64_t n = V;
  if (use_p) std::tie(cut, n) = by_mass(official_top_p_threshold(cfg.top_p, cfg.dtype));
  if (cfg.top_k > 0 && cfg.top_k < n) {
    const Crossing x = find_crossing(z, V, mass_of, s, false, double(cfg.top_k));
    if (x.count_less + x.count_eq < n) cut = Cut{x.dk, x.count_eq};
  }
  return cut;
}

// Running argmax of the perturbed score in index order (lowest index wins ties
// because a later entry must be strictly better), with the noise skip bound.
struct NoisyArgmax {
  uint64_t seed, step;
  int64_t pos;
  float best = -INFINITY;
  int64_t idx = -1;
  int64_t blk_id = -1;
  Philox4 blk{};
  void offer(float score_z, int64_t v) {
    if (idx >= 0 && !(score_z + kGumbelMax > best)) return;  // cannot win
    if ((v >> 2) != blk_id) {
      blk_id = v >> 2;
      blk = noise_block(seed, step, pos, v);
    }
    const float s = perturbed_score(score_z, blk, v);
    if (idx < 0 || s > best) {
      best = s;
      idx = v;
    }
  }
};

// sample(z) of DESIGN.md §4 for one row. `zf(v)` returns the tempered value
// z_v (tau > 0) or the raw value (tau == 0). Returns -1 for a bad row.
template <typename ZFn>
int64_t sample_row(ZFn zf, int64_t V, const SamplerConfig& cfg, uint64_t seed, uint64_t step,
                   int64_t pos, Scratch& s) {
  const float tau = cfg.temperature;
  if (!(tau > 0.0f)) {  // argmax, lowest index
    float best = -INFINITY, mx = -INFINITY;
    int64_t idx = -1;
    for (int64_t v = 0; v < V; ++v) {
      const float x = zf(v);
      mx = nan_max(mx, x);
      if (x > best) {
        best = x;
        idx = v;
      }
    }
    return row_is_bad(mx) ? -1 : idx;
  }
  NoisyArgmax am{seed, step, pos};
  if (!filter_active(cfg.top_k, cfg.top_p, V)) {  // one fused pass
    float mx = -INFINITY;
    for (int64_t v = 0; v < V; ++v) {
      const float z = zf(v);
      mx = nan_max(mx, z);
      am.offer(cfg.official ? temper(z, tau) : z, v);
    }
    return row_is_bad(mx) ? -1 : am.idx;
  }
  float* z = s.z.data();
  float mx = -INFINITY;
  int nan = 0;  // an int, not a bool: GCC finds no vector type for a bool reduction and leaves the loop scalar
#pragma omp simd reduction(max : mx) reduction(| : nan)
  for (int64_t v = 0; v < V; ++v) {  // max + NaN flag instead of nan_max: vectorises
    const float x = zf(v);
    z[v] = x;
    mx = x > mx ? x : mx;
    nan |= int(x != x);
  }
  if (nan || row_is_bad(mx)) return -1;
  // Candidates: the entries with mass above the floor. They are a prefix of the
  // sorted order (everything above a value), hold all the mass the filter
  // sees, and at small temperatures are a small part of the row. Every top-p
  // cut lies inside them, and so does a top-k cut when K <= their number;
  // only a pure top-k cut past them needs the whole row.
  float* cz = s.cand_z.data();
  int32_t* ci = s.cand_i.data();
  int64_t n = 0;
  for (int64_t v = 0; v < V; ++v) {  // branch-free compaction, order kept
    cz[n] = z[v];
    ci[n] = int32_t(v);
    n += (z[v] - mx > kMassFloor) ? 1 : 0;
  }
  const int64_t K = effective_top_k(cfg.top_k, V);
  if (!(cfg.top_p < 1.0f) && K > n) {  // top-k reaches past the candidates
    const Cut cut = filter_cut(z, V, mx, cfg, s);
    int64_t ties = 0;
    for (int64_t v = 0; v < V; ++v) {
      const uint32_t dk = desc_key(z[v]);
      if (dk > cut.dk) continue;
      if (dk == cut.dk && ties++ >= cut.ties) continue;
      am.offer(cfg.official ? temper(z[v], tau) : z[v], v);
    }
    return am.idx;
  }
  // K >= n acts as "top-k off" inside the candidates: the first K entries hold
  // all of their mass, and the top-p cut comes before K.
  const Cut cut = filter_cut(cz, n, mx, cfg, s);
  int64_t ties = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t dk = desc_key(cz[i]);
    if (dk > cut.dk) continue;
    if (dk == cut.dk && ties++ >= cut.ties) continue;
    am.offer(cfg.official ? temper(cz[i], tau) : cz[i], ci[i]);
  }
  return am.idx;
}

// exp(x) for x <= 0, branch-free so that loops over a row vectorise (libm's
// expf does not): Cody-Waite reduction by ln 2 and a degree-7 Taylor
// polynomial, < 2 ulp. Returns 0 at or below kMassFloor (see mass_of): the
// dropped terms weigh < V e^-48 relative to the max term 1.
inline float exp_nonpos(float x) {
  // Entries at or below the floor (and -inf) are computed as exp(0) and masked
  // to 0 with bit operations: float selects do not if-convert under trapping math.
  const uint32_t keep = 0u - uint32_t(x > kMassFloor);
  const float t = bits_to_float(float_to_bits(x) & keep);  // in (-48, 0]
  const float k = (t * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(t / ln 2)
  const float r = (t - k * 0.693145752f) - k * 1.42860677e-6f;   // |r| <= ln(2) / 2
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = bits_to_float(uint32_t(int32_t(k) + 127) << 23);  // 2^k, k in [-70, 0]
  return bits_to_float(float_to_bits(p * scale) & keep);
}

// log-sum-exp of one row, fp32 result from an fp64 sum (non-finite for bad
// rows): a vectorised max pass, a vectorised exp pass into tmp [n], then four
// fp64 accumulators.
// Banned ids [lo, hi) count as -inf (not in the sum).
template <typename T>
float row_lse(const T* x, int64_t n, float* tmp, int64_t lo, int64_t hi) {
  float mx = -INFINITY;
  int nan = 0;  // an int, not a bool: GCC finds no vector type for a bool reduction and leaves the loop scalar
#pragma omp simd reduction(max : mx) reduction(| : nan)
  for (int64_t v = 0; v < n; ++v) {
    const float f = unless_banned(to_float(x[v]), v, lo, hi);
    mx = f > mx ? f : mx;
    nan |= int(f != f);
  }
  if (nan || mx == INFINITY) return NAN;
  if (mx == -INFINITY) return -INFINITY;
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) tmp[v] = exp_nonpos(unless_banned(to_float(x[v]), v, lo, hi) - mx);
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  const int64_t n4 = n - n % 4;
  for (int64_t v = 0; v < n4; v += 4) {
    s0 += tmp[v];
    s1 += tmp[v + 1];
    s2 += tmp[v + 2];
    s3 += tmp[v + 3];
  }
  for (int64_t v = n4; v < n; ++v) s0 += tmp[v];
  return float(double(mx) + std::log((s0 + s1) + (s2 + s3)));
}

template <typename F>
void parallel_rows(int64_t rows, int64_t V, F&& body) {
#pragma omp parallel
  {
    Scratch s;  // once per thread per call
    s.reserve(V);
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < rows; ++r) body(r, s);
  }
}

}  // namespace detail

// draft [B, M] = sample(logits) per row; rows >= valid_len are -1. Row b's
// settings: p.cfg with p.per_row's overrides (row_config).
template <typename T>
void sample_draft(const SampleDraftParams& p) {
  const T* logits = static_cast<const T*>(p.logits);
  detail::parallel_rows(p.B * p.M, p.V, [&](int64_t r, detail::Scratch& s) {
    const int64_t b = r / p.M, i = r % p.M;
    if (i >= p.valid_len[b]) {
      p.draft[r] = -1;
      return;
    }
    const T* row = logits + b * p.stride_b + i * p.stride_m;
    const SamplerConfig cfg = row_config(p.cfg, p.per_row, b);
    const float tau = cfg.temperature;
    const DType dt = cfg.dtype;
    // One z function per mode, chosen once per row, capturing by value: a
    // branch inside zf, or tau read through a reference that the z[] stores
    // might alias, kept sample_row's first pass scalar (a divss per entry).
    auto run = [&](auto zf) {
      return detail::sample_row(zf, p.V, cfg, uint64_t(p.seeds[b]), uint64_t(p.steps[b]), p.pos_start[b] + i, s);
    };
    // Banned ids: a select per entry (no branch; empty range when none).
    const int64_t lo = p.ban_start, hi = p.ban_end;
    if (!(tau > 0.0f))
      p.draft[r] = run([row, lo, hi](int64_t v) { return unless_banned(to_float(row[v]), v, lo, hi); });
    else if (cfg.official)
      p.draft[r] = run([row, tau, dt, lo, hi](int64_t v) {
        return unless_banned(official_temper(to_float(row[v]), tau, dt), v, lo, hi);
      });
    else
      p.draft[r] = run([row, tau, lo, hi](int64_t v) { return unless_banned(temper(to_float(row[v]), tau), v, lo, hi); });
  });
}

// target [B, M] per DESIGN.md §4 Op 2 (coupled or argmax), then n_accept [B].
// Row b's settings: row_config and row_mixture (p.per_row over the scalars).
template <typename T>
void mixture_accept(const MixtureAcceptParams& p) {
  const T* dl = static_cast<const T*>(p.dllm_logits);
  const T* al = static_cast<const T*>(p.ar_logits);
  const int64_t V = std::min(p.V_D, p.V_A);
  detail::parallel_rows(p.B * p.M, std::max(p.V_D, p.V_A), [&](int64_t r, detail::Scratch& s) {
    const int64_t b = r / p.M, i = r % p.M;
    if (i >= p.valid_len[b]) {
      p.target[r] = -1;
      return;
    }
    const T* d = dl + b * p.d_stride_b + i * p.d_stride_m;
    const T* a = al + b * p.a_stride_b + i * p.a_stride_m;
    const int64_t lo = p.ban_start, hi = p.ban_end;
    const SamplerConfig cfg = row_config(p.cfg, p.per_row, b);
    const MixtureSettings mix = row_mixture(p, cfg, b);
    const float tau = cfg.temperature, R = mix.R, one_minus_R = mix.one_minus_R;
    if (mix.acceptance == Acceptance::kArgmax) {
      SamplerConfig greedy = cfg;
      greedy.temperature = 0.0f;
      const bool off = cfg.official;
      const DType dt = cfg.dtype;
      auto wf = [&](int64_t v) {
        const float dv = to_float(d[v]), av = to_float(a[v]);
        // The ban on the mixed value, not on d and a: 0 * -inf would be NaN at R = 0 or 1.
        return unless_banned(off ? official_target(dv, av, R, one_minus_R, dt)
                                 : mixture_argmax(dv, av, R, one_minus_R), v, lo, hi);
      };
      p.target[r] = detail::sample_row(wf, V, greedy, 0, 0, 0, s);
      return;
    }
    // Coupled: lse of both full rows (skipped where the mixture ignores them).
    const bool shift = R != 1.0f && R != 0.0f;
    float* tmp = s.z.data();  // free until sample_row fills it
    const MixtureRow mr = make_mixture_row(R, shift ? detail::row_lse(d, p.V_D, tmp, lo, hi) : 0.0f,
                                           shift ? detail::row_lse(a, p.V_A, tmp, lo, hi) : 0.0f);
    auto run = [&](auto zf) {  // as in sample_draft: no branch, captures by value
      return detail::sample_row(zf, V, cfg, uint64_t(p.seeds[b]), uint64_t(p.steps[b]), p.pos_start[b] + i, s);
    };
    if (tau > 0.0f)
      p.target[r] = run([d, a, mr, tau, lo, hi](int64_t v) {
        return unless_banned(temper(mixture_coupled(to_float(d[v]), to_float(a[v]), mr), tau), v, lo, hi);
      });
    else
      p.target[r] = run([d, a, mr, lo, hi](int64_t v) {
        return unless_banned(mixture_coupled(to_float(d[v]), to_float(a[v]), mr), v, lo, hi);
      });
  });
  for (int64_t b = 0; b < p.B; ++b)
    p.n_accept[b] = accept_prefix_row(p.draft + b * p.M, p.target + b * p.M, p.valid_len[b], V,
                                      p.eos_ids + b * p.eos_stride, p.num_eos);
}

// n_accept [B] from caller-provided draft and target ids.
inline void accept_prefix(const AcceptPrefixParams& p) {
  for (int64_t b = 0; b < p.B; ++b)
    p.n_accept[b] = accept_prefix_row(p.draft + b * p.M, p.target + b * p.M, p.valid_len[b], INT64_MAX,
                                      p.eos_ids + b * p.eos_stride, p.num_eos);
}

}  // namespace cpu
}  // namespace apd
