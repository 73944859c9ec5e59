// CUDA kernels of the sampling core (DESIGN.md §4, docs/SEMANTICS.md):
// sample_draft, mixture_accept (target + n_accept) and accept_prefix.
// Torch-free; the per-row math (order keys, temperature, scores, mixture,
// bad rows, kept set, accept scan) comes from apd/sampling_row.h, shared with
// the CPU kernels.
//
// ALGORITHM. One CTA of kSampleThreads threads per (sequence b, row i); each thread
// reads 4 consecutive vocab entries per tile (one 8/16-byte load when the row
// is aligned, one Philox call for their 4 noise words), tiles walk the row in
// index order. Rows i >= valid_len[b] only write -1.
//   tau == 0 (and acceptance="argmax")  : 1 pass, argmax with lowest-index ties.
//   tau > 0, no filter                  : 1 pass, argmax of z + g (z = x / tau)
//                                         and the row max for the bad-row test.
//   tau > 0, top-p alone (default compat, the paper's setting): one pass
//     (stage_top_p_one_pass) does a. and b. below together: thresholds from
//     a running max instead of the row max (the block max so far, taken
//     after the first tiles and refreshed after iterations 0, 1, 3, 7 and 15,
//     and each thread's own), a superset staged and summed, cut to z >= zmax
//     - 16 once the pass has the exact max; when the thresholds were too low
//     after all (checked) or the stage overflows (the pass then only takes
//     the max), b. follows as below. The coupled mixture (0 < R < 1) does a. and b. in
//     its lse pass (row_lse<T, true>): y = R d + (1 - R) a stands in for m
//     (m + C, C known only when the pass ends), the candidates are then
//     re-read (a few hundred entries), cut with their exact m, and the result
//     is used only when a rounding bound proves the proxy's thresholds and
//     its part of the row total (finish_fused_stage); otherwise b. stages
//     relative to the lse pass's lower bound of max m (x_hint) and takes the
//     exact max.
//   tau > 0, top-k and/or top-p         :
//     a. max pass (row_zmax): max of x, then zmax = z(xmax) (z is monotone in
//        x: no division per entry), NaN-propagating -> bad rows stop here
//        with -1; it also bins the 512 threads' own maxima;
//     b. staging pass (stage_candidates): every entry with x >= x_thr goes to
//        shared memory as (z, v), where x_thr is the smallest x with
//        z >= z0 (a search over the keys of x, so ties in z stay together)
//        and z0 bounds the candidates: top-k first (K <= 512) from the K-th largest thread
//        maximum; the default top-p from z - zmax >= -16, while the same
//        pass sums the row's total fixed-point mass (z - zmax >= -30: every
//        nonzero mass) and checks that the top-p cut falls inside the staged
//        entries; the official top-p from z - zmax >= -30. Per entry a load
//        and a compare; the division only for the few above the cutoffs. When
//        more than kStageCap = 1536 qualify (flat rows, ties, K > 512), the
//        row keeps the radix passes below on global memory instead, and
//        stages the candidates as soon as a pass's counts say they fit;
//     c. radix select on the descending key dk = desc_key(z) (ascending dk is
//        the sorted order), 11/11/10-bit digits, 3 passes per select, over
//        the staged entries (or the row). Each pass builds a block-wide
//        histogram in shared memory of counts and of the probability mass
//        exp(z - zmax) in 2^-40 fixed point, the mass only for entries still
//        in the candidate set; lanes with the same digit (match_any) sum
//        counts and masses exactly in registers first, then one shared atomic
//        per digit and warp (integer sums: the result does not depend on the
//        order, so the kernel is deterministic run to run). top-k selects by
//        count, top-p by mass; top-p inside the top-k prefix selects only
//        among dk < dk(k-th). The result is a threshold dk, the count / mass
//        before it and of its ties; the count of ties to keep follows from
//        ties_to_reach(). With at most kSmallSelect = 128 staged entries
//        (the paper's setting: ~60) select_small finds the same Selection
//        in one pass instead: each entry's thread sums the counts and
//        masses of the entries before it and of its ties (n shared reads),
//        and one min-reduction picks the threshold;
//     d. when only some of the threshold's ties are kept, one more pass over
//        the row finds the index of the last kept tie (block scan of tie
//        flags, index order);
//     e. final pass over the staged entries (or the row): argmax of
//        (score + Gumbel) over the kept set; noise is regenerated from
//        Philox, never stored, and skipped for entries whose score +
//        kGumbelMax cannot beat (staged, in no order: cannot tie) the
//        thread's best.
//   mixture_accept "coupled" with 0 < R < 1 adds one first pass for the two
//   rows' log-sum-exp (fp64 sums, as the CPU kernels), which also bounds max
//   m and, for the default top-p alone, stages (above); m_v is recomputed
//   from both rows on every later pass that reads them.
//   n_accept: a second tiny kernel (one thread per sequence) on the same stream.
//
// MEMORY TRAFFIC. The floor is one read of the logits: B*M*V*sizeof(T) for
// sample_draft, B*M*(V_D + V_A)*sizeof(T) for mixture_accept. The unfiltered
// and tau == 0 paths read each row once (the coupled mixture with 0 < R < 1
// adds its lse pass: twice). sample_draft's default top-p reads a row once
// when its candidates fit in shared memory (the paper's tau 0.2 / top-p 0.95
// on N(0, 3) logits: ~60 of 152064 entries); so does the coupled mixture
// at that setting (both rows once, in the lse pass, when the fused staging
// proves its result), otherwise it reads both rows twice (lse from HBM,
// staging right after it, partly from L2: 132 row pairs are 80 MB against
// the H200's 50 MB L2). Other filters read a row
// twice: the max pass from HBM, the staging pass from L2. Rows that do not fit make
// 3-4 global passes when a radix pass can stage them (the first count pass,
// then the pass that stages), up to 9 otherwise (flat rows), as before.
// bench/NOTES.md has the passes, the instructions per entry from the SASS and
// the predicted times against the floor; bench/bench_sampling.py --device
// cuda measures them.
//
// Numbers: the kernel uses exactly the fp32 operations of sampling_row.h (its
// mixtures are written with mul_rn/add_rn, so nvcc cannot contract them into
// FMAs); the only places where it can differ from the CPU kernels are
// summation order (lse, top-p mass: SEMANTICS.md permits it) and the ulps of
// the device expf/logf, i.e. fp32 near-ties.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <type_traits>

#include "apd/common.h"
#include "apd/cuda/launch.cuh"
#include "apd/philox.h"
#include "apd/sampling_params.h"
#include "apd/sampling_row.h"

namespace apd {
namespace cuda {

constexpr int kSampleThreads = 512;                     // threads per CTA (one row)
constexpr int kVec = 4;                                 // consecutive entries per thread and tile
constexpr int kTile = kSampleThreads * kVec;            // entries per tile
constexpr int kUnroll = 4;                              // tiles loaded ahead per thread
constexpr int kRadixBits = 11;                          // widest digit
constexpr int kBins = 1 << kRadixBits;                  // histogram bins
constexpr int kBinsPerThread = kBins / kSampleThreads;  // 4
constexpr int kRadixPasses = 3;                         // 11 + 11 + 10 bits
constexpr float kMassScale = 1099511627776.0f;          // 2^40: mass fixed point
// exp(-30) * 2^40 ~= 0.10 rounds to a zero fixed-point mass whatever the ulps
// of expf (and so does the dtype-rounded official probability, whose row
// total is >= 1): entries further below the max skip expf and the conversion.
constexpr float kMassCutoff = -30.0f;
// The default top-p stages only z >= zmax - 16 (N(0, 3) logits at tau 0.2:
// ~60 entries; z >= zmax - 30 holds ~1100, over kStageCap in 3 rows of 10):
// below it, each entry's mass is < e^-16 of the max's, so the V <= 152064
// entries left out hold < 2% of the total, and the top-p cut falls inside
// the staged ones whenever the check in stage_above says so.
constexpr float kStageCutoff = -16.0f;
// Candidates staged in shared memory, (z, index) each: 12 KB. Static shared
// memory stops at 48 KB and the histograms and CUB storage take 33 KB.
constexpr int kStageCap = 1536;
// At most this many staged entries: select_small (one pass, n reads per
// entry's thread) instead of the three radix passes. Predicted crossover, no
// device yet (bench/NOTES.md): n warps/32 x n x ~20 instructions per read
// (SASS) / 4 schedulers ≈ 2,600 cycles ≈ 1.3 µs at n = 128, against ≈ 1.5-2.3
// µs for the three radix passes; at the paper's setting n is ~60 (≈ 0.7 µs).
constexpr int kSmallSelect = 128;
static_assert(kSmallSelect <= kSampleThreads && kSmallSelect <= kBins && kSmallSelect <= 4096,
              "select_small: one entry per thread and bin, slots in 12 bits");
static_assert(kBins % kSampleThreads == 0, "bins must split evenly over threads");

// Digit layout of the 32-bit key, most significant first.
APD_DEVICE int radix_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
APD_DEVICE int radix_width(int pass) { return pass == 2 ? 10 : 11; }

// ---------------------------------------------------------------------------
// Loads
// ---------------------------------------------------------------------------

APD_DEVICE float load_float(float x) { return x; }
APD_DEVICE float load_float(bf16_t x) { return to_float(x); }
APD_DEVICE float load_float(fp16_t x) { return __half2float(__ushort_as_half(x.bits)); }  // exact

// The logits' dtype as a constant: compat="official" rounds to it (the
// launchers pick T from the same dtype that SamplerConfig::dtype carries), so
// the rounding in the per-entry code is one fixed conversion, not a switch.
template <typename T>
constexpr DType kDTypeOf = std::is_same<T, float>::value    ? DType::kFloat32
                           : std::is_same<T, bf16_t>::value ? DType::kBFloat16
                                                            : DType::kFloat16;

template <typename T>
struct alignas(kVec * sizeof(T)) Pack4 {
  T v[kVec];
};

// One logit row [n] with stride 1. `vec` says the row start is aligned for
// Pack4 loads; entries at or past n read as -inf (callers mask them by index),
// and so do the banned ids [ban_lo, ban_hi) (SEMANTICS.md "Banned ids"): every
// pass (lse, max, staging, filter, noisy argmax) reads through load4, so one
// select per entry here bans them everywhere. finish_fused_stage's direct
// reads touch staged entries only, and a banned entry (-inf) is never staged.
template <typename T>
struct RowPtr {
  const T* p;
  int n;
  bool vec;
  int ban_lo, ban_hi;  // clamped to [0, n]; equal when nothing is banned

