// Host side of window_attention on CUDA: support check, kernel / split
// planning, argument packing and dispatch to the explicitly instantiated
// kernels (attention_simple_*.cu, attention_mma_*.cu).
#include <climits>

#include "apd/attention_launch.h"
#include "apd/cuda/attention_common.cuh"

namespace apd {

namespace {

size_t elem_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// 16-byte vector loads of 8-element chunks are aligned for this tensor.
bool vec_aligned(const void* ptr, DType t, int64_t sb, int64_t sl, int64_t sh) {
  const size_t es = elem_size(t);
  const auto al = [&](int64_t stride) { return (int64_t(es) * stride) % 16 == 0; };
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && al(sb) && al(sl) && al(sh);
}

bool all_aligned(const WindowAttentionParams& p) {
  return vec_aligned(p.q, p.dtype, p.q_stride_b, p.q_stride_l, p.q_stride_h) &&
         vec_aligned(p.k_cache, p.dtype, p.k_stride_b, p.k_stride_l, p.k_stride_h) &&
         vec_aligned(p.v_cache, p.dtype, p.v_stride_b, p.v_stride_l, p.v_stride_h);
}

bool mma_applies(const WindowAttentionParams& p) {
  return (p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16) && (p.D == 64 || p.D == 128) &&
         all_aligned(p);
}

int simple_ndc(int64_t D) {
  const int64_t c = (D + 31) / 32;
  return c <= 1 ? 1 : (c <= 2 ? 2 : (c <= 4 ? 4 : 8));
}

}  // namespace

const char* window_attention_unsupported(const WindowAttentionParams& p) {
  if (p.D <= 0 || p.D % 8 != 0 || p.D > 256)
    return "head dim D must be a multiple of 8 in [8, 256] on CUDA";
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0) return "Hq must be a positive multiple of Hkv";
  if (p.B * p.Hkv > 65535) return "B * Hkv must be at most 65535 on CUDA";
  if (p.Lmax >= INT_MAX / 2 || p.Lq * p.Hq >= INT_MAX / 2 || p.B >= INT_MAX / 2)
    return "sequence lengths must stay below 2^30 on CUDA";
  return nullptr;
}

WindowAttentionPlan plan_window_attention(const WindowAttentionParams& p, const WindowAttentionOptions& opt) {
  return plan_window_attention(current_device_profile(), p, opt);
}

WindowAttentionPlan plan_window_attention(const DeviceProfile& dev, const WindowAttentionParams& p,
                                          const WindowAttentionOptions& opt) {
  WindowAttentionPlan plan;
  // The tile: the largest of each kernel whose dynamic shared memory fits the
  // device's opt-in limit (the mma kernel at D = 128 and the simple one at
  // D > 128 do not fit sm_86 / sm_89 with their large tiles); the mma kernel
  // falls back to the simple one if neither of its tiles fits.
  bool mma = opt.impl == AttnImpl::kMma && mma_applies(p);
  const size_t optin = size_t(dev.smem_optin > 0 ? dev.smem_optin : 0);
  if (mma) {
    const int d = int(p.D);
    plan.block_m = attn::mma_smem_bytes(d, 128) <= optin ? 128 : 64;
    plan.smem_bytes = attn::mma_smem_bytes(d, plan.block_m);
    mma = plan.smem_bytes <= optin;
  }
  plan.impl = mma ? AttnImpl::kMma : AttnImpl::kSimple;
  int threads = attn::kMmaThreads, regs = attn::kMmaRegsCap;
  if (!mma) {
    const int ndc = simple_ndc(p.D);
    const int rows = attn::simple_smem_bytes(ndc, 8) <= optin ? 8 : 4;
    plan.block_m = 8 * rows;
    plan.smem_bytes = attn::simple_smem_bytes(ndc, rows);
    threads = attn::kSimpleThreads;
    regs = attn::simple_regs_cap(ndc);
  }
  plan.block_n = mma ? attn::kMmaBlockN : attn::kSimpleBlockN;
  plan.ctas_per_sm = blocks_per_sm(dev, plan.smem_bytes, threads, regs, 2);
  const int64_t G = p.Hq / p.Hkv;
  plan.q_tiles = ceil_div<int64_t>(p.Lq * G, plan.block_m);
  const int64_t bn = plan.block_n;
  const int64_t lmax_tiles = ceil_div<int64_t>(p.Lmax, bn);  // key tiles of the cache

  // Splits: requested, or as many as fill every SM with the CTAs that fit on
  // it (up to two: plan.ctas_per_sm, from the profile's shared memory and
  // registers per SM) when the (b, kv head, q tile) grid alone would leave
  // SMs idle, keeping >= 128 keys (two mma key tiles) per split and at
  // most 64 splits.
  // Rounded down: one split more than fits starts a second wave of a few
  // CTAs (Dream-7B, q_len 216, kv 4096, mma: 48 CTAs x 6 splits of 11 key
  // tiles = 288 CTAs on 264 slots, 2 waves = 22 tile-times per SM; 5 splits of
  // 13 tiles = 240 CTAs, one wave, 13 tile-times; a model, bench/NOTES.md).
  int64_t want = opt.num_splits;
  if (want <= 0) {
    const int64_t ctas = int64_t(p.B) * p.Hkv * plan.q_tiles;
    const int64_t sms = dev.sm_count > 0 ? dev.sm_count : 1;
    want = 1;
    if (ctas < sms) {
      want = plan.ctas_per_sm * sms / ctas;  // >= 1
      const int64_t max_by_len = ceil_div<int64_t>(p.Lmax, 128);
      if (want > max_by_len) want = max_by_len;
      if (want > 64) want = 64;
    }
  }
  if (want < 1) want = 1;
  if (want > 65535) want = 65535;
  if (lmax_tiles <= 1 || want == 1) {
    plan.num_splits = 1;
    plan.chunk = lmax_tiles * bn;
  } else {
    // Whole key tiles per split; the last split may be shorter, none is empty.
    const int64_t tiles_per = ceil_div<int64_t>(lmax_tiles, want);
    plan.chunk = tiles_per * bn;
    plan.num_splits = int(ceil_div<int64_t>(lmax_tiles, tiles_per));
  }
  if (plan.num_splits > 1) {
    const size_t rows = size_t(p.B) * p.Lq * p.Hq;
    // Partials in the input dtype, then the fp32 lse (16-byte aligned: D % 8 == 0).
    plan.workspace_bytes = size_t(plan.num_splits) * rows * (size_t(p.D) * elem_size(p.dtype) + sizeof(float));
  }
  return plan;
}

