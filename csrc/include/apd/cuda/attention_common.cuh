// Pieces shared by the window_attention CUDA kernels: the device-side argument
// block, element loads/stores, warp reductions, the per-row visibility rule
// and the split-KV combine kernel.
//
// Conventions every kernel follows (DESIGN.md §5):
//  * GQA packing. G = Hq / Hkv query heads share one kv head. A CTA works on
//    one (b, kv head) and a tile of block_m "packed rows"; packed row r of
//    that kv head is query position r / G, query head kvh * G + r % G. All G
//    heads of a position are thus next to each other, and every K/V tile a
//    CTA stages is used by all of them.
//  * Scores are kept in log2 units: Q is multiplied by scale * log2(e) once,
//    softmax uses exp2f, and the lse written for the combine is base 2.
//  * Row j of sequence b is valid iff j < q_len[b]; it sees keys
//    [0, kv_len[b]) (bidirectional) or [0, min(kv_len[b], q_start[b] + j + 1))
//    (causal). q_len and kv_len are clamped to [0, Lq] and [0, Lmax] on the
//    device, so bad values can give wrong numbers but never wild reads.
//  * Split-KV, per sequence (apd/attention_split.h): sequence b takes n_b
//    splits of per_b whole key tiles, from the device profile, the tiles,
//    the head shapes and its own q_len[b] / kv_len[b] only, so that a
//    request's reduction order is the same in every batch (batch
//    invariance, DESIGN.md §8). Grid x holds each (b, kv head)'s CTAs: an
//    unsplit sequence (n_b = 1) has one per q tile of the padded window and
//    writes `out` itself, padding rows included; a split one has one per
//    (split s, q tile t < q_tiles_b) at x = s * q_tiles_b + t (neighbouring
//    CTAs share a split's K / V in L2), covers keys [s chunk_b, (s + 1)
//    chunk_b) and writes, for its valid rows, the normalised partial output
//    rounded to the input dtype (half the bytes of fp32 for bf16 / fp16; one
//    extra rounding of a value in [-max|v|, max|v|]) and its lse (fp32, -inf
//    when it saw no key) to workspace slot x of (b, kv head); the combine
//    kernel merges its n_b splits and writes its padding rows. CTAs past a
//    sequence's own count exit at once. q_len and kv_len are clamped first,
//    so a bad value cannot make the rule read past the grid or the workspace.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "apd/attention_launch.h"
#include "apd/common.h"
#include "apd/cuda/launch.cuh"

