// CUDA registration of apd::window_attention (DESIGN.md §5): argument checks,
// int64 conversion of the per-sequence vectors, workspace from the caching
// allocator, launch on the current stream. Never synchronises with the device.
//
// Kernel selection (read at every call, so tests can switch it):
//   APD_ATTN_IMPL   unset / "" / "simple": CUDA-core fp32 kernel (default)
//                   "mma": tensor-core kernel where it applies (bf16/fp16,
//                   D in {64, 128}, 16-byte aligned rows); elsewhere the simple one
//   APD_ATTN_SPLITS unset / "0": split-KV heuristic; N >= 1: request N KV splits
//                   (1 = never split)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "apd/attention_launch.h"
#include "ops_attention_common.h"

namespace {

apd::WindowAttentionOptions options_from_env() {
  apd::WindowAttentionOptions opt;
  if (const char* impl = std::getenv("APD_ATTN_IMPL")) {
    if (std::strcmp(impl, "mma") == 0) {
      opt.impl = apd::AttnImpl::kMma;
    } else {
      TORCH_CHECK(impl[0] == '\0' || std::strcmp(impl, "simple") == 0,
                  "APD_ATTN_IMPL: expected 'simple' or 'mma', got '", impl, "'");
    }
  }
  if (const char* splits = std::getenv("APD_ATTN_SPLITS")) {
    if (splits[0] != '\0') {
      char* end = nullptr;
      const long n = std::strtol(splits, &end, 10);
      TORCH_CHECK(end != splits && *end == '\0' && n >= 0 && n <= 65535,
                  "APD_ATTN_SPLITS: expected an integer in [0, 65535], got '", splits, "'");
      opt.num_splits = int(n);
    }
  }
  return opt;
}

void check_seq_vector(const char* name, const at::Tensor& t, int64_t B, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, "window_attention: ", name, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "window_attention: ", name, " must have shape [", B,
              "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "window_attention: ", name,
              " must be int32 or int64, got ", t.scalar_type());
}

at::Tensor window_attention_cuda(const at::Tensor& q_in,        // [B, Lq, Hq, D]
                                 const at::Tensor& k_in,        // [B, Lmax, Hkv, D]
                                 const at::Tensor& v_in,        // [B, Lmax, Hkv, D]
                                 const at::Tensor& q_start_in,  // [B] int
                                 const at::Tensor& q_len_in,    // [B] int
                                 const at::Tensor& kv_len_in,   // [B] int
                                 bool causal, double scale) {
  TORCH_CHECK(q_in.is_cuda(), "window_attention: q must be a CUDA tensor, got ", q_in.device());
  const at::Device dev = q_in.device();
  TORCH_CHECK(k_in.device() == dev && v_in.device() == dev,
              "window_attention: k_cache and v_cache must be on ", dev, ", got ", k_in.device(), " and ",
              v_in.device());
  TORCH_CHECK(q_in.dim() == 4, "window_attention: q must be [B, Lq, Hq, D], got ", q_in.sizes());
  TORCH_CHECK(k_in.dim() == 4, "window_attention: k_cache must be [B, Lmax, Hkv, D], got ", k_in.sizes());
  TORCH_CHECK(v_in.sizes() == k_in.sizes(), "window_attention: v_cache must have k_cache's shape ",
              k_in.sizes(), ", got ", v_in.sizes());
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
              "window_attention: q, k_cache and v_cache must share a dtype, got ", q_in.scalar_type(), ", ",
              k_in.scalar_type(), ", ", v_in.scalar_type());
  TORCH_CHECK(std::isfinite(float(scale)) && float(scale) > 0, "window_attention: scale must be finite and > 0, got ", scale);
  const int64_t B = q_in.size(0), Lq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  const int64_t Lmax = k_in.size(1), Hkv = k_in.size(2);
  apd::ops::check_k_like_q(q_in, k_in);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "window_attention: Hq (", Hq, ") must be a multiple of Hkv (", Hkv, ")");
  check_seq_vector("q_start", q_start_in, B, dev);
  check_seq_vector("q_len", q_len_in, B, dev);
  check_seq_vector("kv_len", kv_len_in, B, dev);
  const apd::DType dtype = apd::ops::attention_dtype(q_in.scalar_type());

  at::Tensor out = at::empty({B, Lq, Hq, D}, q_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

  // Kernels need stride 1 along D; everything else may be strided.
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();

  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor q_start = q_start_in.to(at::kLong).contiguous();
  const at::Tensor q_len = q_len_in.to(at::kLong).contiguous();
  const at::Tensor kv_len = kv_len_in.to(at::kLong).contiguous();

  const apd::WindowAttentionParams p =
      apd::ops::window_attention_params(q, k, v, out, dtype, q_start, q_len, kv_len, causal, scale);
  if (const char* why = apd::window_attention_unsupported(p)) {
    TORCH_CHECK(false, "window_attention: ", why, " (got B=", B, ", Lq=", Lq, ", Hq=", Hq, ", Hkv=", Hkv,
                ", D=", D, ", Lmax=", Lmax, ")");
  }

  const apd::WindowAttentionPlan plan = apd::plan_window_attention(p, options_from_env());
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, q.options().dtype(at::kByte));
  }
  const cudaError_t err = apd::launch_window_attention(
      p, plan, plan.workspace_bytes > 0 ? workspace.data_ptr() : nullptr, plan.workspace_bytes,
      c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  TORCH_CHECK(err == cudaSuccess, "window_attention: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(apd, CUDA, m) { m.impl("window_attention", &window_attention_cuda); }
