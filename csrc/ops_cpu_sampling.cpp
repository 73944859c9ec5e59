// CPU implementations of the sampling core (DESIGN.md §4): sample_draft,
// mixture_accept, accept_prefix. Checks here are for direct torch.ops callers
// (python/apd_ext/ops.py checks first, with friendlier messages); int inputs
// become contiguous int64, the vocabulary dimension is made unit-stride only
// when it is not, and the torch-free kernels of apd/cpu/sampling.h do the rest.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "apd/cpu/sampling.h"
#include "apd/sampling_params.h"

namespace {

apd::DType logits_dtype(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return apd::DType::kFloat32;
    case at::kBFloat16: return apd::DType::kBFloat16;
    case at::kHalf: return apd::DType::kFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  return apd::DType::kFloat32;
}

// A [B] int32/int64 per-sequence vector as contiguous int64 on the CPU.
at::Tensor batch_int64(const char* op, const char* name, const at::Tensor& t, int64_t B,
                       bool int64_only = false) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong || (!int64_only && t.scalar_type() == at::kInt), op, ": ", name,
              " must be ", int64_only ? "int64" : "int32 or int64", ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, op, ": ", name, " must have shape [", B, "], got ", t.sizes());
  return t.to(at::kLong).contiguous();
}

// [B, M, V] logits with stride 1 along V (copy only when it is not).
at::Tensor unit_stride_vocab(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D [B, M, V], got ", t.sizes());
  TORCH_CHECK(t.size(2) >= 1 && t.size(2) <= INT32_MAX, op, ": ", name,
              " needs a vocabulary of 1 to 2^31 - 1 entries (int32 candidate indices), got ", t.sizes());
  return t.stride(2) == 1 ? t : t.contiguous();
}

void check_valid_len(const char* op, const at::Tensor& valid_len, int64_t M) {
  const int64_t* vl = valid_len.data_ptr<int64_t>();
  for (int64_t b = 0; b < valid_len.size(0); ++b)
    TORCH_CHECK(vl[b] >= 0 && vl[b] <= M, op, ": valid_len[", b, "] must be in [0, M = ", M, "], got ", vl[b]);
}

at::Tensor eos_int64(const char* op, const at::Tensor& eos) {
  TORCH_CHECK(eos.device().is_cpu(), op, ": eos_ids must be on the CPU, got ", eos.device());
  TORCH_CHECK(eos.scalar_type() == at::kLong, op, ": eos_ids must be int64, got ", eos.scalar_type());
  TORCH_CHECK(eos.dim() == 1, op, ": eos_ids must be 1-D [E], got ", eos.sizes());
  return eos.contiguous();
}

apd::SamplerConfig sampler_config(const char* op, double temperature, int64_t top_k, double top_p,
                                  c10::string_view compat) {
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0.0, op, ": temperature must be finite and >= 0, got ",
              temperature);
  TORCH_CHECK(top_p > 0.0, op, ": top_p must be > 0, got ", top_p);
  TORCH_CHECK(compat.empty() || compat == "official", op, ": compat must be \"\" or \"official\", got \"",
              std::string(compat), "\"");
  return apd::SamplerConfig{float(temperature), top_k, float(top_p), compat == "official"};
}

template <typename F>
void dispatch_dtype(apd::DType dt, F&& f) {
  switch (dt) {
    case apd::DType::kFloat32: f(float{}); break;
    case apd::DType::kBFloat16: f(apd::bf16_t{}); break;
    case apd::DType::kFloat16: f(apd::fp16_t{}); break;
  }
}

