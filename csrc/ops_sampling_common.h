// Torch-side pieces shared by the CPU and CUDA registrations of the sampling
// core (csrc/ops_cpu_sampling.cpp, csrc/ops_cuda_sampling.cpp): argument checks
// whose messages are the same on both devices, and the filling of the
// torch-free parameter blocks of apd/sampling_params.h. Included only by those
// two .cpp files (never by a .cu: it pulls in ATen). Device placement checks
// take the device the op runs on; on the CPU they say "on the CPU".
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "apd/sampling_params.h"

namespace apd::ops {

inline apd::DType logits_dtype(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return apd::DType::kFloat32;
    case at::kBFloat16: return apd::DType::kBFloat16;
    case at::kHalf: return apd::DType::kFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  return apd::DType::kFloat32;
}

inline void check_on(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  if (dev.is_cpu()) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  } else {
    TORCH_CHECK(t.device() == dev, op, ": ", name, " must be on ", dev, ", got ", t.device());
  }
}

// [B, M, V] logits, 1 <= V <= max_vocab (`vocab_rule` says why, in the
// message); the caller has checked the device.
inline void check_logits_shape(const char* op, const char* name, const at::Tensor& t, int64_t max_vocab,
                               const char* vocab_rule) {
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D [B, M, V], got ", t.sizes());
  TORCH_CHECK(t.size(2) >= 1 && t.size(2) <= max_vocab, op, ": ", name, vocab_rule, t.sizes());
}

// A [B] int32/int64 per-sequence vector as contiguous int64 on `dev`.
inline at::Tensor batch_int64(const char* op, const char* name, const at::Tensor& t, int64_t B,
                              const at::Device& dev, bool int64_only = false) {
  check_on(op, name, t, dev);
  TORCH_CHECK(t.scalar_type() == at::kLong || (!int64_only && t.scalar_type() == at::kInt), op, ": ", name,
              " must be ", int64_only ? "int64" : "int32 or int64", ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, op, ": ", name, " must have shape [", B, "], got ", t.sizes());
  return t.to(at::kLong).contiguous();
}

// The per-sequence vectors of sample_draft and mixture_accept, checked in this
// order and converted by batch_int64.
struct RowVectors {
  at::Tensor pos_start;  // [B] int64
  at::Tensor valid_len;  // [B] int64
  at::Tensor seeds;      // [B] int64
  at::Tensor steps;      // [B] int64
};

inline RowVectors row_vectors(const char* op, const at::Tensor& pos_start, const at::Tensor& valid_len,
                              const at::Tensor& seeds, const at::Tensor& steps, int64_t B, const at::Device& dev) {
  RowVectors r;
  r.pos_start = batch_int64(op, "pos_start", pos_start, B, dev);
  r.valid_len = batch_int64(op, "valid_len", valid_len, B, dev);
  r.seeds = batch_int64(op, "seeds", seeds, B, dev, /*int64_only=*/true);
  r.steps = batch_int64(op, "steps", steps, B, dev);
  return r;
}

// End-of-sequence ids on `dev`, contiguous int64: one [E] list for every row,
// or a [B, E] list per row (negative entries are padding, never matched).
struct EosIds {
  at::Tensor ids;      // [E] or [B, E] int64
  int64_t num, stride;  // entries per row; 0 (shared) or E (per row)
};

inline EosIds eos_int64(const char* op, const at::Tensor& eos, int64_t B, const at::Device& dev) {
  check_on(op, "eos_ids", eos, dev);
  TORCH_CHECK(eos.scalar_type() == at::kLong, op, ": eos_ids must be int64, got ", eos.scalar_type());
  TORCH_CHECK(eos.dim() == 1 || (eos.dim() == 2 && eos.size(0) == B), op, ": eos_ids must be [E] or [B = ", B,
              ", E], got ", eos.sizes());
  const at::Tensor ids = eos.contiguous();
  const int64_t E = ids.size(-1);
  return {ids, E, ids.dim() == 2 ? E : 0};
}

// The optional per-row settings ([B] tensors, apd::RowSettings): undefined =
// every row takes the scalar argument. temperature and top_p are float32, R
// float32 or float64 (converted to float64: apd::row_mixture);
// top_k, compat (1 = "official") and acceptance (1 = "argmax") int32/int64,
// converted to int64. Only shapes, dtypes and devices are checked here; the
// values are checked on the CPU (check_row_values in ops_cpu_sampling.cpp).
struct RowSettingTensors {
  at::Tensor temperature, top_k, top_p, official, R, acceptance;

