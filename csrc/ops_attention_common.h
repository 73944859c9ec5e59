// Torch-side pieces shared by the CPU and CUDA registrations of
// apd::window_attention (csrc/ops_cpu_attention.cpp, csrc/ops_cuda_attention.cpp):
// the dtype mapping, the k_cache-against-q shape checks and the filling of the
// torch-free apd::WindowAttentionParams. Included only by those two .cpp files
// (never by a .cu: it pulls in ATen).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "apd/attention_params.h"

namespace apd::ops {

inline apd::DType attention_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return apd::DType::kFloat32;
    case at::kBFloat16: return apd::DType::kBFloat16;
    case at::kHalf: return apd::DType::kFloat16;
    default: break;
  }
  TORCH_CHECK(false, "window_attention: q must be float32, bfloat16 or float16, got ", t);
  return apd::DType::kFloat32;
}

// k_cache [B, Lmax, Hkv, D] against q [B, Lq, Hq, D]: same batch, same head dim.
inline void check_k_like_q(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(k.size(0) == q.size(0), "window_attention: k_cache batch ", k.size(0), " != q batch ", q.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), "window_attention: k_cache head dim ", k.size(3), " != q head dim ",
              q.size(3));
}

// Parameters from checked tensors: q, k, v with stride 1 along D, lengths
// contiguous int64, out freshly allocated and contiguous.
inline apd::WindowAttentionParams window_attention_params(const at::Tensor& q,        // [B, Lq, Hq, D]
                                                          const at::Tensor& k,        // [B, Lmax, Hkv, D]
                                                          const at::Tensor& v,        // [B, Lmax, Hkv, D]
                                                          at::Tensor& out,            // [B, Lq, Hq, D]
                                                          apd::DType dtype,
                                                          const at::Tensor& q_start,  // [B] int64
                                                          const at::Tensor& q_len,    // [B] int64
                                                          const at::Tensor& kv_len,   // [B] int64
                                                          bool causal, double scale) {
  apd::WindowAttentionParams p{};
  p.q = q.data_ptr();
  p.k_cache = k.data_ptr();
  p.v_cache = v.data_ptr();
  p.out = out.data_ptr();
  p.dtype = dtype;
  p.B = q.size(0), p.Lq = q.size(1), p.Hq = q.size(2), p.Hkv = k.size(2), p.D = q.size(3), p.Lmax = k.size(1);
  p.q_stride_b = q.stride(0), p.q_stride_l = q.stride(1), p.q_stride_h = q.stride(2);
  p.k_stride_b = k.stride(0), p.k_stride_l = k.stride(1), p.k_stride_h = k.stride(2);
  p.v_stride_b = v.stride(0), p.v_stride_l = v.stride(1), p.v_stride_h = v.stride(2);
  p.q_start = q_start.data_ptr<int64_t>();
  p.q_len = q_len.data_ptr<int64_t>();
  p.kv_len = kv_len.data_ptr<int64_t>();
  p.causal = causal;
  p.scale = float(scale);
  return p;
}

}  // namespace apd::ops
