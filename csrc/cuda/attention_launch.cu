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

  // Splits, per sequence (apd/attention_split.h): as many as fill every SM
  // with the CTAs that fit on it (plan.ctas_per_sm, from the profile's shared
  // memory and registers per SM) when the request's own (kv head, q tile)
  // grid would leave SMs idle, >= 128 keys (two mma key tiles) per split, at
  // most 64; or the requested count. The rule reads the request's own q_len
  // and kv_len on the device: a batch never changes a request's split.
  SplitRule& r = plan.split;
  r.request = opt.num_splits > 0 ? (opt.num_splits < 65535 ? opt.num_splits : 65535) : 0;
  r.sm_count = dev.sm_count > 0 ? dev.sm_count : 1;
  r.ctas_per_sm = plan.ctas_per_sm;
  r.heads = int(p.Hkv);
  r.group = int(G);
  r.block_m = plan.block_m;
  r.block_n = plan.block_n;
  r.min_tiles = 128 / plan.block_n;
  r.max_splits = 64;

  // Bounds over every sequence this call can hold (q_len <= Lq, kv_len <=
  // Lmax), from n_b <= want_b and n_b <= tiles_b: the most splits, and the
  // most (q tile, split) CTAs of a split sequence. Under the rule, q_tiles_b x
  // want_b <= ctas_per_sm x SMs / Hkv (want_b is rounded down), so a split
  // sequence never has more than one device wave of CTAs per kv head.
  const int64_t lmax_tiles = ceil_div<int64_t>(p.Lmax, plan.block_n);
  int64_t smax = 1;
  if (lmax_tiles > 1) {
    if (r.request > 0) {
      smax = r.request < lmax_tiles ? r.request : lmax_tiles;
    } else if (r.heads < r.sm_count) {  // a sequence with one q tile can split
      smax = int64_t(r.ctas_per_sm) * r.sm_count / r.heads;
      const int64_t by_len = ceil_div<int64_t>(lmax_tiles, r.min_tiles);
      if (smax > by_len) smax = by_len;
      if (smax > r.max_splits) smax = r.max_splits;
    }
  }
  plan.num_splits = int(smax);
  plan.ws_items = 0;
  if (smax > 1) {
    plan.ws_items = plan.q_tiles * smax;
    const int64_t wave = int64_t(r.ctas_per_sm) * r.sm_count / r.heads;
    if (r.request == 0 && plan.ws_items > wave) plan.ws_items = wave;
  }
  plan.grid_x = plan.q_tiles > plan.ws_items ? plan.q_tiles : plan.ws_items;
  if (plan.ws_items > 0) {
    const size_t rows = size_t(p.B) * p.Hkv * plan.ws_items * plan.block_m;
    // Partials in the input dtype, then the fp32 lse (16-byte aligned: D % 8 == 0).
    plan.workspace_bytes = rows * (size_t(p.D) * elem_size(p.dtype) + sizeof(float));
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
      if (a.D == 64) e = attn::launch_mma<T, 64, 128>(a, plan.grid_x, stream);
      else if (plan.block_m == 128) e = attn::launch_mma<T, 128, 128>(a, plan.grid_x, stream);
      else e = attn::launch_mma<T, 128, 64>(a, plan.grid_x, stream);
    } else {
      return cudaErrorInvalidValue;
    }
  } else {
    // 4 rows per warp only where 8 do not fit (D > 128 on sm_86 / sm_89).
    const int ndc = simple_ndc(a.D);
    if (ndc == 1) e = attn::launch_simple<T, 1, 8>(a, plan.grid_x, stream);
    else if (ndc == 2) e = attn::launch_simple<T, 2, 8>(a, plan.grid_x, stream);
    else if (ndc == 4) e = attn::launch_simple<T, 4, 8>(a, plan.grid_x, stream);
    else if (plan.block_m == 64) e = attn::launch_simple<T, 8, 8>(a, plan.grid_x, stream);
    else e = attn::launch_simple<T, 8, 4>(a, plan.grid_x, stream);
  }
  if (e != cudaSuccess || plan.ws_items == 0) return e;
  return attn::launch_combine<T>(a, stream);
}

}  // namespace

cudaError_t launch_window_attention(const WindowAttentionParams& p, const WindowAttentionPlan& plan,
                                    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (window_attention_unsupported(p) != nullptr) return cudaErrorInvalidValue;
  if (plan.ws_items > 0 && (workspace == nullptr || workspace_bytes < plan.workspace_bytes ||
                            reinterpret_cast<uintptr_t>(workspace) % 16 != 0))
    return cudaErrorInvalidValue;
  if (plan.impl == AttnImpl::kMma && !mma_applies(p)) return cudaErrorInvalidValue;
  if (p.B == 0 || p.Lq == 0 || p.Hq == 0) return cudaSuccess;
  // A plan made for another device (or by hand) whose tile is not one the
  // dispatch has: refused, never a silently different kernel.
  if (plan.impl == AttnImpl::kMma ? !(plan.block_m == 128 || (plan.block_m == 64 && p.D == 128))
                                  : !(plan.block_m == 64 || (plan.block_m == 32 && p.D > 128)))
    return cudaErrorInvalidValue;
  // The split rule and the grid must be this call's: the kernels index the
  // workspace with them.
  const SplitRule& r = plan.split;
  if (r.block_m != plan.block_m || r.block_n != plan.block_n || r.heads != p.Hkv || r.group != p.Hq / p.Hkv ||
      r.block_n != (plan.impl == AttnImpl::kMma ? attn::kMmaBlockN : attn::kSimpleBlockN) || r.min_tiles < 1 ||
      r.sm_count < 1 || r.ctas_per_sm < 1 || r.max_splits < 1 ||
      plan.q_tiles != ceil_div<int64_t>(p.Lq * (p.Hq / p.Hkv), plan.block_m) ||
      plan.grid_x < plan.q_tiles || plan.grid_x < plan.ws_items || plan.grid_x > INT_MAX ||
      (plan.ws_items > 0) != (plan.num_splits > 1))
    return cudaErrorInvalidValue;

  attn::AttnArgs a{};
  a.q = p.q;
  a.k = p.k_cache;
  a.v = p.v_cache;
  a.out = p.out;
  const size_t ws_rows = size_t(p.B) * p.Hkv * plan.ws_items * plan.block_m;
  a.ws_o = plan.ws_items > 0 ? workspace : nullptr;
  a.ws_lse = plan.ws_items > 0 ? reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                                          ws_rows * p.D * elem_size(p.dtype))
                               : nullptr;
  a.q_start = p.q_start;
  a.q_len = p.q_len;
  a.kv_len = p.kv_len;
  a.q_sb = p.q_stride_b; a.q_sl = p.q_stride_l; a.q_sh = p.q_stride_h;
  a.k_sb = p.k_stride_b; a.k_sl = p.k_stride_l; a.k_sh = p.k_stride_h;
  a.v_sb = p.v_stride_b; a.v_sl = p.v_stride_l; a.v_sh = p.v_stride_h;
  a.B = int(p.B); a.Lq = int(p.Lq); a.Hq = int(p.Hq); a.Hkv = int(p.Hkv);
  a.G = int(p.Hq / p.Hkv); a.D = int(p.D); a.Lmax = int(p.Lmax);
  a.split = plan.split;
  a.q_tiles = int(plan.q_tiles);
  a.ws_items = int(plan.ws_items);
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
