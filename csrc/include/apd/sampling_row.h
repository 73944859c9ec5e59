// Per-row math of the sampling core (DESIGN.md §4, docs/SEMANTICS.md), shared
// by the CPU and CUDA kernels so that both compute the same fp32 numbers in
// the same way. Torch-free; everything is APD_HD inline and works on scalars,
// so a kernel is free to choose its own reduction strategy around it.
//
// Vocabulary order used throughout: "sorted order" is value descending, then
// index ascending. Radix selection works on the DESCENDING key
// dk = desc_key(z): a smaller dk comes earlier in sorted order, equal values
// have equal dk, and ties between equal dk go to the lower index.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "apd/common.h"
#include "apd/philox.h"

namespace apd {

// ---------------------------------------------------------------------------
// Order keys
// ---------------------------------------------------------------------------

// Monotone uint32 key of a float: a < b  <=>  order_key(a) < order_key(b) for
// all non-NaN floats. -0.0 is folded into +0.0 because they compare equal as
// values, so they must tie (and fall back to the index rule), not order.
// Branch-free (signs are random in a logit row, so a branch mispredicts half
// the time on the CPU).
APD_HD uint32_t order_key(float f) {
  uint32_t u = float_to_bits(f);
  u &= 0u - uint32_t((u & 0x7fffffffu) != 0u);                   // -0.0 -> +0.0
  return u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);          // neg: ~u, pos: u | sign
}