  apd::RowSettings pointers() const {
    apd::RowSettings s;
    if (temperature.defined()) s.temperature = temperature.data_ptr<float>();
    if (top_k.defined()) s.top_k = top_k.data_ptr<int64_t>();
    if (top_p.defined()) s.top_p = top_p.data_ptr<float>();
    if (official.defined()) s.official = official.data_ptr<int64_t>();
    if (R.defined()) s.R = R.data_ptr<double>();
    if (acceptance.defined()) s.acceptance = acceptance.data_ptr<int64_t>();
    return s;
  }
};

inline at::Tensor row_float32(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t B,
                              const at::Device& dev) {
  if (!t.has_value()) return at::Tensor();
  check_on(op, name, *t, dev);
  TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == B, op, ": ", name, " must have shape [", B, "], got ", t->sizes());
  return t->contiguous();
}

inline at::Tensor row_int64(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t B,
                            const at::Device& dev) {
  return t.has_value() ? batch_int64(op, name, *t, B, dev) : at::Tensor();
}

inline RowSettingTensors row_settings(const char* op, int64_t B, const at::Device& dev,
                                      const std::optional<at::Tensor>& temperature,
                                      const std::optional<at::Tensor>& top_k,
                                      const std::optional<at::Tensor>& top_p,
                                      const std::optional<at::Tensor>& compat,
                                      const std::optional<at::Tensor>& R = std::nullopt,
                                      const std::optional<at::Tensor>& acceptance = std::nullopt) {
  RowSettingTensors r;
  r.temperature = row_float32(op, "row_temperature", temperature, B, dev);
  r.top_k = row_int64(op, "row_top_k", top_k, B, dev);
  r.top_p = row_float32(op, "row_top_p", top_p, B, dev);
  r.official = row_int64(op, "row_compat", compat, B, dev);
  if (R.has_value()) {
    check_on(op, "row_R", *R, dev);
    TORCH_CHECK(R->scalar_type() == at::kFloat || R->scalar_type() == at::kDouble, op,
                ": row_R must be float32 or float64, got ", R->scalar_type());
    TORCH_CHECK(R->dim() == 1 && R->size(0) == B, op, ": row_R must have shape [", B, "], got ", R->sizes());
    r.R = R->to(at::kDouble).contiguous();
  }
  r.acceptance = row_int64(op, "row_acceptance", acceptance, B, dev);
  return r;
}

inline apd::SamplerConfig sampler_config(const char* op, double temperature, int64_t top_k, double top_p,
                                         c10::string_view compat) {
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0.0, op, ": temperature must be finite and >= 0, got ",
              temperature);
  TORCH_CHECK(top_p > 0.0, op, ": top_p must be > 0, got ", top_p);
  TORCH_CHECK(compat.empty() || compat == "official", op, ": compat must be \"\" or \"official\", got \"",
              std::string(compat), "\"");
  // dtype is filled in with the logits' dtype by the *_params builders.
  return apd::SamplerConfig{float(temperature), top_k, float(top_p), compat == "official", apd::DType::kFloat32};
}

// ar_logits [B, M, V_A] against dllm_logits [B, M, V_D]: same dtype, same B and M.
inline void check_ar_like_dllm(const char* op, const at::Tensor& d, const at::Tensor& a) {
  TORCH_CHECK(a.scalar_type() == d.scalar_type(), op, ": ar_logits must have dllm_logits' dtype ",
              d.scalar_type(), ", got ", a.scalar_type());
  TORCH_CHECK(a.size(0) == d.size(0) && a.size(1) == d.size(1), op, ": ar_logits must have shape [", d.size(0),
              ", ", d.size(1), ", V_A], got ", a.sizes());
}

// The scalar arguments of mixture_accept, checked in this order.
struct MixtureConfig {
  apd::SamplerConfig cfg;
  apd::Acceptance acceptance;
};

inline MixtureConfig mixture_config(const char* op, double R, double temperature, int64_t top_k, double top_p,
                                    c10::string_view acceptance, c10::string_view compat) {
  TORCH_CHECK(R >= 0.0 && R <= 1.0, op, ": R must be in [0, 1], got ", R);
  TORCH_CHECK(acceptance == "coupled" || acceptance == "argmax", op,
              ": acceptance must be \"coupled\" or \"argmax\", got \"", std::string(acceptance), "\"");
  const apd::SamplerConfig cfg = sampler_config(op, temperature, top_k, top_p, compat);
  TORCH_CHECK(!(cfg.official && acceptance == "coupled"), op,
              ": compat=\"official\" uses acceptance=\"argmax\", got \"coupled\"");
  return {cfg, acceptance == "argmax" ? apd::Acceptance::kArgmax : apd::Acceptance::kCoupled};
}

