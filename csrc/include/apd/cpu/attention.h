// CPU masked-window attention (DESIGN.md §5): FlashAttention-style online
// softmax in fp32, OpenMP over (sequence, kv head, query block), torch-free.
//
// One task = one sequence b, one kv head, BM query rows, and the G = Hq / Hkv
// query heads that share the kv head (GQA packing): its R = BM * G rows walk
// the visible keys in blocks of 64, so each K/V block is converted to fp32
// once and reused by all R rows. Scores live in the log2 domain (q is
// pre-multiplied by scale * log2(e)) so the softmax needs only exp2.
//
// The fp32 inner kernels use GCC/Clang vector extensions (8 floats) and are
// compiled twice on x86-64 (AVX2+FMA and baseline SSE2), picked at load time;
// fp16 rows are decoded with F16C where the CPU has it.
//
// NaN (docs/SEMANTICS.md, as SDPA): a NaN in a row's q or in a key it sees
// makes its scores NaN; the running max (a > comparison) skips them, and p,
// the running sum l and O turn NaN, so the row comes out NaN (the epilogue
// writes zeros only for l == 0, a row that saw no key). A NaN in a visible
// value makes some dims of O NaN; the epilogue spreads it to the whole row. A key the row does
// not see is masked before the max and its p is 0, but P V would add 0 * NaN
// for a NaN (or inf) V row: so in a block that some row sees only in part
// (the causal diagonal; bidirectional rows share kv_len and never do) the V
// rows past the smallest visible count are checked, a non-finite one is
// zeroed, and each row that does see it is marked NaN. Elsewhere no extra
// work.
#pragma once
#if defined(_OPENMP)
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define APD_CPU_HAVE_F16C_PATH 1
#endif

#include "apd/attention_params.h"
#include "apd/common.h"

// Predefine APD_CPU_MULTIVERSION (empty) to build only the baseline variant
// (tests/cpp/test_attention_cpu.cpp does, to cover it on an AVX2 machine).
#if !defined(APD_CPU_MULTIVERSION)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define APD_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define APD_CPU_MULTIVERSION
#endif
#endif
#define APD_CPU_ALWAYS_INLINE inline __attribute__((always_inline))