  APD_DEVICE void load4(int v0, float (&x)[kVec]) const {
    if (vec && v0 + kVec <= n) {
      const Pack4<T> pk = *reinterpret_cast<const Pack4<T>*>(p + v0);
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[j] = load_float(pk.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[j] = v0 + j < n ? load_float(p[v0 + j]) : -INFINITY;
    }
    if (v0 < ban_hi && v0 + kVec > ban_lo) {  // rare: the group overlaps the banned range
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[j] = unless_banned(x[j], v0 + j, ban_lo, ban_hi);
    }
  }
};

template <typename T>
APD_DEVICE RowPtr<T> make_row(const void* base, int64_t offset, int64_t n, int64_t ban_start, int64_t ban_end) {
  const T* p = static_cast<const T*>(base) + offset;
  const int64_t lo = ban_start < n ? ban_start : n, hi = ban_end < n ? ban_end : n;
  return RowPtr<T>{p, int(n), reinterpret_cast<uintptr_t>(p) % sizeof(Pack4<T>) == 0, int(lo), int(hi > lo ? hi : lo)};
}

// ---------------------------------------------------------------------------
// Row sources: the per-entry value x_v the sampler works on
// ---------------------------------------------------------------------------

// sample_draft: x = l.
template <typename T>
struct DraftSource {
  static constexpr DType kDType = kDTypeOf<T>;
  using value_type = T;
  RowPtr<T> l;
  APD_DEVICE void load4(int v0, float (&x)[kVec]) const { l.load4(v0, x); }
};

// mixture_accept, acceptance="coupled": x = m (needs both rows' lse).
template <typename T>
struct CoupledSource {
  static constexpr DType kDType = kDTypeOf<T>;
  using value_type = T;
  RowPtr<T> d, a;
  MixtureRow mix;
  APD_DEVICE void load4(int v0, float (&x)[kVec]) const {
    float dv[kVec], av[kVec];
    d.load4(v0, dv);
    a.load4(v0, av);
#pragma unroll
    for (int j = 0; j < kVec; ++j) x[j] = mixture_coupled(dv[j], av[j], mix);
  }
};

// mixture_accept, acceptance="argmax": x = R d + (1 - R) a on raw logits
// (compat="official": each op rounded to the logits' dtype, official_target).
// Banned ids are -inf in d and a already; x is set to -inf again because
// R = 0 or 1 would turn 0 * -inf into NaN (a bad row).
template <typename T>
struct ArgmaxSource {
  static constexpr DType kDType = kDTypeOf<T>;
  using value_type = T;
  RowPtr<T> d, a;
  float R, one_minus_R;
  bool official;
  APD_DEVICE void load4(int v0, float (&x)[kVec]) const {
    float dv[kVec], av[kVec];
    d.load4(v0, dv);
    a.load4(v0, av);
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      x[j] = unless_banned(official ? official_target(dv[j], av[j], R, one_minus_R, kDType)
                                    : mixture_argmax(dv[j], av[j], R, one_minus_R),
                           v0 + j, d.ban_lo, d.ban_hi);
  }
};

// ---------------------------------------------------------------------------
// Block reductions and shared memory
// ---------------------------------------------------------------------------

// Row max (NaN-propagating) and the best (score, index) seen so far.
struct MaxArg {
  float zmax;
  float score;
  int idx;
};

struct MaxArgOp {
  APD_DEVICE MaxArg operator()(const MaxArg& a, const MaxArg& b) const {
    MaxArg r;
    r.zmax = nan_max(a.zmax, b.zmax);
    const bool a_wins = better(a.score, a.idx, b.score, b.idx);
    r.score = a_wins ? a.score : b.score;
    r.idx = a_wins ? a.idx : b.idx;
    return r;
  }
};

// Log-sum-exp with the numerics of the CPU kernels' row_lse (apd/cpu/sampling.h):
// fp32 terms exp(x - max), an fp64 sum, lse = float(double(max) + log(sum)),
// non-finite max -> -inf (all -inf) or NaN. Here in one pass: the running fp64
// sum is rescaled (in fp64) when the max grows, so the result rounds like the
// CPU's almost always; the fp32-sum LseAcc of sampling_row.h would differ by
// ulps on most rows, which moves m and can reorder near-equal mixture values.
struct Lse64 {
  float m;
  double s;
};

APD_DEVICE void lse64_push(Lse64& acc, float x) {
  if (x == -INFINITY) return;
  if (x > acc.m || x != x) {  // a new max; a NaN sticks (later comparisons fail)
    acc.s = (acc.m == -INFINITY ? 0.0 : acc.s * exp(double(acc.m) - double(x))) + 1.0;
    acc.m = x;
  } else {
    acc.s += double(expf(x - acc.m));
  }
}

struct Lse64Op {
  APD_DEVICE Lse64 operator()(const Lse64& a, const Lse64& b) const {
    if (a.m == -INFINITY) return b;
    if (b.m == -INFINITY) return a;
    const float m = nan_max(a.m, b.m);
    if (!(fabsf(m) <= FLT_MAX)) return Lse64{m, 0.0};  // non-finite: the sum no longer matters
    return Lse64{m, a.s * exp(double(a.m) - double(m)) + b.s * exp(double(b.m) - double(m))};
  }
};

APD_DEVICE float lse64_value(const Lse64& acc) {
  if (acc.m == -INFINITY) return -INFINITY;
  if (!(fabsf(acc.m) <= FLT_MAX)) return NAN;
  return float(double(acc.m) + log(acc.s));
}

// Histogram prefix: (count, fixed-point mass).
struct CountMass {
  unsigned long long cnt;
  unsigned long long mass;
};

struct CountMassSum {
  APD_DEVICE CountMass operator()(const CountMass& a, const CountMass& b) const {
    return CountMass{a.cnt + b.cnt, a.mass + b.mass};
  }
};

struct MinOp {
  APD_DEVICE unsigned operator()(unsigned a, unsigned b) const { return a < b ? a : b; }
};

struct MinOp64 {
  APD_DEVICE unsigned long long operator()(unsigned long long a, unsigned long long b) const { return a < b ? a : b; }
};

// What the staging pass sums: the masses exp(z - zref) of the staged entries
// and of the row (fp64), and the row max of x when the max pass was skipped.
struct StageSums {
  double staged;
  double total;
  float xmax;
};

struct StageSumsOp {
  APD_DEVICE StageSums operator()(const StageSums& a, const StageSums& b) const {
    return StageSums{a.staged + b.staged, a.total + b.total, nan_max(a.xmax, b.xmax)};
  }
};

// Outcome of one radix select over the dk of the entries in a candidate set.
struct Selection {
  uint32_t dk;                    // threshold key
  unsigned long long cnt_before;  // entries with a smaller dk (earlier in sorted order)
  unsigned long long mass_before; // their mass (2^-40 fixed point)
  unsigned long long cnt_eq;      // entries with dk == threshold
  unsigned long long mass_eq;     // their mass
  double target;                  // the mass target used (mass selects only)
};

struct SampleSmem {
  unsigned int hist_cnt[kBins];
  unsigned long long hist_mass[kBins];
  union {
    typename cub::BlockReduce<MaxArg, kSampleThreads>::TempStorage maxarg;
    typename cub::BlockReduce<Lse64, kSampleThreads>::TempStorage lse;
    typename cub::BlockScan<CountMass, kSampleThreads>::TempStorage scan_cm;
    typename cub::BlockReduce<CountMass, kSampleThreads>::TempStorage sum_cm;
    typename cub::BlockReduce<unsigned, kSampleThreads>::TempStorage min_u;
    typename cub::BlockReduce<unsigned long long, kSampleThreads>::TempStorage min_u64;
    typename cub::BlockScan<int, kSampleThreads>::TempStorage scan_i;
    typename cub::BlockReduce<StageSums, kSampleThreads>::TempStorage sums;
  } tmp;
  // Block-wide broadcasts.
  MaxArg maxarg;
  float lse_d, lse_a;
  Selection sel;
  StageSums sums;
  unsigned code;
  unsigned code_alt;  // the one-read stagings: refreshes of the block max alternate code / code_alt (refresh_slot)
  unsigned long long code64;
  int tie_last;
  float x_thr;
  // Staged candidates: z and index of the entries every later pass needs, in
  // no particular order (slots are taken by atomics); n_stage may exceed
  // kStageCap, which means the staging failed.
  unsigned n_stage;
  float stage_z[kStageCap];
  int stage_v[kStageCap];
};

APD_DEVICE unsigned long long fixed_mass(float z, float zmax) {
  // z <= zmax, so e in [0, 1]; an exact power-of-two scale, rounded to nearest.
  return __float2ull_rn(expf(z - zmax) * kMassScale);
}

// Sum of x over the lanes of `peers` (the calling lane's match_any group),
// returned in the group's lowest lane: a tree over the peers in
// ceil(log2(group size)) rounds of shuffles (reduce_peers, E. Westphal,
// "Voting and shuffling to optimize atomic operations", 2015). Integer sums:
// exact, so the result does not depend on the order of the additions. Every
// lane of `active` calls it (a lane alone in its group returns its own x).
APD_DEVICE unsigned long long peer_sum(unsigned active, unsigned peers, unsigned long long x) {
  const unsigned lane = threadIdx.x & 31u;
  unsigned rel = __popc(peers & ((1u << lane) - 1u));  // peers below this lane
  unsigned rest = peers & (0xfffffffeu << lane);        // peers above it, not yet summed
  while (__any_sync(active, rest != 0u)) {              // uniform over `active`
    const int next = __ffs(int(rest));                  // the next peer above, 1-based; 0: none
    const unsigned long long t = __shfl_sync(active, x, next > 0 ? next - 1 : int(lane));
    if (next > 0) x += t;
    rest &= ~__ballot_sync(active, rel & 1u);  // lanes whose value was just taken are done
    rel >>= 1;
  }
  return x;
}

// Histogram update of one entry per lane: hist_cnt[digit] += 1 and
// hist_mass[digit] += m for every lane with `in` (m is 0 where !in), one
// atomic of each kind per distinct digit and warp: a row's entries crowd into
// a few first-level bins, shared-memory atomics on one address serialise, and
// a 64-bit shared atomicAdd is a compare-and-swap retry loop on sm_90.
// Called by all lanes that are active here; with_mass is uniform.
APD_DEVICE void hist_add(unsigned int* hist_cnt, unsigned long long* hist_mass, uint32_t digit, bool in,
                         unsigned long long m, bool with_mass) {
  const unsigned active = __activemask();
  if (!__any_sync(active, in)) return;  // common in the refining passes; uniform over `active`
  const unsigned lane = threadIdx.x & 31u;
  unsigned peers = __match_any_sync(active, in ? digit : 0xffffffffu);  // digits are < 2^11
  if (!in) peers = 1u << lane;  // lanes not in the histogram sum alone (m == 0)
  const bool leader = in && lane == unsigned(__ffs(int(peers)) - 1);
  if (leader) atomicAdd(&hist_cnt[digit], unsigned(__popc(peers)));
  if (with_mass && __any_sync(active, m != 0ull)) {
    const unsigned long long sum = peer_sum(active, peers, m);
    if (leader && sum != 0ull) atomicAdd(&hist_mass[digit], sum);
  }
}

// Appends (z, v) to the staged candidates for every lane with `want`: one
// shared atomic per warp for the slots. Slots past kStageCap are counted, not
// written (the caller then gives up staging). Called by all active lanes.
APD_DEVICE void stage_push(SampleSmem& sm, bool want, float z, int v) {
  const unsigned active = __activemask();
  const unsigned wants = __ballot_sync(active, want);
  if (wants == 0u) return;
  const unsigned lane = threadIdx.x & 31u;
  const int first = __ffs(int(wants)) - 1;
  unsigned base = 0;
  if (int(lane) == first) base = atomicAdd(&sm.n_stage, unsigned(__popc(wants)));
  base = __shfl_sync(active, base, first);
  const unsigned slot = base + unsigned(__popc(wants & ((1u << lane) - 1u)));
  if (want && slot < unsigned(kStageCap)) {
    sm.stage_z[slot] = z;
    sm.stage_v[slot] = v;
  }
}

// The running max of the one-read stagings (stage_top_p_one_pass, row_lse's
// fused staging): the block max of the threads' running maxima `run`
// (NaN-ignoring), through the order key in *slot, which holds 0 (< key(-inf))
// or an earlier block max of the same maxima (they only grow). Every thread
// calls it, with the same number of entries seen, so the result does not
// depend on the schedule.
APD_DEVICE float share_block_max(unsigned* slot, float run) {
  atomicMax(slot, order_key(run));
  __syncthreads();
  return fmaxf(run, key_to_float(*slot));
}

// The slot of the refresh after iteration it, or nullptr: refreshes after
// iterations 0, 1, 3, 7, 15, ... (the next loads already in flight). The
// first block max (before iteration 0) uses code, then code_alt and code
// alternate, so a thread already at the next refresh cannot raise the slot
// that another still reads.
APD_DEVICE unsigned* refresh_slot(SampleSmem& sm, int it) {
  if (((it + 1) & it) != 0) return nullptr;
  return ((it + 1) & 0x55555555) ? &sm.code_alt : &sm.code;  // it + 1 = 1, 4, 16: code_alt
}

// The last step of a one-read top-p staging (RowSampler's
// stage_top_p_one_pass, row_lse's fused staging): the n staged (z, v) in sm,
// z exact, a superset of {z - zmax >= kStageCutoff}, are cut to that set in
// place (every thread reads its slots before any is written), and the top-p
// cut is proven to lie inside them: the exact integer sum of their fixed-point
// masses is >= top_p * scaled_total (the row total in 2^-40 units, fp64), the
// test of the select. Returns the count kept, or -1 when the proof fails.
// Block-wide; the result is uniform.
APD_DEVICE int cut_stage_and_prove(SampleSmem& sm, int n, float zmax, double scaled_total, float top_p) {
  constexpr int kPer = (kStageCap + kSampleThreads - 1) / kSampleThreads;
  float zk[kPer];
  int vk[kPer];
  int mine = 0;
  unsigned long long staged_mass = 0;
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int k = int(threadIdx.x) + q * kSampleThreads;
    zk[q] = k < n ? sm.stage_z[k] : -INFINITY;
    vk[q] = k < n ? sm.stage_v[k] : 0;
    if (zk[q] - zmax >= kStageCutoff) ++mine, staged_mass += fixed_mass(zk[q], zmax);
  }
  int before = 0, kept = 0;
  cub::BlockScan<int, kSampleThreads>(sm.tmp.scan_i).ExclusiveSum(mine, before, kept);
  __syncthreads();  // all slots read
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    if (!(zk[q] - zmax >= kStageCutoff)) continue;
    sm.stage_z[before] = zk[q];
    sm.stage_v[before] = vk[q];
    ++before;
  }
  const CountMass r = cub::BlockReduce<CountMass, kSampleThreads>(sm.tmp.sum_cm)
                          .Reduce(CountMass{0ull, staged_mass}, CountMassSum());
  if (threadIdx.x == 0) sm.sel.mass_before = r.mass;
  __syncthreads();
  const bool ok = double(sm.sel.mass_before) >= double(top_p) * scaled_total;
  __syncthreads();  // sel is written again by the select
  return ok ? kept : -1;
}

// ---------------------------------------------------------------------------
// One row
// ---------------------------------------------------------------------------

// Everything the sampler needs about one row; all members are uniform in the CTA.
struct RowContext {
  int V;              // entries sampled over
  float tau;          // > 0 on the noisy paths
  bool official;      // z = official_temper (rounded to dtype), score = z / tau
  uint64_t seed, step;
  int64_t pos;
};

template <class Src>
class RowSampler {
 public:
  APD_DEVICE RowSampler(const Src& src, const RowContext& ctx, SampleSmem& sm)
      : src_(src), ctx_(ctx), sm_(sm) {}