at::Tensor sample_draft_cpu(const at::Tensor& logits_in,     // [B, M, V]
                            const at::Tensor& pos_start_in,  // [B] int
                            const at::Tensor& valid_len_in,  // [B] int
                            const at::Tensor& seeds_in,      // [B] int64
                            const at::Tensor& steps_in,      // [B] int
                            double temperature, int64_t top_k, double top_p, c10::string_view compat) {
  constexpr const char* op = "sample_draft";
  const at::Tensor logits = unit_stride_vocab(op, "logits", logits_in);
  const apd::DType dtype = logits_dtype(op, "logits", logits);
  const int64_t B = logits.size(0), M = logits.size(1), V = logits.size(2);
  const at::Tensor pos_start = batch_int64(op, "pos_start", pos_start_in, B);
  const at::Tensor valid_len = batch_int64(op, "valid_len", valid_len_in, B);
  const at::Tensor seeds = batch_int64(op, "seeds", seeds_in, B, /*int64_only=*/true);
  const at::Tensor steps = batch_int64(op, "steps", steps_in, B);
  check_valid_len(op, valid_len, M);
  const apd::SamplerConfig cfg = sampler_config(op, temperature, top_k, top_p, compat);

  at::Tensor draft = at::empty({B, M}, logits.options().dtype(at::kLong));
  if (draft.numel() == 0) return draft;
  apd::SampleDraftParams p{};
  p.logits = logits.data_ptr();
  p.dtype = dtype;
  p.B = B, p.M = M, p.V = V;
  p.stride_b = logits.stride(0), p.stride_m = logits.stride(1);
  p.pos_start = pos_start.data_ptr<int64_t>();
  p.valid_len = valid_len.data_ptr<int64_t>();
  p.seeds = seeds.data_ptr<int64_t>();
  p.steps = steps.data_ptr<int64_t>();
  p.cfg = cfg;
  p.draft = draft.data_ptr<int64_t>();
  dispatch_dtype(dtype, [&](auto tag) { apd::cpu::sample_draft<decltype(tag)>(p); });
  return draft;
}

std::tuple<at::Tensor, at::Tensor> mixture_accept_cpu(
    const at::Tensor& dllm_in,       // [B, M, V_D]
    const at::Tensor& ar_in,         // [B, M, V_A]
    const at::Tensor& draft_in,      // [B, M] int64
    const at::Tensor& pos_start_in,  // [B] int
    const at::Tensor& valid_len_in,  // [B] int
    const at::Tensor& seeds_in,      // [B] int64
    const at::Tensor& steps_in,      // [B] int
    double R, double temperature, int64_t top_k, double top_p,
    const at::Tensor& eos_in,        // [E] int64
    c10::string_view acceptance, c10::string_view compat) {
  constexpr const char* op = "mixture_accept";
  const at::Tensor d = unit_stride_vocab(op, "dllm_logits", dllm_in);
  const at::Tensor a = unit_stride_vocab(op, "ar_logits", ar_in);
  const apd::DType dtype = logits_dtype(op, "dllm_logits", d);
  TORCH_CHECK(a.scalar_type() == d.scalar_type(), op, ": ar_logits must have dllm_logits' dtype ",
              d.scalar_type(), ", got ", a.scalar_type());
  const int64_t B = d.size(0), M = d.size(1);
  TORCH_CHECK(a.size(0) == B && a.size(1) == M, op, ": ar_logits must have shape [", B, ", ", M,
              ", V_A], got ", a.sizes());
  TORCH_CHECK(draft_in.device().is_cpu() && draft_in.scalar_type() == at::kLong && draft_in.dim() == 2 &&
                  draft_in.size(0) == B && draft_in.size(1) == M,
              op, ": draft must be an int64 CPU tensor of shape [", B, ", ", M, "], got ", draft_in.scalar_type(),
              " ", draft_in.sizes(), " on ", draft_in.device());
  const at::Tensor draft = draft_in.contiguous();
  const at::Tensor pos_start = batch_int64(op, "pos_start", pos_start_in, B);
  const at::Tensor valid_len = batch_int64(op, "valid_len", valid_len_in, B);
  const at::Tensor seeds = batch_int64(op, "seeds", seeds_in, B, /*int64_only=*/true);
  const at::Tensor steps = batch_int64(op, "steps", steps_in, B);
  const at::Tensor eos = eos_int64(op, eos_in);
  check_valid_len(op, valid_len, M);
  TORCH_CHECK(R >= 0.0 && R <= 1.0, op, ": R must be in [0, 1], got ", R);
  TORCH_CHECK(acceptance == "coupled" || acceptance == "argmax", op,
              ": acceptance must be \"coupled\" or \"argmax\", got \"", std::string(acceptance), "\"");
  const apd::SamplerConfig cfg = sampler_config(op, temperature, top_k, top_p, compat);
  TORCH_CHECK(!(cfg.official && acceptance == "coupled"), op,
              ": compat=\"official\" uses acceptance=\"argmax\", got \"coupled\"");

  at::Tensor target = at::empty({B, M}, d.options().dtype(at::kLong));
  at::Tensor n_accept = at::empty({B}, d.options().dtype(at::kLong));
  if (B == 0) return {target, n_accept};
  apd::MixtureAcceptParams p{};
  p.dllm_logits = d.data_ptr();
  p.ar_logits = a.data_ptr();
  p.dtype = dtype;
  p.B = B, p.M = M, p.V_D = d.size(2), p.V_A = a.size(2);
  p.d_stride_b = d.stride(0), p.d_stride_m = d.stride(1);
  p.a_stride_b = a.stride(0), p.a_stride_m = a.stride(1);
  p.draft = draft.data_ptr<int64_t>();
  p.pos_start = pos_start.data_ptr<int64_t>();
  p.valid_len = valid_len.data_ptr<int64_t>();
  p.seeds = seeds.data_ptr<int64_t>();
  p.steps = steps.data_ptr<int64_t>();
  p.R = float(R);
  p.cfg = cfg;
  p.acceptance = acceptance == "argmax" ? apd::Acceptance::kArgmax : apd::Acceptance::kCoupled;
  p.eos_ids = eos.data_ptr<int64_t>();
  p.num_eos = eos.numel();
  p.target = target.data_ptr<int64_t>();
  p.n_accept = n_accept.data_ptr<int64_t>();
  dispatch_dtype(dtype, [&](auto tag) { apd::cpu::mixture_accept<decltype(tag)>(p); });
  return {target, n_accept};
}

