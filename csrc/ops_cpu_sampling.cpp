// CPU implementations of the sampling core (DESIGN.md §4): sample_draft,
// mixture_accept, accept_prefix. Checks here are for direct torch.ops callers
// (python/apd_ext/ops.py checks first, with friendlier messages); int inputs
// become contiguous int64, the vocabulary dimension is made unit-stride only
// when it is not, and the torch-free kernels of apd/cpu/sampling.h do the rest.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "apd/cpu/sampling.h"
#include "apd/sampling_params.h"
#include "ops_sampling_common.h"

namespace {

using apd::ops::batch_int64;
using apd::ops::eos_int64;
using apd::ops::logits_dtype;
using apd::ops::sampler_config;

const at::Device kCpu(at::kCPU);

// [B, M, V] logits with stride 1 along V (copy only when it is not).
at::Tensor unit_stride_vocab(const char* op, const char* name, const at::Tensor& t) {
  apd::ops::check_on(op, name, t, kCpu);
  apd::ops::check_logits_shape(op, name, t, INT32_MAX,
                               " needs a vocabulary of 1 to 2^31 - 1 entries (int32 candidate indices), got ");
  return t.stride(2) == 1 ? t : t.contiguous();
}

void check_valid_len(const char* op, const at::Tensor& valid_len, int64_t M) {
  const int64_t* vl = valid_len.data_ptr<int64_t>();
  for (int64_t b = 0; b < valid_len.size(0); ++b)
    TORCH_CHECK(vl[b] >= 0 && vl[b] <= M, op, ": valid_len[", b, "] must be in [0, M = ", M, "], got ", vl[b]);
}

// Values of the per-row settings (the scalar checks of sampler_config /
// mixture_config, row by row). Free here: the tensors are on the CPU.
void check_row_values(const char* op, const apd::ops::RowSettingTensors& t, const apd::SamplerConfig& cfg,
                      apd::Acceptance acceptance, int64_t B) {
  const apd::RowSettings s = t.pointers();
  for (int64_t b = 0; b < B; ++b) {
    const apd::SamplerConfig c = apd::row_config(cfg, s, b);
    TORCH_CHECK(std::isfinite(c.temperature) && c.temperature >= 0.0f, op, ": row_temperature[", b,
                "] must be finite and >= 0, got ", c.temperature);
    TORCH_CHECK(c.top_p > 0.0f && c.top_p <= 1.0f, op, ": row_top_p[", b, "] must be in (0, 1], got ", c.top_p);
    if (s.official)
      TORCH_CHECK(s.official[b] == 0 || s.official[b] == 1, op, ": row_compat[", b,
                  "] must be 0 (default) or 1 (\"official\"), got ", s.official[b]);
    if (s.R)
      TORCH_CHECK(s.R[b] >= 0.0f && s.R[b] <= 1.0f, op, ": row_R[", b, "] must be in [0, 1], got ", s.R[b]);
    if (s.acceptance)
      TORCH_CHECK(s.acceptance[b] == 0 || s.acceptance[b] == 1, op, ": row_acceptance[", b,
                  "] must be 0 (\"coupled\") or 1 (\"argmax\"), got ", s.acceptance[b]);
    const bool argmax = s.acceptance ? s.acceptance[b] == 1 : acceptance == apd::Acceptance::kArgmax;
    if (s.official || s.acceptance)
      TORCH_CHECK(!(c.official && !argmax), op, ": row ", b, ": compat=\"official\" uses acceptance=\"argmax\"");
  }
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
                            double temperature, int64_t top_k, double top_p, c10::string_view compat,
                            int64_t ban_start, int64_t ban_end,
                            const std::optional<at::Tensor>& row_temperature,  // [B] float32
                            const std::optional<at::Tensor>& row_top_k,        // [B] int
                            const std::optional<at::Tensor>& row_top_p,        // [B] float32
                            const std::optional<at::Tensor>& row_compat) {     // [B] int
  constexpr const char* op = "sample_draft";
  const at::Tensor logits = unit_stride_vocab(op, "logits", logits_in);
  const apd::DType dtype = logits_dtype(op, "logits", logits);
  const int64_t B = logits.size(0), M = logits.size(1);
  const apd::ops::RowVectors rows =
      apd::ops::row_vectors(op, pos_start_in, valid_len_in, seeds_in, steps_in, B, kCpu);
  check_valid_len(op, rows.valid_len, M);
  const apd::SamplerConfig cfg = sampler_config(op, temperature, top_k, top_p, compat);
  apd::ops::check_banned(op, ban_start, ban_end);
  const apd::ops::RowSettingTensors per_row =
      apd::ops::row_settings(op, B, kCpu, row_temperature, row_top_k, row_top_p, row_compat);
  check_row_values(op, per_row, cfg, apd::Acceptance::kArgmax, B);

  at::Tensor draft = at::empty({B, M}, logits.options().dtype(at::kLong));
  if (draft.numel() == 0) return draft;
  apd::SampleDraftParams p = apd::ops::sample_draft_params(logits, dtype, rows, cfg, per_row, draft);
  p.ban_start = ban_start, p.ban_end = ban_end;
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
    c10::string_view acceptance, c10::string_view compat, int64_t ban_start, int64_t ban_end,
    const std::optional<at::Tensor>& row_R,            // [B] float32
    const std::optional<at::Tensor>& row_temperature,  // [B] float32
    const std::optional<at::Tensor>& row_top_k,        // [B] int
    const std::optional<at::Tensor>& row_top_p,        // [B] float32
    const std::optional<at::Tensor>& row_acceptance,   // [B] int
    const std::optional<at::Tensor>& row_compat) {     // [B] int
  constexpr const char* op = "mixture_accept";
  const at::Tensor d = unit_stride_vocab(op, "dllm_logits", dllm_in);
  const at::Tensor a = unit_stride_vocab(op, "ar_logits", ar_in);
  const apd::DType dtype = logits_dtype(op, "dllm_logits", d);
  apd::ops::check_ar_like_dllm(op, d, a);
  const int64_t B = d.size(0), M = d.size(1);
  TORCH_CHECK(draft_in.device().is_cpu() && draft_in.scalar_type() == at::kLong && draft_in.dim() == 2 &&
                  draft_in.size(0) == B && draft_in.size(1) == M,
              op, ": draft must be an int64 CPU tensor of shape [", B, ", ", M, "], got ", draft_in.scalar_type(),
              " ", draft_in.sizes(), " on ", draft_in.device());
  const at::Tensor draft = draft_in.contiguous();
  const apd::ops::RowVectors rows =
      apd::ops::row_vectors(op, pos_start_in, valid_len_in, seeds_in, steps_in, B, kCpu);
  const apd::ops::EosIds eos = eos_int64(op, eos_in, B, kCpu);
  check_valid_len(op, rows.valid_len, M);
  const apd::ops::MixtureConfig mc =
      apd::ops::mixture_config(op, R, temperature, top_k, top_p, acceptance, compat);
  apd::ops::check_banned(op, ban_start, ban_end);
  const apd::ops::RowSettingTensors per_row = apd::ops::row_settings(
      op, B, kCpu, row_temperature, row_top_k, row_top_p, row_compat, row_R, row_acceptance);
  check_row_values(op, per_row, mc.cfg, mc.acceptance, B);

  at::Tensor target = at::empty({B, M}, d.options().dtype(at::kLong));
  at::Tensor n_accept = at::empty({B}, d.options().dtype(at::kLong));
  if (B == 0) return {target, n_accept};
  apd::MixtureAcceptParams p =
      apd::ops::mixture_accept_params(d, a, dtype, draft, rows, R, mc, per_row, eos, target, n_accept);
  p.ban_start = ban_start, p.ban_end = ban_end;
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
  const at::Tensor valid_len = batch_int64(op, "valid_len", valid_len_in, B, kCpu);
  const apd::ops::EosIds eos = eos_int64(op, eos_in, B, kCpu);
  check_valid_len(op, valid_len, M);
  at::Tensor n_accept = at::empty({B}, draft.options());
  const apd::AcceptPrefixParams p = apd::ops::accept_prefix_params(draft, target, valid_len, eos, n_accept);
  apd::cpu::accept_prefix(p);
  return n_accept;
}

}  // namespace

TORCH_LIBRARY_IMPL(apd, CPU, m) {
  m.impl("sample_draft", &sample_draft_cpu);
  m.impl("mixture_accept", &mixture_accept_cpu);
  m.impl("accept_prefix", &accept_prefix_cpu);
}