  // argmax_v x_v, or -1 for a bad row (tau == 0 and acceptance="argmax").
  APD_DEVICE int64_t argmax() {
    const MaxArg r = scan_row</*kTemper=*/false, /*kNoise=*/false>(keep_all());
    return row_is_bad(r.zmax) ? -1 : r.idx;
  }

  // The tau > 0 sampler of DESIGN §4 under cfg (top_k, top_p, compat).
  // x_hint, when finite: x of some entry of the row (so <= max_v x_v), with
  // sm_.hist_cnt holding one x of a distinct entry per thread, both from a
  // pass that already read the row (row_lse). The filtered path then skips
  // its max pass: it stages from thresholds relative to z(x_hint) (a superset
  // of the usual candidates) and takes the exact max from the same pass.
  APD_DEVICE int64_t sample(const SamplerConfig& cfg, float x_hint = NAN) {
    const int V = ctx_.V;
    if (!filter_active(cfg.top_k, cfg.top_p, V)) {
      const MaxArg r = scan_row<true, true>(keep_all());
      return row_is_bad(r.zmax) ? -1 : r.idx;
    }
    float zmax;
    if (row_is_bad(x_hint) && !cfg.official && effective_top_k(cfg.top_k, V) == V) {
      // The default top-p alone (the paper's setting): max, staging and the
      // row total in one read of the row.
      const bool staged = stage_top_p_one_pass(cfg.top_p);
      zmax = zval(xmax_);
      if (!staged && !row_is_bad(zmax)) stage_candidates(cfg, zmax, /*track_max=*/false);
    } else if (!row_is_bad(x_hint) && !row_is_bad(zval(x_hint))) {
      xmax_ = x_hint;  // the searches' upper end until the staging pass has the exact max
      const bool staged = stage_candidates(cfg, zval(x_hint), /*track_max=*/true);
      zmax = staged ? zval(xmax_) : row_zmax();  // the staging gave up early: a max pass after all
    } else {
      zmax = row_zmax();
      if (!row_is_bad(zmax)) stage_candidates(cfg, zmax, /*track_max=*/false);
    }
    if (row_is_bad(zmax)) return -1;
    const KeptSet kept = cfg.official ? kept_official(cfg, zmax) : kept_default(cfg, zmax);
    return scan_row<true, true>(kept).idx;
  }

  // The default top-p (no top-k, default compat) with its candidates
  // already staged in sm_ (n of them, {z >= zmax - 16}, z exact) and the cut
  // proven inside them by the caller (row_lse's fused staging): xmax =
  // max_v x_v, mass_total = the row total in 2^-40 units.
  APD_DEVICE int64_t sample_staged(const SamplerConfig& cfg, float xmax, int n, double mass_total) {
    xmax_ = xmax;
    staged_ = true;
    n_staged_ = n;
    mass_total_ = mass_total;
    use_mass_total_ = true;
    return scan_row<true, true>(kept_default(cfg, zval(xmax))).idx;
  }

 private:
  const Src& src_;
  RowContext ctx_;
  SampleSmem& sm_;

  // Mass total of the compat="official" top-p (the row's sum of exp(z - zmax));
  // 0 selects the default mass exp(z - zmax).
  float official_total_ = 0.0f;

  // Whether the candidates sit in sm_.stage_* (n_staged_ of them): every
  // later radix pass and the final pass then read shared memory only.
  bool staged_ = false;
  int n_staged_ = 0;
  float xmax_ = -INFINITY;  // max_v x_v (row_zmax)
  // The default top-p's row total of masses in 2^-40 units (fp64: stage_above
  // sums exp(z - zref) and rescales to zmax), when stage_above computed it
  // (the staged entries then hold only the top of the row).
  double mass_total_ = 0.0;
  bool use_mass_total_ = false;

  // z of one entry: x / tau, or under compat="official" x / tau rounded to the
  // logits' dtype (SEMANTICS.md).
  APD_DEVICE float zval(float x) const {
    return ctx_.official ? official_temper(x, ctx_.tau, Src::kDType) : temper(x, ctx_.tau);
  }
  APD_DEVICE float temper_if(float x, bool t) const { return t ? zval(x) : x; }

  // Fixed-point mass of one entry: exp(z - zmax), or the dtype-rounded softmax
  // probability of compat="official" once official_total_ is set.
  APD_DEVICE unsigned long long mass_of(float z, float zmax) const {
    if (!(z - zmax >= kMassCutoff)) return 0ull;  // rounds to 0 anyway: skip the exp
    if (official_total_ > 0.0f)
      return __float2ull_rn(official_prob(expf(z - zmax), official_total_, Src::kDType) * kMassScale);
    return fixed_mass(z, zmax);
  }

  // sum_v exp(z_v - zmax) over the row, fp64 (the softmax denominator).
  APD_DEVICE float row_mass_total() {
    Lse64 acc{-INFINITY, 0.0};
    for_each_group([&](int v0, const float (&x)[kVec]) {
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        if (v0 + j < ctx_.V) lse64_push(acc, zval(x[j]));
    });
    const Lse64 r = cub::BlockReduce<Lse64, kSampleThreads>(sm_.tmp.lse).Reduce(acc, Lse64Op());
    if (threadIdx.x == 0) sm_.lse_d = float(r.s);  // r.m == zmax: the sum relative to the max
    __syncthreads();
    const float total = sm_.lse_d;
    __syncthreads();
    return total;
  }

  // max_v z_v (NaN-propagating) without a division per entry: z = x / tau
  // and the official dtype-rounded x / tau are monotone (non-decreasing) in x
  // and keep NaN, so max_v z(x_v) == z(max_v x_v) bit for bit. This is the
  // pass that reads the row from HBM: twice the usual loads in flight (bf16:
  // 32 KB per CTA). It also counts the threads' own maxima per first-level
  // bin of the key of x (sm_.hist_cnt), for stage_candidates.
  APD_DEVICE float row_zmax() {
    for (int b = threadIdx.x; b < kBins; b += kSampleThreads) sm_.hist_cnt[b] = 0;
    MaxArg acc{-INFINITY, -INFINITY, INT32_MAX};
    constexpr int kU = sizeof(typename Src::value_type) == 4 ? kUnroll : 2 * kUnroll;
    for_each_group<kU>([&](int v0, const float (&x)[kVec]) {
#pragma unroll
      for (int j = 0; j < kVec; ++j)  // entries past V are not -inf in a mixture with R = 0 or 1
        if (v0 + j < ctx_.V) acc.zmax = nan_max(acc.zmax, x[j]);
    });
    const float mine = acc.zmax;
    const MaxArg r = cub::BlockReduce<MaxArg, kSampleThreads>(sm_.tmp.maxarg).Reduce(acc, MaxArgOp());
    if (threadIdx.x == 0) sm_.maxarg = r;
    __syncthreads();  // also orders the zeroing of hist_cnt before the counts
    atomicAdd(&sm_.hist_cnt[desc_key(mine) >> radix_shift(0)], 1u);
    xmax_ = sm_.maxarg.zmax;
    __syncthreads();  // sm_.maxarg / tmp may be reused right after
    return zval(xmax_);
  }

