// CPU implementation of apd::window_attention (DESIGN.md §5): argument checks
// for direct torch.ops callers (the Python wrapper checks first, with nicer
// messages), int lengths to int64, output allocation, then the torch-free
// kernel in apd/cpu/attention.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "apd/attention_params.h"
#include "apd/cpu/attention.h"
#include "ops_attention_common.h"

namespace {

// A [B] int32/int64 length vector as contiguous int64.
at::Tensor lengths_int64(const at::Tensor& t, const char* name, int64_t batch) {
  TORCH_CHECK(t.device().is_cpu(), "window_attention: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "window_attention: ", name,
              " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, "window_attention: ", name, " must have shape [", batch,
              "], got ", t.sizes());
  return t.to(at::kLong).contiguous();
}

// The kernel reads rows with stride 1 along D; copy only when that fails.
at::Tensor unit_stride_d(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

at::Tensor window_attention_cpu(const at::Tensor& q_in,        // [B, Lq, Hq, D]
                                const at::Tensor& k_in,        // [B, Lmax, Hkv, D]
                                const at::Tensor& v_in,        // [B, Lmax, Hkv, D]
                                const at::Tensor& q_start_in,  // [B] int
                                const at::Tensor& q_len_in,    // [B] int
                                const at::Tensor& kv_len_in,   // [B] int
                                bool causal, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
              "window_attention: q, k_cache and v_cache must be 4-D, got ", q_in.sizes(), ", ", k_in.sizes(),
              ", ", v_in.sizes());
  TORCH_CHECK(q_in.device().is_cpu() && k_in.device().is_cpu() && v_in.device().is_cpu(),
              "window_attention: q, k_cache and v_cache must all be on the CPU");
  const apd::DType dtype = apd::ops::attention_dtype(q_in.scalar_type());
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
              "window_attention: k_cache and v_cache must have q's dtype ", q_in.scalar_type());
  const int64_t B = q_in.size(0), Lq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  const int64_t Lmax = k_in.size(1), Hkv = k_in.size(2);
  TORCH_CHECK(k_in.sizes() == v_in.sizes(), "window_attention: k_cache ", k_in.sizes(), " and v_cache ",
              v_in.sizes(), " must have the same shape");
  apd::ops::check_k_like_q(q_in, k_in);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "window_attention: q heads ", Hq, " must be a multiple of kv heads ",
              Hkv);
  TORCH_CHECK(std::isfinite(float(scale)) && float(scale) > 0, "window_attention: scale must be finite and > 0, got ", scale);

  const at::Tensor q_start = lengths_int64(q_start_in, "q_start", B);
  const at::Tensor q_len = lengths_int64(q_len_in, "q_len", B);
  const at::Tensor kv_len = lengths_int64(kv_len_in, "kv_len", B);
  const int64_t* qs = q_start.data_ptr<int64_t>();
  const int64_t* ql = q_len.data_ptr<int64_t>();
  const int64_t* kl = kv_len.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(qs[b] >= 0 && ql[b] >= 0 && ql[b] <= Lq && kl[b] <= Lmax && qs[b] <= kl[b] - ql[b],
                "window_attention: sequence ", b, " needs 0 <= q_start, 0 <= q_len <= Lq = ", Lq,
                ", q_start + q_len <= kv_len <= Lmax = ", Lmax, "; got q_start ", qs[b], ", q_len ", ql[b],
                ", kv_len ", kl[b]);
  }

  const at::Tensor q = unit_stride_d(q_in), k = unit_stride_d(k_in), v = unit_stride_d(v_in);
  at::Tensor out = at::empty({B, Lq, Hq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

  const apd::WindowAttentionParams p =
      apd::ops::window_attention_params(q, k, v, out, dtype, q_start, q_len, kv_len, causal, scale);
  apd::cpu::window_attention(p);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(apd, CPU, m) { m.impl("window_attention", &window_attention_cpu); }