// Inverse of order_key (returns +0.0 for the key of either zero).
APD_HD float key_to_float(uint32_t k) {
  return bits_to_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Descending key: ascending dk is the sorted order of the values.
APD_HD uint32_t desc_key(float f) { return ~order_key(f); }
APD_HD float desc_key_to_float(uint32_t dk) { return key_to_float(~dk); }

// ---------------------------------------------------------------------------
// Temperature and scores (fp32, SEMANTICS.md "Numbers")
// ---------------------------------------------------------------------------

// z = l / tau as a true IEEE division: a multiply by 1/tau rounds differently.
// Division by tau > 0 is monotone, so max_v(l_v / tau) == (max_v l_v) / tau.
APD_HD float temper(float l, float tau) { return l / tau; }

// compat="official" score: temperature applied twice, two fp32 divisions.
// Note official_score(l, tau) == temper(temper(l, tau), tau) bit for bit.
APD_HD float official_score(float l, float tau) { return l / tau / tau; }

// Gumbel-perturbed score z_v + g(seed, step, pos, v), fp32.
APD_HD float perturbed_score(float z, uint64_t seed, uint64_t step, int64_t pos, int64_t v) {
  return z + gumbel_noise(seed, step, pos, v);
}

// Same, when the kernel already holds the Philox block of v (noise_block(...,
// v) serves the 4 entries 4*(v/4) .. 4*(v/4)+3).
APD_HD float perturbed_score(float z, const Philox4& block, int64_t v) {
  return z + gumbel_from_bits(block.x[v & 3]);
}

// Upper bound of any fp32 Gumbel value this package draws: u <= 1 - 2^-24, so
// g <= -log(-log(1 - 2^-24)) ~= 16.64. If fl(z + kGumbelMax) <= best score so
// far, entry v cannot win (its score is <= best and it has a higher index than
// the current best when rows are scanned in index order), so kernels may skip
// generating its noise. Exactness: fp32 addition is monotone.
constexpr float kGumbelMax = 17.0f;

// (score, index) comparison of the final argmax: higher score wins, equal
// scores go to the lower index (SEMANTICS.md "Argmax returns the lowest index").
APD_HD bool better(float score_a, int64_t idx_a, float score_b, int64_t idx_b) {
  return score_a > score_b || (score_a == score_b && idx_a < idx_b);
}

// ---------------------------------------------------------------------------
// Banned ids (SEMANTICS.md "Banned ids")
// ---------------------------------------------------------------------------

// Ids the pair checker found unsafe (two tokenizers give them different
// tokens) form one range [start, end) and read as logit -inf in every row the
// sampling ops see: the draft row, both rows of the mixture (so the lse of
// each excludes them) and the target. An -inf entry is never drawn, kept by a
// filter or accepted, and a row of nothing but banned / -inf entries is bad.
// One unsigned compare: v - start wraps to a huge value below start.
APD_HD bool is_banned(int64_t v, int64_t start, int64_t end) {
  return uint64_t(v - start) < uint64_t(end - start);
}
APD_HD float unless_banned(float x, int64_t v, int64_t start, int64_t end) {
  return is_banned(v, start, end) ? -INFINITY : x;
}

// ---------------------------------------------------------------------------
// Bad rows and row reductions
// ---------------------------------------------------------------------------

// Max that propagates NaN (fmaxf would drop it): the bad-row test needs it.
APD_HD float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// A row is bad when its max (after temperature scaling) is not finite: any NaN,
// any +inf, or every entry -inf. Bad rows yield id -1.
APD_HD bool row_is_bad(float row_max) { return !(fabsf(row_max) <= FLT_MAX); }

// Online log-sum-exp accumulator (max m, sum s of exp(x - m)), fp32. Entries
// equal to -inf contribute nothing; NaN and +inf make the result non-finite,
// which the mixture then propagates into a bad row.
struct LseAcc {
  float m = -INFINITY;
  float s = 0.0f;
};

APD_HD void lse_push(LseAcc& acc, float x) {
  if (x == -INFINITY) return;
  if (x > acc.m || x != x) {
    acc.s = (acc.m == -INFINITY ? 0.0f : acc.s * expf(acc.m - x)) + 1.0f;
    acc.m = x;
  } else {
    acc.s += expf(x - acc.m);
  }
}

APD_HD LseAcc lse_merge(LseAcc a, LseAcc b) {
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  const float m = nan_max(a.m, b.m);
  LseAcc r;
  r.m = m;
  r.s = a.s * expf(a.m - m) + b.s * expf(b.m - m);
  return r;
}

// lse = max + log(sum exp(x - max)); -inf for an all -inf row.
APD_HD float lse_value(LseAcc acc) { return acc.m == -INFINITY ? -INFINITY : acc.m + logf(acc.s); }

// ---------------------------------------------------------------------------
// Mixtures (SEMANTICS.md "Mixture")
// ---------------------------------------------------------------------------

// fp32 multiply and add that the compiler may not contract into an FMA (nvcc
// contracts a * b + c by default, which would round differently from the CPU
// and the reference). Host code is built without FMA contraction (no -march).
APD_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
APD_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Constants of one (dLLM row, AR row) pair.
struct MixtureRow {
  float R;            // mixture weight
  float one_minus_R;  // 1 - R, computed in fp32 from fp32 R
  float lse_d;        // log-sum-exp over the V_D entries of the dLLM row
  float lse_a;        // log-sum-exp over the V_A entries of the AR row
};

APD_HD MixtureRow make_mixture_row(float R, float lse_d, float lse_a) {
  MixtureRow r;
  r.R = R;
  r.one_minus_R = 1.0f - R;
  r.lse_d = lse_d;
  r.lse_a = lse_a;
  return r;
}

// Coupled target logit m_v = R (d_v - lse_D) + (1 - R)(a_v - lse_A), fp32.
// R == 1 returns d_v and R == 0 returns a_v unchanged: softmax, the filter and
// the perturbed argmax are invariant to a per-row shift, so this is the same
// distribution, and it makes R = 1 reproduce the draft bit for bit (DESIGN §4:
// "R = 1 makes target == draft") instead of up to fp32 rounding of d - lse.
APD_HD float mixture_coupled(float d, float a, const MixtureRow& r) {
  if (r.R == 1.0f) return d;
  if (r.R == 0.0f) return a;
  return add_rn(mul_rn(r.R, d - r.lse_d), mul_rn(r.one_minus_R, a - r.lse_a));
}

// Argmax-mode target logit (the released code): R d_v + (1 - R) a_v, raw logits.
APD_HD float mixture_argmax(float d, float a, float R, float one_minus_R) {
  return add_rn(mul_rn(R, d), mul_rn(one_minus_R, a));
}

// ---------------------------------------------------------------------------
// compat="official": the released code's torch arithmetic in the logits' dtype
// (SEMANTICS.md "compat=\"official\"")
// ---------------------------------------------------------------------------

// fp32 -> the logits' dtype -> fp32, round to nearest even: what torch does
// when an op on bf16/fp16 tensors computes in fp32 ("opmath") and stores its
// result in the tensor's dtype. Identity for fp32.
APD_HD float round_to(DType dt, float x) {
  if (dt == DType::kBFloat16) return to_float(to_bf16(x));
  if (dt == DType::kFloat16) return to_float(to_fp16(x));
  return x;
}

// `logits / temperature` of the released code: torch divides in fp32 by
// float(tau) and rounds the quotient to the logits' dtype. The sampler's
// score is then official_z / tau + g (the second application of tau).
APD_HD float official_temper(float l, float tau, DType dt) { return round_to(dt, l / tau); }

// `R * d + (1 - R) * a` of the released code: each product and the sum are
// separate torch ops, each rounded to the logits' dtype; R and one_minus_R are
// the Python scalars as torch passes them (fp32).
APD_HD float official_target(float d, float a, float R, float one_minus_R, DType dt) {
  return round_to(dt, add_rn(round_to(dt, mul_rn(R, d)), round_to(dt, mul_rn(one_minus_R, a))));
}

// softmax probability of one entry as torch computes it for a bf16/fp16/fp32
// row: exp(z - max) in fp32, divided by the fp32 row sum, rounded to the
// dtype. e = exp(z - max), total = the row's sum of e.
APD_HD float official_prob(float e, float total, DType dt) { return round_to(dt, e / total); }

// The released top-p cut keeps sorted entries up to and including the first
// whose cumulative probability C (summed in fp32, rounded to the dtype)
// compares > top_p rounded to the dtype. Returns the smallest real C for which
// round(C) > round(top_p): the midpoint above round(top_p) when ties-to-even
// rounds it up (odd last bit), else the next double above that midpoint. The
// kept count is then the smallest n with C_n >= this threshold.
APD_HD double official_top_p_threshold(float top_p, DType dt) {
  const float tp = round_to(dt, top_p);
  float next;
  bool odd;
  if (dt == DType::kBFloat16) {
    const uint16_t b = to_bf16(tp).bits;
    next = to_float(bf16_t{uint16_t(b + 1)});
    odd = b & 1u;
  } else if (dt == DType::kFloat16) {
    const uint16_t b = to_fp16(tp).bits;
    next = to_float(fp16_t{uint16_t(b + 1)});
    odd = b & 1u;
  } else {
    const uint32_t b = float_to_bits(tp);
    next = bits_to_float(b + 1u);
    odd = b & 1u;
  }
  const double mid = 0.5 * (double(tp) + double(next));  // exact in fp64
  return odd ? mid : nextafter(mid, double(INFINITY));
}

// ---------------------------------------------------------------------------
// The filter's kept set (SEMANTICS.md "Ties and order")
// ---------------------------------------------------------------------------

// K of the default filter: top_k when 0 < top_k < V, else V.
APD_HD int64_t effective_top_k(int64_t top_k, int64_t V) { return (top_k > 0 && top_k < V) ? top_k : V; }

// Whether the sampler filters at all (otherwise it is one fused argmax pass).
APD_HD bool filter_active(int64_t top_k, float top_p, int64_t V) {
  return effective_top_k(top_k, V) < V || top_p < 1.0f;
}

// The kept set is a prefix of the sorted order: every entry with dk < thr_dk,
// plus the entries with dk == thr_dk and index <= tie_last (the lowest-index
// ties up to the prefix length). keep_all() keeps every non-NaN entry.
struct KeptSet {
  uint32_t thr_dk;
  int64_t tie_last;
};

APD_HD KeptSet keep_all() { return KeptSet{0xffffffffu, INT64_MAX}; }

APD_HD bool in_kept_set(uint32_t dk, int64_t v, const KeptSet& k) {
  return dk < k.thr_dk || (dk == k.thr_dk && v <= k.tie_last);
}

// Top-p crossing inside a group of tied entries: `before` is the mass of the
// sorted prefix ahead of the ties, `each` the (equal) mass of one tie, `count`
// the number of ties. Returns the smallest j in [1, count] with
// before + j * each >= target (count when none does), fp64.
APD_HD int64_t ties_to_reach(double before, double each, int64_t count, double target) {
  if (count <= 1) return 1;
  int64_t j = 1;
  if (each > 0.0) {
    const double need = (target - before) / each;
    j = need <= 1.0 ? 1 : (need >= double(count) ? count : int64_t(ceil(need)));
  } else {
    return count;
  }
  while (j > 1 && before + double(j - 1) * each >= target) --j;
  while (j < count && before + double(j) * each < target) ++j;
  return j;
}

// ---------------------------------------------------------------------------
// Accept-prefix scan (SEMANTICS.md "n_accept")
// ---------------------------------------------------------------------------

// a_i for i >= 1: draft and target agree, the target is a real id (bad rows are
// -1) and the draft id is below V (pass V = INT64_MAX when there is no V, as
// in accept_prefix: then ids < 0 still never match).
APD_HD bool tokens_match(int64_t draft, int64_t target, int64_t V) {
  return target >= 0 && draft == target && draft < V;
}

// Negative entries are padding (a per-row [B, E] list pads its shorter rows
// with -1): they never match, not even a bad row's draft id -1.
APD_HD bool is_eos(int64_t id, const int64_t* eos_ids, int64_t num_eos) {
  for (int64_t e = 0; e < num_eos; ++e)
    if (eos_ids[e] >= 0 && eos_ids[e] == id) return true;
  return false;
}

// n for one sequence: a_0 = 1, then the all-ones prefix of a, capped at
// valid_len, cut just after the first EOS among the accepted drafts.
// draft and target are the sequence's [M] rows, contiguous; valid_len in [0, M];
// eos_ids the sequence's own [num_eos] list.
APD_HD int64_t accept_prefix_row(const int64_t* draft, const int64_t* target, int64_t valid_len,
                                 int64_t V, const int64_t* eos_ids, int64_t num_eos) {
  if (valid_len <= 0) return 0;
  int64_t n = 1;
  while (n < valid_len && tokens_match(draft[n], target[n], V)) ++n;
  for (int64_t i = 0; i < n; ++i)
    if (is_eos(draft[i], eos_ids, num_eos)) return i + 1;
  return n;
}

}  // namespace apd