  // The smallest x whose z satisfies `pred`, a predicate on z(x) that is
  // monotone in x and true at x = xmax, so that {x >= result} is exactly the
  // set where pred holds, ties in z included. A search over the order keys of
  // x by warp 0, 32 probes per step (7 steps instead of 32 halvings in every
  // warp); the block waits at the barrier. Block-wide; the result is uniform.
  template <class Pred>
  APD_DEVICE float x_lower_bound(float xmax, Pred&& pred) {
    if (threadIdx.x < 32u) {
      const unsigned lane = threadIdx.x;
      uint32_t lo = order_key(-INFINITY), hi = order_key(xmax);
      float r = -INFINITY;
      if (!pred(zval(-INFINITY))) {
        while (hi - lo > 1u) {  // pred(lo) is false, pred(hi) is true; uniform over the warp
          const uint64_t step = (uint64_t(hi - lo) + 31u) / 32u;
          const uint64_t k64 = uint64_t(lo) + uint64_t(lane + 1u) * step;
          const uint32_t k = k64 < uint64_t(hi) ? uint32_t(k64) : hi;  // lane 31 probes hi
          const unsigned t = __ballot_sync(0xffffffffu, pred(zval(key_to_float(k))));
          const int i = __ffs(int(t)) - 1;  // the first probe where pred holds (>= 0)
          const uint32_t below = __shfl_sync(0xffffffffu, k, i > 0 ? i - 1 : 0);
          hi = __shfl_sync(0xffffffffu, k, i);
          if (i > 0) lo = below;
        }
        r = key_to_float(hi);
      }
      if (lane == 0) sm_.x_thr = r;
    }
    __syncthreads();
    const float r = sm_.x_thr;
    __syncthreads();  // x_thr is written again by the next search
    return r;
  }

  // The first-level bin (of the key of x) where the count of the threads'
  // maxima counted by row_zmax, in sorted order, reaches K (1 <= K <=
  // kSampleThreads). Block-wide; the result is uniform.
  APD_DEVICE unsigned thread_max_bin(unsigned long long K) {
    CountMass item[kBinsPerThread], incl[kBinsPerThread], total;
    const int b0 = int(threadIdx.x) * kBinsPerThread;
#pragma unroll
    for (int k = 0; k < kBinsPerThread; ++k) item[k] = CountMass{sm_.hist_cnt[b0 + k], 0ull};
    cub::BlockScan<CountMass, kSampleThreads>(sm_.tmp.scan_cm).InclusiveScan(item, incl, CountMassSum(), total);
#pragma unroll
    for (int k = 0; k < kBinsPerThread; ++k)  // exactly one bin crosses K
      if (incl[k].cnt >= K && incl[k].cnt - item[k].cnt < K) sm_.code = unsigned(b0 + k);
    __syncthreads();
    const unsigned bin = sm_.code;
    __syncthreads();
    return bin;
  }

  // Stages (z, v) of every entry with x >= x_thr in one pass over the row (a
  // division only for those). A warp stops reading once the stage is
  // overfull; false, and nothing staged, when the entries do not fit.
  // track_max: the pass also takes max_v x_v (NaN-propagating) into xmax_,
  // for a caller that skipped row_zmax (valid only when it returns true).
  // With top_p > 0 (the default top-p over the whole row), the same pass sums
  // the masses exp(z - zref) of every entry with x >= x_mass (zref <= zmax;
  // x_mass <= x_thr: all nonzero masses), in fp64, and of the staged ones:
  // the row total rescaled to zmax, which pass 0 of the mass select then
  // uses (mass_total_), and the proof that the cut lies inside the staged
  // prefix (staged mass >= top_p * total, the test of the select); otherwise
  // nothing is staged.
  APD_DEVICE bool stage_above(float x_thr, bool track_max, float x_mass = INFINITY, float zref = 0.0f,
                              float top_p = 0.0f) {
    if (threadIdx.x == 0) sm_.n_stage = 0;
    __syncthreads();
    const int V = ctx_.V;
    const bool with_total = top_p > 0.0f;
    const float x_lo = with_total ? x_mass : x_thr;
    StageSums acc{0.0, 0.0, -INFINITY};
    constexpr int kU = sizeof(typename Src::value_type) == 4 ? kUnroll : 2 * kUnroll;  // as row_zmax
    for (int base = int(threadIdx.x) * kVec; base < V; base += kTile * kU) {
      // Lane 0 has the smallest base of its warp, so it is active whenever
      // another lane is: the stop is uniform over the warp.
      if (__shfl_sync(__activemask(), sm_.n_stage, 0) > unsigned(kStageCap)) break;
      float x[kU][kVec];
      load_groups<kU>(base, x);
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int v0 = base + u * kTile;
        if (v0 >= V) continue;
        if (track_max) {
#pragma unroll
          for (int j = 0; j < kVec; ++j)
            if (v0 + j < V) acc.xmax = nan_max(acc.xmax, x[u][j]);
        }
        stage_group(v0, x[u], x_thr, x_lo, [&](float z, bool staged) {
          if (!with_total) return;
          const double m = double(expf(z - zref));
          acc.total += m;
          if (staged) acc.staged += m;
        });
      }
    }
    __syncthreads();
    const unsigned n = sm_.n_stage;
    bool ok = n <= unsigned(kStageCap);
    if (with_total || track_max) {  // the fp64 sums in CUB's fixed order: the same every run
      const StageSums r = cub::BlockReduce<StageSums, kSampleThreads>(sm_.tmp.sums).Reduce(acc, StageSumsOp());
      if (threadIdx.x == 0) sm_.sums = r;
      __syncthreads();
      const StageSums t = sm_.sums;
      if (track_max) xmax_ = t.xmax;
      if (with_total) {
        // exp(z - zmax) = exp(z - zref) * exp(zref - zmax); zref == zmax after row_zmax.
        const float zmax = track_max ? zval(t.xmax) : zref;
        const double scale = double(kMassScale) * exp(double(zref) - double(zmax));
        ok = ok && t.staged * scale >= double(top_p) * (t.total * scale);
        mass_total_ = t.total * scale;
        use_mass_total_ = ok;
      }
    }
    __syncthreads();  // n_stage and sums are written again by the next staging / select
    if (!ok) return false;
    staged_ = true;
    n_staged_ = int(n);
    return true;
  }

  // The default top-p over the whole row in one read: the max pass, the
  // staging pass and the row total of stage_above fused. Each thread stages
  // the entries with x >= x_run - 17 tau and sums the masses of those with x
  // >= x_run - 31 tau (in fp64 relative to a running max, as row_lse), where
  // x_run is the larger of the block max so far (of the first kU groups, one
  // barrier, refreshed after iterations 0, 1, 3, 7 and 15 with the next loads
  // in flight, as row_lse's staging) and the thread's own running max: never
  // above the final max xmax, and independent of the schedule (the sums and
  // the staged set are the same every run; the refreshes keep a row whose
  // max comes late from staging 1% of a bulk that sits within 17 tau of the
  // first tiles' max). After the pass, with xmax exact, the staged entries are cut
  // to {z >= zmax - 16} (the set stage_above stages), which they contain if
  // the last thresholds, at most xmax - 17 tau and xmax - 31 tau, are at or
  // below the exact x_thr and x_mass (checked; one tau of margin for the
  // roundings of x / tau). xmax_ is exact on return; true when the
  // candidates are staged with the row total set, false when not (the stage
  // overflowed, after which the pass only takes the max; the threshold check
  // or the top-p proof failed; a bad row).
  APD_DEVICE bool stage_top_p_one_pass(float top_p) {
    const int V = ctx_.V;
    const float tau = ctx_.tau;
    const float c_stage = (-kStageCutoff + 1.0f) * tau, c_mass = (-kMassCutoff + 1.0f) * tau;
    constexpr int kU = sizeof(typename Src::value_type) == 4 ? kUnroll : 2 * kUnroll;  // as row_zmax
    if (threadIdx.x == 0) sm_.n_stage = 0, sm_.code = 0u, sm_.code_alt = 0u;
    __syncthreads();
    Lse64 total{-INFINITY, 0.0};
    float xmax = -INFINITY;  // NaN-propagating: the row test
    float x_run = -INFINITY;  // NaN-ignoring: the thresholds
    bool staging = true;      // uniform over the warp
    // The same trip count in every thread (the refresh barriers); iteration 0
    // in every thread (threads without entries too): its groups' max goes to
    // the whole block before any is staged.
    const int n_it = (V + kTile * kU - 1) / (kTile * kU);
    int base = int(threadIdx.x) * kVec;
    float x[kU][kVec];
    load_groups<kU>(base, x);
    {
      float m = -INFINITY;
#pragma unroll
      for (int u = 0; u < kU; ++u)
#pragma unroll
        for (int j = 0; j < kVec; ++j)
          if (base + u * kTile + j < V) m = fmaxf(m, x[u][j]);
      x_run = share_block_max(&sm_.code, m);
    }
    for (int it = 0; it < n_it; ++it) {
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int v0 = base + u * kTile;
        if (v0 >= V) continue;
#pragma unroll
        for (int j = 0; j < kVec; ++j)
          if (v0 + j < V) xmax = nan_max(xmax, x[u][j]), x_run = fmaxf(x_run, x[u][j]);
      }
      if (staging) {
        // Thresholds of this iteration; never -inf, so -inf entries are never taken.
        const float x_stage = fmaxf(x_run - c_stage, -FLT_MAX), x_mass = fmaxf(x_run - c_mass, -FLT_MAX);
#pragma unroll
        for (int u = 0; u < kU; ++u)
          if (base + u * kTile < V)
            stage_group(base + u * kTile, x[u], x_stage, x_mass, [&](float z, bool) { lse64_push(total, z); });
      }
      base += kTile * kU;
      if (it + 1 == n_it) break;
      // Every lane runs every iteration: uniform over the warp. An overfull
      // stage stops the staging; the pass still takes the exact max.
      if (staging && __shfl_sync(0xffffffffu, sm_.n_stage, 0) > unsigned(kStageCap)) staging = false;
      load_groups<kU>(base, x);
      if (unsigned* slot = refresh_slot(sm_, it)) x_run = share_block_max(slot, x_run);
    }
    const MaxArg rm = cub::BlockReduce<MaxArg, kSampleThreads>(sm_.tmp.maxarg)
                          .Reduce(MaxArg{xmax, -INFINITY, INT32_MAX}, MaxArgOp());
    if (threadIdx.x == 0) sm_.maxarg = rm;
    __syncthreads();  // also: every push is done
    if (sm_.n_stage > unsigned(kStageCap)) {  // uniform
      xmax_ = sm_.maxarg.zmax;
      __syncthreads();  // n_stage and maxarg are written again by the next pass
      return false;
    }
    const Lse64 rt = cub::BlockReduce<Lse64, kSampleThreads>(sm_.tmp.lse).Reduce(total, Lse64Op());
    if (threadIdx.x == 0) sm_.sums = StageSums{0.0, rt.s * exp(double(rt.m) - double(zval(sm_.maxarg.zmax))), 0.0f};
    __syncthreads();
    xmax_ = sm_.maxarg.zmax;
    const double row_total = sm_.sums.total;  // sum of exp(z - zmax) over x >= x_mass (and a few below)
    const int n = int(sm_.n_stage);
    __syncthreads();
    const float zmax = zval(xmax_);
    if (row_is_bad(zmax)) return false;
    const float x_thr = x_lower_bound(xmax_, [&](float z) { return z - zmax >= kStageCutoff; });
    const float x_mass = x_lower_bound(xmax_, [&](float z) { return z - zmax >= kMassCutoff; });
    if (!(xmax_ - c_stage <= x_thr && xmax_ - c_mass <= x_mass)) return false;  // uniform
    // Keep the staged entries with z - zmax >= kStageCutoff ({x >= x_thr})
    // and prove that the top-p cut lies inside them (as stage_above).
    const double scaled_total = row_total * double(kMassScale);
    const int kept = cut_stage_and_prove(sm_, n, zmax, scaled_total, top_p);
    if (kept < 0) return false;
    mass_total_ = scaled_total;
    use_mass_total_ = true;
    staged_ = true;
    n_staged_ = kept;
    return true;
  }

  // One group of kVec entries [v0, v0 + kVec) of a staging pass: stages (z, v)
  // of every entry with x >= x_stage, and calls mass(z, staged) for every
  // entry with x >= x_lo (x_lo <= x_stage), the only ones whose z (a
  // division) is computed. Per entry a compare or two; one vote per group
  // skips the staging collectives in the common case. Called by all active
  // lanes (stage_push is warp-collective).
  template <class MassF>
  APD_DEVICE void stage_group(int v0, const float (&x)[kVec], float x_stage, float x_lo, MassF&& mass) {
    float z[kVec];
    bool want[kVec];
    bool any = false;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const bool valid = v0 + j < ctx_.V;
      want[j] = valid && x[j] >= x_stage;
      z[j] = 0.0f;
      if (valid && x[j] >= x_lo) {  // rare: the division, and the mass for the total
        z[j] = zval(x[j]);
        mass(z[j], want[j]);
      }
      any |= want[j];
    }
    if (!__any_sync(__activemask(), any)) return;