namespace {

template <typename T>
cudaError_t dispatch(const attn::AttnArgs& a, const WindowAttentionPlan& plan, cudaStream_t stream) {
  cudaError_t e = cudaSuccess;
  if (plan.impl == AttnImpl::kMma) {
    if constexpr (sizeof(T) == 2) {
      // BM = 64 only where the 128-row tile does not fit (D = 128 on sm_86 / sm_89).
      if (a.D == 64) e = attn::launch_mma<T, 64, 128>(a, plan.q_tiles, stream);
      else if (plan.block_m == 128) e = attn::launch_mma<T, 128, 128>(a, plan.q_tiles, stream);
      else e = attn::launch_mma<T, 128, 64>(a, plan.q_tiles, stream);
    } else {
      return cudaErrorInvalidValue;
    }
  } else {
    // 4 rows per warp only where 8 do not fit (D > 128 on sm_86 / sm_89).
    const int ndc = simple_ndc(a.D);
    if (ndc == 1) e = attn::launch_simple<T, 1, 8>(a, plan.q_tiles, stream);
    else if (ndc == 2) e = attn::launch_simple<T, 2, 8>(a, plan.q_tiles, stream);
    else if (ndc == 4) e = attn::launch_simple<T, 4, 8>(a, plan.q_tiles, stream);
    else if (plan.block_m == 64) e = attn::launch_simple<T, 8, 8>(a, plan.q_tiles, stream);
    else e = attn::launch_simple<T, 8, 4>(a, plan.q_tiles, stream);
  }
  if (e != cudaSuccess || plan.num_splits == 1) return e;
  return attn::launch_combine<T>(a, stream);
}

}  // namespace

cudaError_t launch_window_attention(const WindowAttentionParams& p, const WindowAttentionPlan& plan,
                                    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (window_attention_unsupported(p) != nullptr) return cudaErrorInvalidValue;
  if (plan.num_splits > 1 && (workspace == nullptr || workspace_bytes < plan.workspace_bytes ||
                              reinterpret_cast<uintptr_t>(workspace) % 16 != 0))
    return cudaErrorInvalidValue;
  if (plan.impl == AttnImpl::kMma && !mma_applies(p)) return cudaErrorInvalidValue;
  if (p.B == 0 || p.Lq == 0 || p.Hq == 0) return cudaSuccess;
  // A plan made for another device (or by hand) whose tile is not one the
  // dispatch has: refused, never a silently different kernel.
  if (plan.impl == AttnImpl::kMma ? !(plan.block_m == 128 || (plan.block_m == 64 && p.D == 128))
                                  : !(plan.block_m == 64 || (plan.block_m == 32 && p.D > 128)))
    return cudaErrorInvalidValue;

  attn::AttnArgs a{};
  a.q = p.q;
  a.k = p.k_cache;
  a.v = p.v_cache;
  a.out = p.out;
  const size_t rows = size_t(p.B) * p.Lq * p.Hq;
  a.ws_o = plan.num_splits > 1 ? workspace : nullptr;
  a.ws_lse = plan.num_splits > 1
                 ? reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                            size_t(plan.num_splits) * rows * p.D * elem_size(p.dtype))
                 : nullptr;
  a.q_start = p.q_start;
  a.q_len = p.q_len;
  a.kv_len = p.kv_len;
  a.q_sb = p.q_stride_b; a.q_sl = p.q_stride_l; a.q_sh = p.q_stride_h;
  a.k_sb = p.k_stride_b; a.k_sl = p.k_stride_l; a.k_sh = p.k_stride_h;
  a.v_sb = p.v_stride_b; a.v_sl = p.v_stride_l; a.v_sh = p.v_stride_h;
  a.B = int(p.B); a.Lq = int(p.Lq); a.Hq = int(p.Hq); a.Hkv = int(p.Hkv);
  a.G = int(p.Hq / p.Hkv); a.D = int(p.D); a.Lmax = int(p.Lmax);
  a.num_splits = plan.num_splits;
  a.chunk = int(plan.chunk);
  a.block_n = int(plan.block_n);
  a.scale_log2 = p.scale * attn::kLog2e;
  a.causal = p.causal;
  a.q_vec = vec_aligned(p.q, p.dtype, p.q_stride_b, p.q_stride_l, p.q_stride_h);
  a.k_vec = vec_aligned(p.k_cache, p.dtype, p.k_stride_b, p.k_stride_l, p.k_stride_h);
  a.v_vec = vec_aligned(p.v_cache, p.dtype, p.v_stride_b, p.v_stride_l, p.v_stride_h);

  switch (p.dtype) {
    case DType::kFloat32: return dispatch<float>(a, plan, stream);
    case DType::kBFloat16: return dispatch<bf16_t>(a, plan, stream);
    case DType::kFloat16: return dispatch<fp16_t>(a, plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace apd