// Banned ids [ban_start, ban_end) (SEMANTICS.md "Banned ids"); equal bounds: none.
inline void check_banned(const char* op, int64_t ban_start, int64_t ban_end) {
  TORCH_CHECK(ban_start >= 0 && ban_start <= ban_end, op, ": banned ids must be a range 0 <= ban_start <= ban_end, got [",
              ban_start, ", ", ban_end, ")");
}

// Parameter blocks from checked tensors: logits unit-stride along V, all int
// tensors contiguous int64, outputs freshly allocated.
inline apd::SampleDraftParams sample_draft_params(const at::Tensor& logits,     // [B, M, V]
                                                  apd::DType dtype,
                                                  const RowVectors& rows,
                                                  const apd::SamplerConfig& cfg,
                                                  const RowSettingTensors& per_row,
                                                  at::Tensor& draft) {          // [B, M] out
  apd::SampleDraftParams p{};
  p.logits = logits.data_ptr();
  p.dtype = dtype;
  p.B = logits.size(0), p.M = logits.size(1), p.V = logits.size(2);
  p.stride_b = logits.stride(0), p.stride_m = logits.stride(1);
  p.pos_start = rows.pos_start.data_ptr<int64_t>();
  p.valid_len = rows.valid_len.data_ptr<int64_t>();
  p.seeds = rows.seeds.data_ptr<int64_t>();
  p.steps = rows.steps.data_ptr<int64_t>();
  p.cfg = cfg;
  p.cfg.dtype = dtype;
  p.per_row = per_row.pointers();
  p.draft = draft.data_ptr<int64_t>();
  return p;
}

inline apd::MixtureAcceptParams mixture_accept_params(const at::Tensor& d,          // [B, M, V_D]
                                                      const at::Tensor& a,          // [B, M, V_A]
                                                      apd::DType dtype,
                                                      const at::Tensor& draft,      // [B, M]
                                                      const RowVectors& rows,
                                                      double R, const MixtureConfig& mc,
                                                      const RowSettingTensors& per_row,
                                                      const EosIds& eos,
                                                      at::Tensor& target,           // [B, M] out
                                                      at::Tensor& n_accept) {       // [B] out
  apd::MixtureAcceptParams p{};
  p.dllm_logits = d.data_ptr();
  p.ar_logits = a.data_ptr();
  p.dtype = dtype;
  p.B = d.size(0), p.M = d.size(1), p.V_D = d.size(2), p.V_A = a.size(2);
  p.d_stride_b = d.stride(0), p.d_stride_m = d.stride(1);
  p.a_stride_b = a.stride(0), p.a_stride_m = a.stride(1);
  p.draft = draft.data_ptr<int64_t>();
  p.pos_start = rows.pos_start.data_ptr<int64_t>();
  p.valid_len = rows.valid_len.data_ptr<int64_t>();
  p.seeds = rows.seeds.data_ptr<int64_t>();
  p.steps = rows.steps.data_ptr<int64_t>();
  p.R = R;  // rounded per row by apd::row_mixture (SEMANTICS.md "Numbers")
  p.cfg = mc.cfg;
  p.cfg.dtype = dtype;
  p.acceptance = mc.acceptance;
  p.per_row = per_row.pointers();
  p.eos_ids = eos.ids.data_ptr<int64_t>();
  p.num_eos = eos.num, p.eos_stride = eos.stride;
  p.target = target.data_ptr<int64_t>();
  p.n_accept = n_accept.data_ptr<int64_t>();
  return p;
}

inline apd::AcceptPrefixParams accept_prefix_params(const at::Tensor& draft,      // [B, M]
                                                    const at::Tensor& target,     // [B, M]
                                                    const at::Tensor& valid_len,  // [B]
                                                    const EosIds& eos,
                                                    at::Tensor& n_accept) {       // [B] out
  apd::AcceptPrefixParams p{};
  p.draft = draft.data_ptr<int64_t>();
  p.target = target.data_ptr<int64_t>();
  p.valid_len = valid_len.data_ptr<int64_t>();
  p.eos_ids = eos.ids.data_ptr<int64_t>();
  p.num_eos = eos.num, p.eos_stride = eos.stride;
  p.B = draft.size(0), p.M = draft.size(1);
  p.n_accept = n_accept.data_ptr<int64_t>();
  return p;
}

}  // namespace apd::ops