namespace apd {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;

// Device-side arguments (a by-value kernel parameter).
struct AttnArgs {
  const void* q;  // [B, Lq, Hq, D]
  const void* k;  // [B, Lmax, Hkv, D]
  const void* v;  // [B, Lmax, Hkv, D]
  void* out;      // [B, Lq, Hq, D] contiguous
  void* ws_o;     // [S, B, Lq, Hq, D] partials, input dtype (split only)
  float* ws_lse;  // [S, B, Lq, Hq] fp32, base-2 lse (split only)
  const int64_t* q_start;  // [B]
  const int64_t* q_len;    // [B]
  const int64_t* kv_len;   // [B]
  int64_t q_sb, q_sl, q_sh;  // element strides
  int64_t k_sb, k_sl, k_sh;
  int64_t v_sb, v_sl, v_sh;
  int B, Lq, Hq, Hkv, G, D, Lmax;
  SplitRule split;    // the per-sequence split rule (apd/attention_split.h)
  int q_tiles;        // q tiles of the padded window: CTAs of an unsplit sequence per kv head
  int ws_items;       // workspace slots per (b, kv head): >= q_tiles_b * n_b of every split sequence
  float scale_log2;   // scale * log2(e)
  bool causal;
  bool q_vec, k_vec, v_vec;  // 16-byte vector loads are aligned for this tensor
};

// ---------------------------------------------------------------------------
// Element conversion and 8-element loads (D is a multiple of 8, so a row is a
// whole number of 8-element chunks; `vec` says they are 16-byte aligned).
// ---------------------------------------------------------------------------
APD_DEVICE float load_elem(const float* p) { return *p; }
APD_DEVICE float load_elem(const bf16_t* p) {
  return __uint_as_float(uint32_t(reinterpret_cast<const uint16_t*>(p)[0]) << 16);
}
APD_DEVICE float load_elem(const fp16_t* p) {
  return __half2float(__ushort_as_half(reinterpret_cast<const uint16_t*>(p)[0]));
}

APD_DEVICE void unpack2(uint32_t w, float* f, bf16_t) {
  f[0] = __uint_as_float(w << 16);
  f[1] = __uint_as_float(w & 0xffff0000u);
}
APD_DEVICE void unpack2(uint32_t w, float* f, fp16_t) {
  f[0] = __half2float(__ushort_as_half(uint16_t(w & 0xffffu)));
  f[1] = __half2float(__ushort_as_half(uint16_t(w >> 16)));
}

template <typename T>
APD_DEVICE void load8(const T* p, float (&f)[8], bool vec) {
  if constexpr (sizeof(T) == 4) {
    if (vec) {
      const float4 a = reinterpret_cast<const float4*>(p)[0];
      const float4 b = reinterpret_cast<const float4*>(p)[1];
      f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
      f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
      return;
    }
  } else {
    if (vec) {
      const uint4 u = *reinterpret_cast<const uint4*>(p);
      unpack2(u.x, f + 0, T{});
      unpack2(u.y, f + 2, T{});
      unpack2(u.z, f + 4, T{});
      unpack2(u.w, f + 6, T{});
      return;
    }
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) f[e] = load_elem(p + e);
}

APD_DEVICE void store_elem(float* p, float x) { *p = x; }
APD_DEVICE void store_elem(bf16_t* p, float x) {
  *reinterpret_cast<uint16_t*>(p) = __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
APD_DEVICE void store_elem(fp16_t* p, float x) {
  *reinterpret_cast<uint16_t*>(p) = __half_as_ushort(__float2half_rn(x));
}

// ---------------------------------------------------------------------------
// Warp reductions (all 32 lanes must take part).
// ---------------------------------------------------------------------------
APD_DEVICE float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
APD_DEVICE float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---------------------------------------------------------------------------
// Per-sequence bounds.
// ---------------------------------------------------------------------------
struct SeqInfo {
  int q_len;     // clamped to [0, Lq]
  int kv_len;    // clamped to [0, Lmax]
  int64_t q_start;
};

APD_DEVICE SeqInfo load_seq(const AttnArgs& a, int b) {
  SeqInfo s;
  const int64_t ql = a.q_len[b], kl = a.kv_len[b];
  s.q_len = int(ql < 0 ? 0 : (ql > a.Lq ? a.Lq : ql));
  s.kv_len = int(kl < 0 ? 0 : (kl > a.Lmax ? a.Lmax : kl));
  s.q_start = a.q_start[b];
  return s;
}

// Number of visible keys of query position `pos` (assumed < q_len).
APD_DEVICE int key_limit(const AttnArgs& a, const SeqInfo& s, int pos) {
  if (!a.causal) return s.kv_len;
  const int64_t lim = s.q_start + pos + 1;
  return lim <= 0 ? 0 : (lim < s.kv_len ? int(lim) : s.kv_len);
}

// What one CTA does for sequence b: the q tile at packed row row0, split
// `split` of `nsplit`, keys [split * chunk, (split + 1) * chunk) (before the
// causal limit); `slot` is its workspace slot when nsplit > 1. cta_work
// returns false for a CTA past the sequence's own count (it exits). Uniform
// over the CTA.
struct CtaWork {
  int64_t row0;
  int split, nsplit, chunk;
  int slot;
};

// q tiles of a sequence's valid rows.
APD_DEVICE int seq_q_tiles(const AttnArgs& a, const SeqInfo& s) {
  return int((int64_t(s.q_len) * a.G + a.split.block_m - 1) / a.split.block_m);
}

APD_DEVICE bool cta_work(const AttnArgs& a, const SeqInfo& s, int x, CtaWork& w) {
  int n = 1;
  w.chunk = split_tiles(a.split, s.q_len, s.kv_len, &n) * a.split.block_n;
  w.nsplit = n;
  if (n == 1) {
    if (x >= a.q_tiles) return false;
    w.row0 = int64_t(x) * a.split.block_m;
    w.split = 0;
    w.slot = 0;
    return true;
  }
  const int qt = seq_q_tiles(a, s);  // >= 1: n > 1 needs q_len >= 1
  if (int64_t(x) >= int64_t(qt) * n || x >= a.ws_items) return false;
  w.split = x / qt;
  w.row0 = int64_t(x % qt) * a.split.block_m;
  w.slot = x;
  return true;
}

// Workspace row of packed row r (< block_m) of slot x of (b, kv head).
APD_DEVICE int64_t ws_row(const AttnArgs& a, int b, int kvh, int x, int r) {
  return ((int64_t(b) * a.Hkv + kvh) * a.ws_items + x) * a.split.block_m + r;
}

// Key range [kb, ke) of one CTA: its split intersected with the keys that the
// last valid position of its packed-row tile can see. Uniform over the CTA.
APD_DEVICE void cta_key_range(const AttnArgs& a, const SeqInfo& s, const CtaWork& w, int block_m, int& kb,
                              int& ke) {
  const int64_t p_first = w.row0 / a.G;
  int64_t p_last = (w.row0 + block_m - 1) / a.G;
  if (p_last > s.q_len - 1) p_last = s.q_len - 1;
  const int max_limit = p_first <= p_last ? key_limit(a, s, int(p_last)) : 0;
  const int64_t b0 = int64_t(w.split) * w.chunk;
  kb = b0 < max_limit ? int(b0) : max_limit;
  const int64_t e = b0 + w.chunk;
  ke = e < max_limit ? int(e) : max_limit;
  if (ke < kb) ke = kb;
}

// ---------------------------------------------------------------------------
// Split-KV combine: one warp per (b, position, query head) row of a split
// sequence (n_b > 1; the attention kernel wrote the unsplit ones), over its
// n_b splits in split order:
//   out = sum_s w_s * o_s / sum_s w_s,  w_s = exp2(lse_s - max_s lse_s).
// ---------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(256) window_attention_combine_kernel(const AttnArgs a) {
  const int64_t rows = int64_t(a.B) * a.Lq * a.Hq;
  const int64_t row = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warp
  const int hq = int(row % a.Hq);
  const int pos = int((row / a.Hq) % a.Lq);
  const int b = int(row / (int64_t(a.Hq) * a.Lq));
  const SeqInfo s = load_seq(a, b);
  const int nsp = row_splits(a.split, s.q_len, s.kv_len);
  if (nsp == 1) return;  // written by the attention kernel
  T* o = static_cast<T*>(a.out) + row * a.D;
  if (pos >= s.q_len) {
    for (int d = lane; d < a.D; d += 32) store_elem(o + d, 0.f);
    return;
  }
  const int kvh = hq / a.G;
  const int64_t prow = int64_t(pos) * a.G + hq % a.G;  // packed row of this kv head
  const int qt = seq_q_tiles(a, s);
  const int tile = int(prow / a.split.block_m), r = int(prow % a.split.block_m);
  const T* ws = static_cast<const T*>(a.ws_o);
  float m = -INFINITY;
  for (int sp = 0; sp < nsp; ++sp) m = fmaxf(m, a.ws_lse[ws_row(a, b, kvh, sp * qt + tile, r)]);
  // NaN (docs/SEMANTICS.md): a split that saw a NaN has lse NaN (which the
  // fmaxf above skips; its weight exp2f(NaN - m) is NaN) or a NaN partial;
  // either way num or den turns NaN and so does the row. A split that saw no
  // key (lse -inf) is skipped, so its zero partial adds nothing.
  for (int d = lane; d < a.D; d += 32) {
    float num = 0.f, den = 0.f;
    for (int sp = 0; sp < nsp; ++sp) {
      const int64_t wr = ws_row(a, b, kvh, sp * qt + tile, r);
      const float l = a.ws_lse[wr];
      if (l == -INFINITY) continue;
      const float w = exp2f(l - m);
      den += w;
      num += w * load_elem(ws + wr * a.D + d);
    }
    store_elem(o + d, den != 0.f ? num / den : 0.f);
  }
}

// Launch one attention kernel over the (CTA of a sequence's kv head, b * kv
// head) grid, raising its dynamic shared-memory limit first when it needs
// more than 48 KB.
template <typename Kernel>
cudaError_t launch_tiled(Kernel kernel, const AttnArgs& a, int64_t grid_x, int threads, size_t smem,
                         cudaStream_t stream) {
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(unsigned(grid_x), unsigned(int64_t(a.B) * a.Hkv), 1u);
  return cuda::launch(kernel, grid, dim3(unsigned(threads)), smem, stream, a);
}

// Host-side launch entry points, explicitly instantiated in csrc/cuda/attention_*.cu.
// R: packed rows per warp of the simple kernel (8, or 4 where 8 does not fit);
// BM: q rows per CTA of the mma kernel (128, or 64 where 128 does not fit).
template <typename T, int NDC, int R>
cudaError_t launch_simple(const AttnArgs& a, int64_t grid_x, cudaStream_t stream);
template <typename T, int D, int BM>
cudaError_t launch_mma(const AttnArgs& a, int64_t grid_x, cudaStream_t stream);
template <typename T>
cudaError_t launch_combine(const AttnArgs& a, cudaStream_t stream);

// Tile sizes and shared memory, needed by the planner without the kernel
// definitions (the kernels' Cfg structs static_assert that they agree).
constexpr int kSimpleThreads = 256;  // 8 warps
constexpr int kSimpleBlockN = 32;    // one key per lane
constexpr int kMmaThreads = 128;     // 4 warps
constexpr int kMmaBlockN = 64;
// Simple kernel, NDC = ceil(D / 32) rounded up to a power of two, R rows per
// warp: fp32 Qs [8R][32 NDC] + Ks [32][32 NDC + 1] + Vs [32][32 NDC].
constexpr size_t simple_smem_bytes(int ndc, int rows_per_warp) {
  return (size_t(8 * rows_per_warp) * 32 * ndc + size_t(kSimpleBlockN) * (32 * ndc + 1) +
          size_t(kSimpleBlockN) * 32 * ndc) * sizeof(float);
}
// Per-thread register cap of the simple kernel's launch bounds (2 CTAs / SM
// up to NDC = 4, i.e. 65536 / 512 = 128 registers; 255 above).
constexpr int simple_regs_cap(int ndc) { return ndc <= 4 ? 128 : 255; }
// Mma kernel: 16-bit Qs [BM][D + 8] + Ks, Vs [2][64][D + 8] (double-buffered)
// + a 16-byte mask of non-finite V rows.
constexpr size_t mma_smem_bytes(int d, int block_m) {
  return (size_t(block_m) + 4 * size_t(kMmaBlockN)) * size_t(d + 8) * 2 + 16;
}
constexpr int kMmaRegsCap = 255;  // __launch_bounds__(128): no occupancy request
}  // namespace attn
}  // namespace apd