at::Tensor accept_prefix_cpu(const at::Tensor& draft_in,      // [B, M] int64
                             const at::Tensor& target_in,     // [B, M] int64
                             const at::Tensor& valid_len_in,  // [B] int
                             const at::Tensor& eos_in) {      // [E] int64
  constexpr const char* op = "accept_prefix";
  TORCH_CHECK(draft_in.device().is_cpu() && target_in.device().is_cpu(), op,
              ": draft and target must be on the CPU");
  TORCH_CHECK(draft_in.scalar_type() == at::kLong && target_in.scalar_type() == at::kLong, op,
              ": draft and target must be int64, got ", draft_in.scalar_type(), " and ", target_in.scalar_type());
  TORCH_CHECK(draft_in.dim() == 2 && target_in.sizes() == draft_in.sizes(), op,
              ": draft and target must both be [B, M], got ", draft_in.sizes(), " and ", target_in.sizes());
  const int64_t B = draft_in.size(0), M = draft_in.size(1);
  const at::Tensor draft = draft_in.contiguous(), target = target_in.contiguous();
  const at::Tensor valid_len = batch_int64(op, "valid_len", valid_len_in, B);
  const at::Tensor eos = eos_int64(op, eos_in);
  check_valid_len(op, valid_len, M);
  at::Tensor n_accept = at::empty({B}, draft.options());
  apd::AcceptPrefixParams p{};
  p.draft = draft.data_ptr<int64_t>();
  p.target = target.data_ptr<int64_t>();
  p.valid_len = valid_len.data_ptr<int64_t>();
  p.eos_ids = eos.data_ptr<int64_t>();
  p.num_eos = eos.numel();
  p.B = B, p.M = M;
  p.n_accept = n_accept.data_ptr<int64_t>();
  apd::cpu::accept_prefix(p);
  return n_accept;
}

}  // namespace

TORCH_LIBRARY_IMPL(apd, CPU, m) {
  m.impl("sample_draft", &sample_draft_cpu);
  m.impl("mixture_accept", &mixture_accept_cpu);
  m.impl("accept_prefix", &accept_prefix_cpu);
}