#pragma unroll
    for (int j = 0; j < kVec; ++j) stage_push(sm_, want[j], z[j], v0 + j);
  }

  // Loads kU groups of kVec entries of this thread from `base` on (stride
  // kTile); groups at or past V are left unset.
  template <int kU>
  APD_DEVICE void load_groups(int base, float (&x)[kU][kVec]) const {
#pragma unroll
    for (int u = 0; u < kU; ++u)
      if (base + u * kTile < ctx_.V) src_.load4(base + u * kTile, x[u]);
  }

  // Stages the candidates before the radix passes, so that they and the
  // final pass read shared memory: one more pass over the row, in which an
  // entry costs a load and a compare with a threshold x_thr (the division
  // only for the few above it). The staged set {x >= x_thr} is {z >= z0}
  // for some z0 (x_lower_bound), a prefix of the sorted order with all its
  // ties, that holds
  //   top-k first (the default filter, official without top-p), K <= 512:
  //     the K largest: x_thr is at most the K-th largest of 512 values of
  //     distinct entries (the threads' maxima, or the lower bounds of them
  //     that row_lse binned), found from their first-level bins;
  //   top-p over the whole row: every entry with z - zref >= kMassCutoff
  //     (all nonzero fixed-point masses, zref <= zmax), which the mass
  //     select needs for its total; the default top-p stages only z - zref
  //     >= kStageCutoff and proves in the same pass that the cut is inside.
  // zref is zmax after row_zmax, or a lower bound of it (track_max: the
  // staging pass then takes the exact max). True when the candidates are
  // staged; otherwise (flat rows, large K) the row takes the radix path on
  // global memory, which stages later if it can.
  APD_DEVICE bool stage_candidates(const SamplerConfig& cfg, float zref, bool track_max) {
    const int64_t K = effective_top_k(cfg.top_k, ctx_.V);
    float x_thr;
    if (K < ctx_.V && !(cfg.official && cfg.top_p < 1.0f)) {
      if (K > kSampleThreads) return false;
      const unsigned bin = thread_max_bin((unsigned long long)K);
      const float x_lo = desc_key_to_float((bin << radix_shift(0)) | ((1u << radix_shift(0)) - 1u));
      if (!(fabsf(x_lo) <= FLT_MAX)) return false;  // the bins of +-inf and NaN: no threshold
      const float z_lo = zval(x_lo);
      x_thr = x_lower_bound(x_lo, [&](float z) { return z >= z_lo; });
    } else if (cfg.official) {  // the official top-p: every nonzero official mass
      x_thr = x_lower_bound(xmax_, [&](float z) { return z - zref >= kMassCutoff; });
    } else {  // the default top-p: the top of the row, proven to hold the cut
      x_thr = x_lower_bound(xmax_, [&](float z) { return z - zref >= kStageCutoff; });
      const float x_mass = x_lower_bound(xmax_, [&](float z) { return z - zref >= kMassCutoff; });
      return stage_above(x_thr, track_max, x_mass, zref, cfg.top_p);
    }
    return stage_above(x_thr, track_max);
  }

  // Calls f(v0, x) for each group of kVec entries [v0, v0 + kVec) of this
  // thread, in increasing index order (x past V reads as -inf). The loads of
  // kUnroll groups are issued before any is used: more bytes in flight.
  template <int kU = kUnroll, class F>
  APD_DEVICE void for_each_group(F&& f) const {
    const int V = ctx_.V;
    for (int base = int(threadIdx.x) * kVec; base < V; base += kTile * kU) {
      float x[kU][kVec];
#pragma unroll
      for (int u = 0; u < kU; ++u)
        if (base + u * kTile < V) src_.load4(base + u * kTile, x[u]);
#pragma unroll
      for (int u = 0; u < kU; ++u)
        if (base + u * kTile < V) f(base + u * kTile, x[u]);
    }
  }

  // One pass over the row: NaN-propagating max of z (x / tau when kTemper) and,
  // when kNoise, the argmax of score + g over the kept set; without kNoise the
  // argmax is over z itself (plain argmax).
  template <bool kTemper, bool kNoise>
  APD_DEVICE MaxArg scan_row(const KeptSet kept) {
    if (kNoise && staged_) return scan_staged(kept);
    const int V = ctx_.V;
    const bool all = kept.thr_dk == 0xffffffffu;
    MaxArg acc{-INFINITY, -INFINITY, INT32_MAX};
    for_each_group([&](int v0, const float (&x)[kVec]) {
      unsigned cand = 0;  // bit j: entry v0 + j needs its noise
      float sb[kVec];     // score before noise
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int v = v0 + j;
        sb[j] = -INFINITY;
        if (v >= V) continue;
        const float z = temper_if(x[j], kTemper);
        acc.zmax = nan_max(acc.zmax, z);
        if (!all && !in_kept_set(desc_key(z), v, kept)) continue;
        if (!kNoise) {
          if (better(z, v, acc.score, acc.idx)) {
            acc.score = z;
            acc.idx = v;
          }
          continue;
        }
        sb[j] = ctx_.official ? temper(z, ctx_.tau) : z;  // official: tau applied again
        // fl(sb + max g) <= best: cannot win (groups come in index order, and
        // a later index loses ties). As in the CPU's NoisyArgmax, only once
        // the thread holds an entry: a kept entry whose score is -inf (official
        // l / tau / tau underflow) must still be taken when nothing better is.
        if (acc.idx != INT32_MAX && !(sb[j] + kGumbelMax > acc.score)) continue;
        cand |= 1u << j;
      }
      if (kNoise && cand != 0) {
        const Philox4 blk = noise_block(ctx_.seed, ctx_.step, ctx_.pos, v0);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          if (!((cand >> j) & 1u)) continue;  // masked or skipped
          const float s = perturbed_score(sb[j], blk, v0 + j);
          if (better(s, v0 + j, acc.score, acc.idx)) {
            acc.score = s;
            acc.idx = v0 + j;
          }
        }
      }
    });
    const MaxArg r = cub::BlockReduce<MaxArg, kSampleThreads>(sm_.tmp.maxarg).Reduce(acc, MaxArgOp());
    if (threadIdx.x == 0) sm_.maxarg = r;
    __syncthreads();
    const MaxArg out = sm_.maxarg;
    __syncthreads();  // sm_.maxarg / tmp may be reused right after
    return out;
  }

  // The final pass over the staged candidates (they hold the whole kept set):
  // argmax of score + g. The staged order is arbitrary, so an entry is
  // skipped only when it cannot even tie the thread's best (fl(sb + max g) <
  // best), which makes the result independent of the order.
  APD_DEVICE MaxArg scan_staged(const KeptSet kept) {
    MaxArg acc{-INFINITY, -INFINITY, INT32_MAX};
    for (int k = int(threadIdx.x); k < n_staged_; k += kSampleThreads) {
      const float z = sm_.stage_z[k];
      const int v = sm_.stage_v[k];
      if (!in_kept_set(desc_key(z), v, kept)) continue;
      const float sb = ctx_.official ? temper(z, ctx_.tau) : z;  // official: tau applied again
      if (acc.idx != INT32_MAX && sb + kGumbelMax < acc.score) continue;
      const Philox4 blk = noise_block(ctx_.seed, ctx_.step, ctx_.pos, v & ~3);
      const float s = perturbed_score(sb, blk, v);
      if (better(s, v, acc.score, acc.idx)) {
        acc.score = s;
        acc.idx = v;
      }
    }
    const MaxArg r = cub::BlockReduce<MaxArg, kSampleThreads>(sm_.tmp.maxarg).Reduce(acc, MaxArgOp());
    if (threadIdx.x == 0) sm_.maxarg = r;
    __syncthreads();
    const MaxArg out = sm_.maxarg;
    __syncthreads();
    return out;
  }

  // select() over at most kSmallSelect staged entries without the radix
  // passes: each entry's dk and mass go to hist_cnt / hist_mass (free here),
  // then the thread holding entry k sums, over all entries j, the count and
  // mass of those before it in sorted order (dk_j < dk_k) and of its ties
  // (n reads of shared memory, broadcast: every lane reads the same j). The
  // threshold is the smallest dk whose inclusive prefix reaches the need, or
  // the largest dk when rounding leaves none: what the radix passes find
  // digit by digit, from the same exact integer sums, so the Selection is
  // the same. One pass over the n entries instead of three histogram passes
  // (each: 2048 bins zeroed, filled and scanned, about 6 barriers).
  APD_DEVICE Selection select_small(float zmax, uint32_t dk_end, bool by_mass, bool with_mass,
                                    unsigned long long need_cnt, double target, float top_p) {
    const int n = n_staged_;  // <= kSmallSelect <= kSampleThreads: one entry per thread
    const int k = int(threadIdx.x);
    constexpr uint32_t kOut = 0xffffffffu;  // not in the set (dk_end <= kOut excludes it)
    uint32_t dk = kOut;
    unsigned long long m = 0;
    if (k < n) {
      const float z = sm_.stage_z[k];
      const uint32_t d = desc_key(z);
      const bool in_range = d < dk_end;
      m = with_mass && in_range ? mass_of(z, zmax) : 0ull;
      if (in_range && (!by_mass || m != 0)) dk = d;  // m is 0 wherever dk stays kOut
      sm_.hist_cnt[k] = dk;
      sm_.hist_mass[k] = m;
    }
    const CountMass tot = cub::BlockReduce<CountMass, kSampleThreads>(sm_.tmp.sum_cm)
                              .Reduce(CountMass{0ull, m}, CountMassSum());  // the mass only
    if (threadIdx.x == 0) sm_.sel.mass_before = tot.mass;
    __syncthreads();  // also publishes hist_cnt / hist_mass
    if (by_mass && target < 0.0)  // the row total: the staged entries may hold only part of it
      target = double(top_p) * (use_mass_total_ ? mass_total_ : double(sm_.sel.mass_before));
    Selection s{};
    // Min-reduced code: hits first, by smallest dk, else the largest dk; the
    // low 12 bits pick the lowest slot among its ties to report the Selection.
    unsigned long long code = ~0ull;
    if (dk != kOut) {
      unsigned cnt_lt = 0, cnt_eq = 0;  // n <= kSmallSelect: 32 bits
      for (int j = 0; j < n; ++j) {     // branch-free: selects, not jumps
        const uint32_t dj = sm_.hist_cnt[j];
        const unsigned long long mj = sm_.hist_mass[j];
        const bool lt = dj < dk, eq = dj == dk;
        cnt_lt += lt;
        cnt_eq += eq;
        s.mass_before += lt ? mj : 0ull;
        s.mass_eq += eq ? mj : 0ull;
      }
      s.cnt_before = cnt_lt;
      s.cnt_eq = cnt_eq;
      const bool hit = by_mass ? double(s.mass_before + s.mass_eq) >= target : s.cnt_before + s.cnt_eq >= need_cnt;
      code = ((hit ? (unsigned long long)dk : (1ull << 33) - dk) << 12) | unsigned(k);
    }
    code = cub::BlockReduce<unsigned long long, kSampleThreads>(sm_.tmp.min_u64).Reduce(code, MinOp64());
    if (threadIdx.x == 0) sm_.code64 = code;
    __syncthreads();
    code = sm_.code64;
    if (dk != kOut && (code & 0xfffull) == unsigned(k)) {  // one thread: the chosen dk's lowest slot
      const unsigned long long c = code >> 12;
      s.dk = c < (1ull << 32) ? uint32_t(c) : uint32_t((1ull << 33) - c);
      s.target = target;
      sm_.sel = s;
    }
    __syncthreads();
    const Selection res = sm_.sel;
    __syncthreads();
    return res;
  }

  // Radix select of the threshold dk among the entries with dk < dk_end.
  // by_mass: the first dk whose cumulative mass reaches `target` (or
  // top_p * total when target < 0); otherwise the need-th entry by count.
  // with_mass: accumulate masses (needed by every caller that uses top-p).
  APD_DEVICE Selection select(float zmax, uint32_t dk_end, bool by_mass, bool with_mass,
                              unsigned long long need_cnt, double target, float top_p) {
    if (staged_ && n_staged_ <= kSmallSelect) return select_small(zmax, dk_end, by_mass, with_mass, need_cnt, target, top_p);
    uint32_t prefix = 0, hi_mask = 0;
    unsigned long long cnt_before = 0, mass_before = 0;
    Selection res{};
    for (int pass = 0; pass < kRadixPasses; ++pass) {
      const int shift = radix_shift(pass);
      const uint32_t digit_mask = (1u << radix_width(pass)) - 1u;
      // Staging (once per row, in a pass that reads global memory): pass 0
      // of a mass select stages its whole candidate set (the positive-mass
      // entries: a few hundred at tau 0.2) and finds out whether it fits;
      // a later pass stages the entries in or before the bin chosen so far,
      // whose number the previous pass counted. Either set is a prefix of the
      // sorted order that holds every entry this select and the later ones
      // (the top-p inside the top-k, the official top-k inside the top-p) and
      // the final pass can need, so their histograms and the kept set come
      // out the same from the staged entries. Rows with more candidates
      // (flat rows, ties) stay on global memory.
      const bool stage_now = !staged_ && (pass == 0 ? by_mass : cnt_before + res.cnt_eq <= kStageCap);
      if (threadIdx.x == 0) sm_.n_stage = 0;
      for (int b = threadIdx.x; b < kBins; b += kSampleThreads) {
        sm_.hist_cnt[b] = 0;
        sm_.hist_mass[b] = 0;
      }
      __syncthreads();
      // One entry (no early exit: hist_add and stage_push are warp-collective).
      auto visit = [&](float z, uint32_t dk, bool in_range, int v) {
        const bool match = in_range && (dk & hi_mask) == prefix;
        // The mass only for entries still in the candidate set. A mass select
        // can skip zero-mass entries: the cumulative mass only grows at
        // positive-mass entries, so the cut (target > 0) and every entry
        // before it in sorted order (larger z) have positive mass.
        const unsigned long long m = with_mass && match ? mass_of(z, zmax) : 0ull;
        const bool in = match && (!by_mass || m != 0);
        hist_add(sm_.hist_cnt, sm_.hist_mass, (dk >> shift) & digit_mask, in, m, with_mass);
        // Entries before the chosen prefix are candidates too (positive mass
        // in a mass select: their z is above that of an in-set entry).
        if (stage_now) stage_push(sm_, in || (in_range && (dk & hi_mask) < prefix), z, v);
      };
      if (staged_) {
        for (int k0 = 0; k0 < n_staged_; k0 += kSampleThreads) {  // same trip count in every lane
          const int k = k0 + int(threadIdx.x);
          const bool valid = k < n_staged_;
          const float z = valid ? sm_.stage_z[k] : -INFINITY;
          const uint32_t dk = desc_key(z);
          visit(z, dk, valid && dk < dk_end, valid ? sm_.stage_v[k] : 0);
        }
      } else {
        for_each_group([&](int v0, const float (&x)[kVec]) {
          float z[kVec];
          uint32_t dk[kVec];
          bool in_range[kVec];
          bool need = false;  // some entry of the group may touch the histogram or the stage
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            z[j] = zval(x[j]);
            dk[j] = desc_key(z[j]);
            in_range[j] = v0 + j < ctx_.V && dk[j] < dk_end;
            need |= in_range[j] && (dk[j] & hi_mask) == prefix && (!by_mass || z[j] - zmax >= kMassCutoff);
            need |= stage_now && in_range[j] && (dk[j] & hi_mask) < prefix;
          }
          // After the first pass almost no entry is a candidate: one vote per
          // group skips the per-entry collectives (uniform over the lanes here).
          if (!__any_sync(__activemask(), need)) return;
#pragma unroll
          for (int j = 0; j < kVec; ++j) visit(z[j], dk[j], in_range[j], v0 + j);
        });
      }
      __syncthreads();
      if (stage_now && sm_.n_stage <= unsigned(kStageCap)) {  // uniform
        staged_ = true;
        n_staged_ = int(sm_.n_stage);
      }

      // Inclusive prefix over bins in ascending digit (= sorted) order.
      CountMass item[kBinsPerThread], incl[kBinsPerThread], total;
      const int b0 = int(threadIdx.x) * kBinsPerThread;
#pragma unroll
      for (int k = 0; k < kBinsPerThread; ++k) item[k] = CountMass{sm_.hist_cnt[b0 + k], sm_.hist_mass[b0 + k]};
      cub::BlockScan<CountMass, kSampleThreads>(sm_.tmp.scan_cm).InclusiveScan(item, incl, CountMassSum(), total);
      __syncthreads();
      if (by_mass && pass == 0 && target < 0.0)  // the row total: the staged entries may hold only part of it
        target = double(top_p) * double(use_mass_total_ ? mass_total_ : total.mass);
      // The chosen bin is the first non-empty one whose inclusive prefix reaches
      // the need; if rounding leaves none, the last non-empty one. Encoded so
      // that one min-reduction finds it: hits as b, misses as 2*kBins - b.
      unsigned code = 0xffffffffu;
#pragma unroll
      for (int k = 0; k < kBinsPerThread; ++k) {
        if (item[k].cnt == 0) continue;
        const bool hit = by_mass ? double(mass_before + incl[k].mass) >= target
                                 : cnt_before + incl[k].cnt >= need_cnt;
        const unsigned b = unsigned(b0 + k);
        code = min(code, hit ? b : unsigned(2 * kBins) - b);
      }
      code = cub::BlockReduce<unsigned, kSampleThreads>(sm_.tmp.min_u).Reduce(code, MinOp());
      if (threadIdx.x == 0) sm_.code = code;
      __syncthreads();
      code = sm_.code;
      const unsigned chosen = code < unsigned(kBins) ? code : unsigned(2 * kBins) - code;
#pragma unroll
      for (int k = 0; k < kBinsPerThread; ++k) {  // static indices: no local memory
        if (unsigned(b0 + k) != chosen) continue;
        Selection s;
        s.cnt_before = cnt_before + incl[k].cnt - item[k].cnt;
        s.mass_before = mass_before + incl[k].mass - item[k].mass;
        s.cnt_eq = item[k].cnt;
        s.mass_eq = item[k].mass;
        s.dk = 0;
        s.target = target;
        sm_.sel = s;
      }
      __syncthreads();
      res = sm_.sel;
      __syncthreads();
      prefix |= chosen << shift;
      hi_mask |= digit_mask << shift;
      cnt_before = res.cnt_before;
      mass_before = res.mass_before;
    }
    res.dk = prefix;
    return res;
  }

  APD_DEVICE static unsigned long long each_mass(const Selection& s) {
    return s.cnt_eq == 0 ? 0ull : s.mass_eq / s.cnt_eq;  // ties share one value: exact
  }

  // Index of the c-th (1-based) lowest-index entry with dk == thr (index order scan).
  APD_DEVICE int last_kept_tie(uint32_t thr, unsigned long long c) {
    unsigned long long seen = 0;
    if (threadIdx.x == 0) sm_.tie_last = INT32_MAX;
    __syncthreads();
    for (int base = 0; base < ctx_.V; base += kTile) {
      const int v0 = base + int(threadIdx.x) * kVec;
      bool tie[kVec] = {};
      int mine = 0;
      if (v0 < ctx_.V) {
        float x[kVec];
        src_.load4(v0, x);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          tie[j] = v0 + j < ctx_.V && desc_key(zval(x[j])) == thr;
          mine += tie[j];
        }
      }
      int before, tile_total;
      cub::BlockScan<int, kSampleThreads>(sm_.tmp.scan_i).ExclusiveSum(mine, before, tile_total);
      unsigned long long rank = seen + unsigned(before);  // ties ahead of this thread's first
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (!tie[j]) continue;
        if (++rank == c) sm_.tie_last = v0 + j;
      }
      seen += unsigned(tile_total);
      __syncthreads();  // tmp reuse; also publishes tie_last
      if (seen >= c) break;  // uniform: tile_total is the same in every thread
    }
    const int r = sm_.tie_last;
    __syncthreads();
    return r;
  }

  // Kept set = prefix of `keep` entries ending inside the ties of s.dk.
  APD_DEVICE KeptSet kept_from(const Selection& s, unsigned long long keep_ties) {
    KeptSet k;
    k.thr_dk = s.dk;
    k.tie_last = keep_ties >= s.cnt_eq ? INT64_MAX : int64_t(last_kept_tie(s.dk, keep_ties));
    return k;
  }

  // Default filter: top_k first, then top_p within those K (SEMANTICS.md).
  APD_DEVICE KeptSet kept_default(const SamplerConfig& cfg, float zmax) {
    const int V = ctx_.V;
    const int64_t K = effective_top_k(cfg.top_k, V);
    const bool topp = cfg.top_p < 1.0f;
    if (K < V) {
      const Selection sk = select(zmax, 0xffffffffu, false, topp, (unsigned long long)K, 0.0, 1.0f);
      const unsigned long long ck = (unsigned long long)K - sk.cnt_before;  // in [1, cnt_eq]
      if (!topp) return kept_from(sk, ck);
      const unsigned long long each = each_mass(sk);
      const double target = double(cfg.top_p) * (double(sk.mass_before) + double(ck) * double(each));
      if (sk.cnt_before > 0 && double(sk.mass_before) >= target) {
        // The top-p prefix ends strictly before the k-th value.
        const Selection sp = select(zmax, sk.dk, true, true, 0, target, cfg.top_p);
        const int64_t c = ties_to_reach(double(sp.mass_before), double(each_mass(sp)),
                                        int64_t(sp.cnt_eq), target);
        return kept_from(sp, (unsigned long long)c);
      }
      const int64_t c = ties_to_reach(double(sk.mass_before), double(each), int64_t(ck), target);
      return kept_from(sk, (unsigned long long)c);
    }
    const Selection sp = select(zmax, 0xffffffffu, true, true, 0, -1.0, cfg.top_p);
    const int64_t c = ties_to_reach(double(sp.mass_before), double(each_mass(sp)), int64_t(sp.cnt_eq),
                                    sp.target);
    return kept_from(sp, (unsigned long long)c);
  }

  // compat="official": top_p over the whole row with the dtype-rounded softmax
  // and the strict `> round(top_p)` cut, then top_k keeping every entry >= the
  // k-th largest value (SEMANTICS.md); the kept set is the shorter prefix.
  APD_DEVICE KeptSet kept_official(const SamplerConfig& cfg, float zmax) {
    const int V = ctx_.V;
    const int64_t K = effective_top_k(cfg.top_k, V);
    const bool topp = cfg.top_p < 1.0f;
    Selection sp{};
    int64_t c = 0, n_p = V;
    if (topp) {
      official_total_ = row_mass_total();
      const double target = official_top_p_threshold(cfg.top_p, Src::kDType) * double(kMassScale);
      sp = select(zmax, 0xffffffffu, true, true, 0, target, cfg.top_p);
      c = ties_to_reach(double(sp.mass_before), double(each_mass(sp)), int64_t(sp.cnt_eq), sp.target);
      n_p = int64_t(sp.cnt_before) + c;
      official_total_ = 0.0f;
    }
    if (K < n_p) {
      const Selection sk = select(zmax, 0xffffffffu, false, false, (unsigned long long)K, 0.0, 1.0f);
      if (int64_t(sk.cnt_before + sk.cnt_eq) < n_p) return kept_from(sk, sk.cnt_eq);  // all ties
    }
    return topp ? kept_from(sp, (unsigned long long)c) : keep_all();
  }
};

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