namespace apd::cpu {
namespace attn {

constexpr int kBlockN = 64;  // keys per block (columns of S)
constexpr int kRowTile = 6;  // rows per register tile: 6 x 2 accumulators + 3 operands = 15 ymm
constexpr int kRowAlign = 2; // packed rows are padded to a multiple of this (tail tiles of 2)
constexpr int kDAlign = 16;  // head dim is zero-padded to a multiple of this (2 vectors)

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

// Unaligned vector load / store / broadcast, written as macros and reference
// parameters: a function returning an 8-float vector by value draws GCC's
// (harmless here) ABI note in the non-AVX clone.
#define APD_LOAD8(v, ptr) std::memcpy(&(v), (ptr), sizeof(f32x8))
#define APD_STORE8(ptr, v) std::memcpy((ptr), &(v), sizeof(f32x8))
#define APD_SPLAT8(x) (f32x8{(x), (x), (x), (x), (x), (x), (x), (x)})  // x: side-effect free

// x <- 2^x for x <= 0, inputs below -126 treated as -126 (2^-126 is far below
// any softmax weight that matters next to the row max's weight of 1). Round to
// nearest splits x = n + f, |f| <= 1/2; 2^f is its degree-7 Taylor series
// (relative error < 1e-8), 2^n is built in the exponent bits.
APD_CPU_ALWAYS_INLINE void exp2_nonpos(f32x8& x) {
  x = x < -126.0f ? APD_SPLAT8(-126.0f) : x;
  const f32x8 magic = APD_SPLAT8(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const f32x8 n = (x + magic) - magic;
  const f32x8 f = x - n;
  f32x8 p = APD_SPLAT8(1.5252733804059841e-05f);  // ln2^7 / 7!
  p = p * f + 1.5403530393381606e-04f;              // ln2^6 / 6!
  p = p * f + 1.3333558146428443e-03f;              // ln2^5 / 5!
  p = p * f + 9.6181291076284772e-03f;              // ln2^4 / 4!
  p = p * f + 5.5504108664821580e-02f;              // ln2^3 / 3!
  p = p * f + 2.4022650695910071e-01f;              // ln2^2 / 2!
  p = p * f + 6.9314718055994531e-01f;              // ln2
  p = p * f + 1.0f;
  const i32x8 e = (__builtin_convertvector(n, i32x8) + 127) << 23;
  x = p * (f32x8)e;  // vector cast = bit reinterpretation: e holds the bits of 2^n
}

// S[ROWS, 64] = Q[ROWS, Dp] . Kt[Dp, 64] for ROWS rows starting at q / s.
// Each score is summed in chunks of kDChunk products, the chunk sums added
// into S: one sequential chain of D = 256 FMAs per score put fp32 outside the
// tolerance rule (max err 1.45e-6 against twice SDPA's 5.0e-7, 11 of 80
// seeds of the D = 256 case failed); chunks cut the chain to D / 32 + 32.
// S round-trips through L1 once per chunk; the register tile stays 15 ymm.
constexpr int kDChunk = 32;

template <int ROWS>
APD_CPU_ALWAYS_INLINE void scores_tile(const float* __restrict q, const float* __restrict kt, float* __restrict s,
                                       int dp) {
  for (int c0 = 0; c0 < kBlockN; c0 += 16) {
    for (int d0 = 0; d0 < dp; d0 += kDChunk) {
      const int d1 = std::min(dp, d0 + kDChunk);
      f32x8 acc[ROWS][2] = {};
      const float* kc = kt + int64_t(d0) * kBlockN + c0;
      const float* qd = q + d0;
      for (int d = d0; d < d1; ++d, kc += kBlockN, ++qd) {
        f32x8 k0, k1;
        APD_LOAD8(k0, kc);
        APD_LOAD8(k1, kc + 8);
#pragma GCC unroll 8
        for (int i = 0; i < ROWS; ++i) {
          const f32x8 qi = APD_SPLAT8(qd[i * dp]);
          acc[i][0] += qi * k0;
          acc[i][1] += qi * k1;
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < ROWS; ++i) {
        if (d0 > 0) {
          f32x8 t0, t1;
          APD_LOAD8(t0, s + i * kBlockN + c0);
          APD_LOAD8(t1, s + i * kBlockN + c0 + 8);
          acc[i][0] += t0;
          acc[i][1] += t1;
        }
        APD_STORE8(s + i * kBlockN + c0, acc[i][0]);
        APD_STORE8(s + i * kBlockN + c0 + 8, acc[i][1]);
      }
    }
  }
}

// S[R, 64] = Q[R, Dp] . Kt[Dp, 64]; R % kRowAlign == 0, Dp % kDAlign == 0.
APD_CPU_MULTIVERSION
static void scores_block(const float* __restrict q, const float* __restrict kt, float* __restrict s,
                         int rows, int dp) {
  int r = 0;
  for (; r + kRowTile <= rows; r += kRowTile) scores_tile<kRowTile>(q + int64_t(r) * dp, kt, s + r * kBlockN, dp);
  for (; r < rows; r += 2) scores_tile<2>(q + int64_t(r) * dp, kt, s + r * kBlockN, dp);
}

// Online-softmax update of each row of S in place: row r sees its first
// n_vis[r] columns; S becomes P = 2^(S - m_new) (0 on hidden columns),
// alpha[r] = 2^(m_old - m_new) rescales the running sum l and accumulator.
APD_CPU_MULTIVERSION
static void softmax_block(float* __restrict s, const int* __restrict n_vis, float* __restrict m,
                          float* __restrict l, float* __restrict alpha, int rows) {
  const f32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const f32x8 neg_inf = APD_SPLAT8(-std::numeric_limits<float>::infinity());
  const f32x8 zero = {};
  for (int r = 0; r < rows; ++r) {
    float* sr = s + r * kBlockN;
    const int nv = n_vis[r];
    if (nv <= 0) {  // nothing visible in this block: the row's state is unchanged
      std::memset(sr, 0, sizeof(float) * kBlockN);
      alpha[r] = 1.0f;
      continue;
    }
    const f32x8 limit = APD_SPLAT8(float(nv));
    f32x8 vmax = neg_inf;
    for (int c = 0; c < kBlockN; c += 8) {
      f32x8 x;
      APD_LOAD8(x, sr + c);
      x = (lane + float(c)) < limit ? x : neg_inf;
      vmax = x > vmax ? x : vmax;
    }
    float bmax = vmax[0];
    for (int i = 1; i < 8; ++i) bmax = std::max(bmax, float(vmax[i]));
    const float m_new = std::max(m[r], bmax);
    alpha[r] = std::exp2(m[r] - m_new);  // m_old = -inf on the first block -> 0
    f32x8 sum = {};
    for (int c = 0; c < kBlockN; c += 8) {
      f32x8 p;
      APD_LOAD8(p, sr + c);
      p -= m_new;
      exp2_nonpos(p);
      p = (lane + float(c)) < limit ? p : zero;
      sum += p;
      APD_STORE8(sr + c, p);
    }
    float total = 0.0f;
    for (int i = 0; i < 8; ++i) total += sum[i];
    l[r] = l[r] * alpha[r] + total;
    m[r] = m_new;
  }
}

// O[ROWS, Dp] = alpha * O + P[ROWS, :nb] . V[:nb, Dp] for ROWS rows starting at p / o.
template <int ROWS>
APD_CPU_ALWAYS_INLINE void pv_tile(const float* __restrict p, const float* __restrict v,
                                   const float* __restrict alpha, float* __restrict o, int nb, int dp) {
  for (int c0 = 0; c0 < dp; c0 += 16) {
    f32x8 acc[ROWS][2];
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) {
      const f32x8 a = APD_SPLAT8(alpha[i]);
      APD_LOAD8(acc[i][0], o + int64_t(i) * dp + c0);
      APD_LOAD8(acc[i][1], o + int64_t(i) * dp + c0 + 8);
      acc[i][0] *= a;
      acc[i][1] *= a;
    }
    const float* vn = v + c0;
    const float* pn = p;
    for (int n = 0; n < nb; ++n, vn += dp, ++pn) {
      f32x8 v0, v1;
      APD_LOAD8(v0, vn);
      APD_LOAD8(v1, vn + 8);
#pragma GCC unroll 8
      for (int i = 0; i < ROWS; ++i) {
        const f32x8 pi = APD_SPLAT8(pn[i * kBlockN]);
        acc[i][0] += pi * v0;
        acc[i][1] += pi * v1;
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) {
      APD_STORE8(o + int64_t(i) * dp + c0, acc[i][0]);
      APD_STORE8(o + int64_t(i) * dp + c0 + 8, acc[i][1]);
    }
  }
}

// O[R, Dp] = alpha * O + P[R, :nb] . V[:nb, Dp]; R % kRowAlign == 0.
APD_CPU_MULTIVERSION
static void pv_block(const float* __restrict p, const float* __restrict v, const float* __restrict alpha,
                     float* __restrict o, int rows, int nb, int dp) {
  int r = 0;
  for (; r + kRowTile <= rows; r += kRowTile)
    pv_tile<kRowTile>(p + r * kBlockN, v, alpha + r, o + int64_t(r) * dp, nb, dp);
  for (; r < rows; r += 2) pv_tile<2>(p + r * kBlockN, v, alpha + r, o + int64_t(r) * dp, nb, dp);
}

// Query rows per task: about 128 packed rows (BM * G) keep a task's fp32
// working set in L2 while amortising each K/V block over many rows; fewer
// rows when that leaves threads idle (rows never change any result: each row
// walks the same 64-key blocks in the same order whatever the grouping).
inline int64_t choose_block_m(const WindowAttentionParams& p, int nthreads) {
  const int64_t g = p.Hq / p.Hkv;
  int64_t bm = std::max<int64_t>(1, 128 / g);
  bm = std::min<int64_t>(bm, std::max<int64_t>(p.Lq, 1));
  while (bm > 1 && p.B * p.Hkv * ceil_div<int64_t>(p.Lq, bm) < 2 * int64_t(nthreads)) bm = (bm + 1) / 2;
  const int64_t nqb = ceil_div<int64_t>(std::max<int64_t>(p.Lq, 1), bm);
  return ceil_div<int64_t>(std::max<int64_t>(p.Lq, 1), nqb);  // even out the blocks
}

// One contiguous row of n elements to fp32. float and bf16 loops vectorise
// as written; fp16 uses the F16C instruction where the CPU has it (the
// portable decoder in common.h branches on the exponent).
inline void convert_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, sizeof(float) * n); }
inline void convert_row(const bf16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}
#if defined(APD_CPU_HAVE_F16C_PATH)
__attribute__((target("avx,f16c"))) inline void convert_row_f16c(const fp16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}
#endif
inline void convert_row(const fp16_t* src, float* dst, int64_t n) {
#if defined(APD_CPU_HAVE_F16C_PATH)
  static const bool has_f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  if (has_f16c) return convert_row_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// Per-thread fp32 scratch of one task.
struct Workspace {
  std::vector<float> q, kt, v, s, o, m, l, alpha, row;
  std::vector<int64_t> limit;  // visible keys [0, limit) of each packed row
  std::vector<int> n_vis;      // of those, how many fall in the current block
  std::vector<uint8_t> nan_row;  // the row sees a non-finite V row of a partly visible block
  std::vector<uint8_t> v_bad;    // [kBlockN] that V row of the block was non-finite (zeroed)
  Workspace(int64_t rows, int64_t dp)
      : q(rows * dp), kt(dp * kBlockN), v(kBlockN * dp), s(rows * kBlockN), o(rows * dp), m(rows), l(rows),
        alpha(rows), row(dp), limit(rows), n_vis(rows), nan_row(rows), v_bad(kBlockN) {}
};

// Keys [lo, nb) of the block are hidden from some valid row: a non-finite V
// row among them is zeroed (0 * NaN would reach the rows that do not see it)
// and every row that does see it (n < n_vis[r]) is marked NaN.
inline void mask_nonfinite_v(Workspace& w, int rows, int lo, int nb, int64_t D, int64_t dp) {
  bool any = false;
  for (int n = lo; n < nb; ++n) {
    float* vs = w.v.data() + int64_t(n) * dp;
    bool bad = false;
    for (int64_t d = 0; d < D; ++d) bad |= !std::isfinite(vs[d]);
    w.v_bad[n] = bad;
    if (bad) std::fill(vs, vs + D, 0.0f);
    any |= bad;
  }
  if (!any) return;
  for (int r = 0; r < rows; ++r)
    for (int n = lo; n < w.n_vis[r]; ++n) w.nan_row[r] |= w.v_bad[n];
}

template <typename T>
void run_task(const WindowAttentionParams& p, Workspace& w, int64_t b, int64_t hkv, int64_t j0, int64_t bm,
              int64_t rows_padded, int64_t dp) {
  const T* q = static_cast<const T*>(p.q);
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  T* out = static_cast<T*>(p.out);
  const int64_t g = p.Hq / p.Hkv, D = p.D;
  const int64_t q_start = p.q_start[b], q_len = p.q_len[b], kv_len = p.kv_len[b];
  const int64_t rows_here = std::min(bm, p.Lq - j0);  // rows of this block inside [0, Lq)
  const float qscale = p.scale * 1.4426950408889634f;  // log2(e): scores in the log2 domain

  // Row r = i * G + gi: query row j0 + i, query head hkv * G + gi.
  int64_t kend = 0;
  for (int64_t r = 0; r < rows_padded; ++r) {
    const int64_t i = r / g, j = j0 + i;
    int64_t lim = 0;
    if (i < rows_here && j < q_len) lim = p.causal ? std::min(kv_len, q_start + j + 1) : kv_len;
    lim = std::max<int64_t>(lim, 0);
    w.limit[r] = lim;
    kend = std::max(kend, lim);
    w.m[r] = -std::numeric_limits<float>::infinity();
    w.l[r] = 0.0f;
    w.nan_row[r] = 0;
    if (lim > 0) {
      const T* qr = q + b * p.q_stride_b + j * p.q_stride_l + (hkv * g + r % g) * p.q_stride_h;
      float* qs = w.q.data() + r * dp;
      convert_row(qr, qs, D);
      for (int64_t d = 0; d < D; ++d) qs[d] *= qscale;
    }
  }
  std::fill(w.o.begin(), w.o.end(), 0.0f);

  const int rows = int(rows_padded), dpi = int(dp);
  for (int64_t k0 = 0; k0 < kend; k0 += kBlockN) {
    const int nb = int(std::min<int64_t>(kBlockN, kend - k0));
    // K block, transposed to [Dp, 64] so that a score tile is a row of FMAs;
    // columns >= nb keep stale values, which n_vis masks out of the softmax.
    for (int n = 0; n < nb; ++n) {
      const T* kr = kc + b * p.k_stride_b + (k0 + n) * p.k_stride_l + hkv * p.k_stride_h;
      const T* vr = vc + b * p.v_stride_b + (k0 + n) * p.v_stride_l + hkv * p.v_stride_h;
      float* vs = w.v.data() + int64_t(n) * dp;
      if constexpr (std::is_same_v<T, fp16_t>) {  // decode contiguously, then scatter
        convert_row(kr, w.row.data(), D);
        for (int64_t d = 0; d < D; ++d) w.kt[d * kBlockN + n] = w.row[d];
      } else {
        for (int64_t d = 0; d < D; ++d) w.kt[d * kBlockN + n] = to_float(kr[d]);
      }
      convert_row(vr, vs, D);
    }
    // Next block's K/V rows (strided by the cache layout) start their trip
    // from memory while this block computes.
    const int64_t nb_next = std::min<int64_t>(kBlockN, kend - k0 - kBlockN);
    for (int64_t n = 0; n < nb_next; ++n) {
      const char* kr = reinterpret_cast<const char*>(kc + b * p.k_stride_b + (k0 + kBlockN + n) * p.k_stride_l +
                                                     hkv * p.k_stride_h);
      const char* vr = reinterpret_cast<const char*>(vc + b * p.v_stride_b + (k0 + kBlockN + n) * p.v_stride_l +
                                                     hkv * p.v_stride_h);
      for (int64_t off = 0; off < D * int64_t(sizeof(T)); off += 64) {
        __builtin_prefetch(kr + off);
        __builtin_prefetch(vr + off);
      }
    }
    int lo = nb;  // smallest visible count in this block over the valid rows
    for (int r = 0; r < rows; ++r) {
      w.n_vis[r] = int(std::clamp<int64_t>(w.limit[r] - k0, 0, nb));
      if (w.limit[r] > 0) lo = std::min(lo, w.n_vis[r]);
    }
    if (lo < nb) mask_nonfinite_v(w, rows, lo, nb, D, dp);
    scores_block(w.q.data(), w.kt.data(), w.s.data(), rows, dpi);
    softmax_block(w.s.data(), w.n_vis.data(), w.m.data(), w.l.data(), w.alpha.data(), rows);
    pv_block(w.s.data(), w.v.data(), w.alpha.data(), w.o.data(), rows, nb, dpi);
  }

  for (int64_t r = 0; r < rows_here * g; ++r) {
    const int64_t j = j0 + r / g, h = hkv * g + r % g;
    T* orow = out + ((b * p.Lq + j) * p.Hq + h) * D;
    // No visible key (padding row, or a row the wrapper's checks rule out),
    // l == 0: zeros. l NaN (a NaN score) gives NaN, as does a marked row,
    // and a NaN in a visible value (NaN in some dims of O) spreads to the
    // whole row.
    const float l = w.l[r];
    const float* os = w.o.data() + r * dp;
    bool nan = w.nan_row[r] != 0;
    for (int64_t d = 0; d < D; ++d) nan |= std::isnan(os[d]);
    const float inv = nan ? std::numeric_limits<float>::quiet_NaN() : (l != 0.0f ? 1.0f / l : 0.0f);
    for (int64_t d = 0; d < D; ++d) orow[d] = from_float<T>(l != 0.0f ? os[d] * inv : 0.0f);
  }
}

}  // namespace attn

// out[b, j, h, :] = softmax over the visible keys of (q . k) * scale, times v.
// Preconditions (checked by the caller): Hq % Hkv == 0, 0 <= q_len <= Lq,
// q_start >= 0, q_start + q_len <= kv_len <= Lmax, stride 1 along D, out contiguous.
template <typename T>
void window_attention(const WindowAttentionParams& p) {
  using namespace attn;
  if (p.B <= 0 || p.Lq <= 0 || p.Hq <= 0 || p.D <= 0) return;
#if defined(_OPENMP)
  const int nthreads = omp_get_max_threads();
#else
  const int nthreads = 1;
#endif
  const int64_t g = p.Hq / p.Hkv;
  const int64_t bm = choose_block_m(p, nthreads);
  const int64_t nqb = ceil_div<int64_t>(p.Lq, bm);
  const int64_t rows_padded = ceil_div<int64_t>(bm * g, kRowAlign) * kRowAlign;
  const int64_t dp = ceil_div<int64_t>(p.D, kDAlign) * kDAlign;
  const int64_t ntasks = p.B * p.Hkv * nqb;
#if defined(_OPENMP)
#pragma omp parallel num_threads(int(std::min<int64_t>(nthreads, ntasks)))
#endif
  {
    Workspace w(rows_padded, dp);  // zero-filled: the padding of Q, K and V stays 0
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t t = 0; t < ntasks; ++t) {
      const int64_t qb = t % nqb, hkv = (t / nqb) % p.Hkv, b = t / (nqb * p.Hkv);
      run_task<T>(p, w, b, hkv, qb * bm, bm, rows_padded, dp);
    }
  }
}

// Dispatch on the runtime dtype tag.
inline void window_attention(const WindowAttentionParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: window_attention<float>(p); break;
    case DType::kBFloat16: window_attention<bf16_t>(p); break;
    case DType::kFloat16: window_attention<fp16_t>(p); break;
  }
}

}  // namespace apd::cpu