// Grid: B * M CTAs, CTA (b, i) = blockIdx.x = b * M + i.
template <typename T>
__global__ void __launch_bounds__(kSampleThreads) sample_draft_kernel(const SampleDraftParams p) {
  __shared__ SampleSmem sm;
  const int64_t b = int64_t(blockIdx.x) / p.M;
  const int64_t i = int64_t(blockIdx.x) % p.M;
  int64_t* out = p.draft + b * p.M + i;
  if (i >= p.valid_len[b]) {
    if (threadIdx.x == 0) *out = -1;
    return;
  }
  const DraftSource<T> src{make_row<T>(p.logits, b * p.stride_b + i * p.stride_m, p.V, p.ban_start, p.ban_end)};
  const SamplerConfig cfg = row_config(p.cfg, p.per_row, b);  // uniform over the CTA: no divergence
  const RowContext ctx{int(p.V), cfg.temperature, cfg.official, uint64_t(p.seeds[b]),
                       uint64_t(p.steps[b]), p.pos_start[b] + i};
  RowSampler<DraftSource<T>> sampler(src, ctx, sm);
  const int64_t id = cfg.temperature > 0.0f ? sampler.sample(cfg) : sampler.argmax();
  if (threadIdx.x == 0) *out = id;
}

// What mixture_target_kernel learns in its first pass over the two rows.
struct LsePass {
  float lse_d, lse_a;  // log-sum-exp of each row (over its own full length)
  float x_hint;        // m_v of one entry v < min(V_D, V_A): a lower bound of max_v m_v
  // row_lse<T, true> only, when n_staged >= 0: the default top-p's candidates
  // {z >= zmax - 16} staged in sm with the cut proven inside them, xmax =
  // max_v m_v, mass_total = the row total in 2^-40 units (RowSampler::
  // sample_staged).
  int n_staged;
  float xmax;
  double mass_total;
};

// The rest of a fused staging (row_lse<T, true>) once both lse are known:
// the exact m and z of the n staged entries (their d and a read again: a few
// hundred scattered loads, from L2), zmax, the check that the proxy's
// thresholds were safe, the row total and the cut with its proof. Returns the
// count kept, or -1 (the caller then stages from the hint as before).
// rest_m / rest_s: the fp64 sum of exp(y_v / tau - rest_m) over the
// unstaged entries of the proxy's mass window. Block-wide; uniform result.
template <typename T>
APD_DEVICE int finish_fused_stage(const RowPtr<T>& d, const RowPtr<T>& a, const MixtureRow& mix, float tau,
                                  float top_p, int n, float rest_m, double rest_s, SampleSmem& sm, float& xmax,
                                  double& mass_total) {
  constexpr int kPer = (kStageCap + kSampleThreads - 1) / kSampleThreads;
  float mk[kPer];
  float mloc = -INFINITY;
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int k = int(threadIdx.x) + q * kSampleThreads;
    mk[q] = -INFINITY;
    if (k < n) {
      const int v = sm.stage_v[k];
      mk[q] = mixture_coupled(load_float(d.p[v]), load_float(a.p[v]), mix);
      mloc = nan_max(mloc, mk[q]);
    }
  }
  const MaxArg rm = cub::BlockReduce<MaxArg, kSampleThreads>(sm.tmp.maxarg)
                        .Reduce(MaxArg{mloc, -INFINITY, INT32_MAX}, MaxArgOp());
  if (threadIdx.x == 0) sm.maxarg = rm;
  __syncthreads();
  xmax = sm.maxarg.zmax;
  __syncthreads();
  const float zmax = temper(xmax, tau);
  // The proxy y = R d + (1 - R) a differs from m + C (C = R lse_D + (1 - R)
  // lse_A) by roundings only. m <= 0 is a sum of two non-positive terms, so
  // for the entries within 32 tau of the max, |m| <= |max m| + 32 tau =: Mb,
  // and |R d|, |(1 - R) a| <= Mb + |lse|: the roundings of y, of m and of
  // z = m / tau stay below 25 u (Mb + |lse_D| + |lse_A|) (u = 2^-24) in m.
  // The staging thresholds (17 and 31 tau below the running max of y) hold
  // every entry with z >= zmax - 16 (and z >= zmax - 30 in the sums) when
  // that is at most tau: checked with a factor 64 here. The unstaged part
  // of the total comes from y: each term's relative error is below eps =
  // 32 u (...) / tau (+ 2^-22 for its fp32 expf), and the fused result is
  // used only when that bounds the error of the total by 2^-24 of the max's
  // mass: one ulp of the largest term's expf, which already may differ
  // between the device and the CPU kernels (the header's "Numbers").
  const double u = 0x1p-24;
  const double scale = double(fabsf(xmax)) + 32.0 * double(tau) + fabs(double(mix.lse_d)) + fabs(double(mix.lse_a));
  if (row_is_bad(zmax) || !(64.0 * u * scale <= double(tau))) return -1;  // uniform
  const double eps = 32.0 * u * scale / double(tau);
  // C / tau in fp64: y / tau - C / tau is z up to the roundings above.
  const double c_tau = (double(mix.R) * double(mix.lse_d) + double(mix.one_minus_R) * double(mix.lse_a)) / double(tau);
  const double rest = rest_m == -INFINITY ? 0.0 : rest_s * exp(double(rest_m) - c_tau - double(zmax));
  if (!(rest * (expm1(eps) + 0x1p-22) <= 0x1p-24)) return -1;  // uniform
  double s_exact = 0.0;
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int k = int(threadIdx.x) + q * kSampleThreads;
    if (k < n) {
      const float z = temper(mk[q], tau);
      sm.stage_z[k] = z;  // the thread's own slots: cut_stage_and_prove reads them back in this thread
      if (z - zmax >= kMassCutoff) s_exact += double(expf(z - zmax));
    }
  }
  const StageSums rs = cub::BlockReduce<StageSums, kSampleThreads>(sm.tmp.sums)
                           .Reduce(StageSums{s_exact, 0.0, -INFINITY}, StageSumsOp());
  if (threadIdx.x == 0) sm.sums = rs;
  __syncthreads();
  mass_total = (sm.sums.staged + rest) * double(kMassScale);
  __syncthreads();
  return cut_stage_and_prove(sm, n, zmax, mass_total, top_p);
}

// Log-sum-exp of the two rows in one pass (each over its own full length).
// The same pass keeps, per thread, the (d, a) pair of its largest R d + (1 - R)
// a: the order of m_v = R (d_v - lse_D) + (1 - R)(a_v - lse_A) up to fp32
// rounding, so once the lse are known m at that pair is the thread's max of m
// or within a few ulps of it. Those 512 values of distinct entries are binned
// in sm.hist_cnt (as row_zmax bins the threads' maxima) and their max is
// x_hint, so that RowSampler::sample need not read both rows again for the max.
// kStage (the default top-p alone, 0 < R < 1, tau > 0): the same pass also
// stages the default top-p's candidates, as stage_top_p_one_pass does for
// sample_draft, with y = R d + (1 - R) a standing in for m (m + C, C unknown
// until the pass ends): every entry with y >= y_run - 17 tau is staged (index
// only), the others with y >= y_run - 31 tau are summed as exp(y / tau)
// relative to a running max (fp64), where y_run is the larger of the block
// max of y over the first kU groups (one barrier) and the thread's own running
// max: the sets and sums are the same under every schedule. Then
// finish_fused_stage: one read of both rows instead of two.
template <typename T, bool kStage = false>
APD_DEVICE LsePass row_lse(const RowPtr<T>& d, const RowPtr<T>& a, float R, SampleSmem& sm, float tau = 0.0f,
                           float top_p = 1.0f) {
  for (int b = threadIdx.x; b < kBins; b += kSampleThreads) sm.hist_cnt[b] = 0;
  if (kStage && threadIdx.x == 0) sm.n_stage = 0, sm.code = 0u, sm.code_alt = 0u;
  Lse64 ad{-INFINITY, 0.0}, aa{-INFINITY, 0.0}, rest{-INFINITY, 0.0};
  float best_y = -INFINITY, best_d = -INFINITY, best_a = -INFINITY;
  const float one_minus_R = 1.0f - R;
  const int n = max(d.n, a.n), n_mix = min(d.n, a.n);
  const float c_stage = (-kStageCutoff + 1.0f) * tau, c_mass = (-kMassCutoff + 1.0f) * tau;
  // This is the pass that reads the rows from HBM: kU groups of both rows are
  // loaded before any is used (fewer for fp32, whose values would spill).
  // Entries past a row's end read as -inf, which lse64_push ignores.
  constexpr int kU = sizeof(T) == 4 ? kUnroll / 2 : kUnroll;
  float xd[kU][kVec], xa[kU][kVec];
  int base = int(threadIdx.x) * kVec;
  // The same trip count in every thread (the barriers of the staging's max
  // refreshes); groups at or past a row's end are neither loaded nor used.
  const int n_it = (n + kTile * kU - 1) / (kTile * kU);
  auto load = [&] {
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int v0 = base + u * kTile;
      if (v0 < d.n) d.load4(v0, xd[u]);
      if (v0 < a.n) a.load4(v0, xa[u]);
    }
  };
  load();
  float y_run = -INFINITY;
  bool staging = kStage;
  if (kStage) {
    // The first groups' max of y goes to the whole block before any is
    // staged (every thread, with entries or not, reaches the barriers).
    float m = -INFINITY;
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        if (base + u * kTile + j < n_mix) m = fmaxf(m, R * xd[u][j] + one_minus_R * xa[u][j]);
    __syncthreads();  // n_stage and code are zero
    y_run = share_block_max(&sm.code, m);
  }
  for (int it = 0; it < n_it; ++it) {
    float y[kU][kVec];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int v0 = base + u * kTile;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (v0 < d.n) lse64_push(ad, xd[u][j]);
        if (v0 < a.n) lse64_push(aa, xa[u][j]);
        y[u][j] = -INFINITY;
        if (v0 + j < n_mix) {  // NaN never wins; a row with one has a NaN lse anyway
          y[u][j] = R * xd[u][j] + one_minus_R * xa[u][j];
          if (y[u][j] > best_y) best_y = y[u][j], best_d = xd[u][j], best_a = xa[u][j];
          if (kStage) y_run = fmaxf(y_run, y[u][j]);
        }
      }
    }
    if (kStage && staging) {
      // Thresholds of this iteration; never -inf, so -inf entries are never taken.
      const float y_stage = fmaxf(y_run - c_stage, -FLT_MAX), y_mass = fmaxf(y_run - c_mass, -FLT_MAX);
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int v0 = base + u * kTile;
        if (v0 >= n_mix) continue;
        bool want[kVec];
        bool any = false;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          want[j] = y[u][j] >= y_stage;
          if (!want[j] && y[u][j] >= y_mass) lse64_push(rest, temper(y[u][j], tau));  // rare: a division
          any |= want[j];
        }
        if (!__any_sync(__activemask(), any)) continue;
#pragma unroll
        for (int j = 0; j < kVec; ++j) stage_push(sm, want[j], y[u][j], v0 + j);
      }
    }
    base += kTile * kU;
    if (it + 1 == n_it) break;
    // Uniform over the warp (every lane runs every iteration). An overfull
    // stage stops the staging, not the lse.
    if (kStage && staging && __shfl_sync(0xffffffffu, sm.n_stage, 0) > unsigned(kStageCap)) staging = false;
    load();
    if (kStage)  // the block max of y so far (every thread has seen iterations 0..it)
      if (unsigned* slot = refresh_slot(sm, it)) y_run = share_block_max(slot, y_run);
  }
  const Lse64 rd = cub::BlockReduce<Lse64, kSampleThreads>(sm.tmp.lse).Reduce(ad, Lse64Op());
  __syncthreads();
  const Lse64 ra = cub::BlockReduce<Lse64, kSampleThreads>(sm.tmp.lse).Reduce(aa, Lse64Op());
  if (threadIdx.x == 0) {
    sm.lse_d = lse64_value(rd);
    sm.lse_a = lse64_value(ra);
  }
  __syncthreads();  // also orders the zeroing of hist_cnt before the counts
  LsePass out{sm.lse_d, sm.lse_a, -INFINITY, -1, -INFINITY, 0.0};
  const MixtureRow mix = make_mixture_row(R, out.lse_d, out.lse_a);
  const float mine = best_y == -INFINITY ? -INFINITY : mixture_coupled(best_d, best_a, mix);
  atomicAdd(&sm.hist_cnt[desc_key(mine) >> radix_shift(0)], 1u);
  const MaxArg r =
      cub::BlockReduce<MaxArg, kSampleThreads>(sm.tmp.maxarg).Reduce(MaxArg{mine, -INFINITY, INT32_MAX}, MaxArgOp());
  if (threadIdx.x == 0) sm.maxarg = r;
  __syncthreads();
  out.x_hint = sm.maxarg.zmax;
  __syncthreads();  // sm.maxarg / tmp may be reused right after
  if (kStage) {
    const Lse64 rr = cub::BlockReduce<Lse64, kSampleThreads>(sm.tmp.lse).Reduce(rest, Lse64Op());
    if (threadIdx.x == 0) sm.sums = StageSums{0.0, rr.s, rr.m};
    __syncthreads();
    const float rest_m = sm.sums.xmax;
    const double rest_s = sm.sums.total;
    const unsigned n_st = sm.n_stage;
    __syncthreads();
    // Uniform. A NaN or infinite lse (a NaN or +inf logit): the usual path.
    if (n_st <= unsigned(kStageCap) && fabsf(out.lse_d) <= FLT_MAX && fabsf(out.lse_a) <= FLT_MAX)
      out.n_staged = finish_fused_stage(d, a, mix, tau, top_p, int(n_st), rest_m, rest_s, sm, out.xmax,
                                        out.mass_total);
  }
  return out;
}

// Target ids of mixture_accept; n_accept follows in accept_prefix_kernel (csrc/cuda/sampling.cu).
template <typename T>
__global__ void __launch_bounds__(kSampleThreads) mixture_target_kernel(const MixtureAcceptParams p) {
  __shared__ SampleSmem sm;
  const int64_t b = int64_t(blockIdx.x) / p.M;
  const int64_t i = int64_t(blockIdx.x) % p.M;
  int64_t* out = p.target + b * p.M + i;
  if (i >= p.valid_len[b]) {
    if (threadIdx.x == 0) *out = -1;
    return;
  }
  const RowPtr<T> d = make_row<T>(p.dllm_logits, b * p.d_stride_b + i * p.d_stride_m, p.V_D, p.ban_start, p.ban_end);
  const RowPtr<T> a = make_row<T>(p.ar_logits, b * p.a_stride_b + i * p.a_stride_m, p.V_A, p.ban_start, p.ban_end);
  const SamplerConfig cfg = row_config(p.cfg, p.per_row, b);  // uniform over the CTA: no divergence
  const MixtureSettings mix = row_mixture(p, cfg, b);
  const RowContext ctx{int(p.V_D < p.V_A ? p.V_D : p.V_A), cfg.temperature, cfg.official,
                       uint64_t(p.seeds[b]), uint64_t(p.steps[b]), p.pos_start[b] + i};
  int64_t id;
  if (mix.acceptance == Acceptance::kArgmax) {
    const ArgmaxSource<T> src{d, a, mix.R, mix.one_minus_R, cfg.official};
    id = RowSampler<ArgmaxSource<T>>(src, ctx, sm).argmax();
  } else {
    // R is 0 or 1: m is one row as it is, no lse (mixture_coupled) and no hint.
    const bool mixed = mix.R != 0.0f && mix.R != 1.0f;
    // The paper's setting (the default top-p alone): staged in the lse pass.
    const bool fused = mixed && cfg.temperature > 0.0f && !cfg.official && cfg.top_p < 1.0f &&
                       effective_top_k(cfg.top_k, ctx.V) == ctx.V;
    const LsePass l = !mixed  ? LsePass{0.0f, 0.0f, NAN, -1, -INFINITY, 0.0}
                      : fused ? row_lse<T, true>(d, a, mix.R, sm, cfg.temperature, cfg.top_p)
                              : row_lse<T>(d, a, mix.R, sm);
    const CoupledSource<T> src{d, a, make_mixture_row(mix.R, l.lse_d, l.lse_a)};
    RowSampler<CoupledSource<T>> sampler(src, ctx, sm);
    if (l.n_staged >= 0)
      id = sampler.sample_staged(cfg, l.xmax, l.n_staged, l.mass_total);
    else
      id = cfg.temperature > 0.0f ? sampler.sample(cfg, l.x_hint) : sampler.argmax();
  }
  if (threadIdx.x == 0) *out = id;
}

// One dtype's launch of each row kernel. Each is instantiated in exactly one
// small translation unit, csrc/cuda/sampling_{draft,mixture}_<dtype>.cu (six
// in all, so that a build compiles them in parallel: one TU holding all six
// kernels was nearly the whole CUDA build); csrc/cuda/sampling.cu holds the
// launchers and the accept scan and instantiates none of them (extern below).
template <typename T>
cudaError_t launch_draft_rows(const SampleDraftParams& p, dim3 grid, cudaStream_t stream) {
  return launch(sample_draft_kernel<T>, grid, dim3(unsigned(kSampleThreads)), 0, stream, p);
}

template <typename T>
cudaError_t launch_mixture_rows(const MixtureAcceptParams& p, dim3 grid, cudaStream_t stream) {
  return launch(mixture_target_kernel<T>, grid, dim3(unsigned(kSampleThreads)), 0, stream, p);
}

#define APD_SAMPLING_EXTERN(T)                                                                       \
  extern template cudaError_t launch_draft_rows<T>(const SampleDraftParams&, dim3, cudaStream_t); \
  extern template cudaError_t launch_mixture_rows<T>(const MixtureAcceptParams&, dim3, cudaStream_t);
APD_SAMPLING_EXTERN(float)
APD_SAMPLING_EXTERN(bf16_t)
APD_SAMPLING_EXTERN(fp16_t)
#undef APD_SAMPLING_EXTERN

}  // namespace cuda
}  // namespace apd
