// CUDA registration of the sampling core (DESIGN.md §4): sample_draft,
// mixture_accept, accept_prefix. Checks here are for direct torch.ops callers
// (python/apd_ext/ops.py checks first, with friendlier messages); int inputs
// become contiguous int64 on the device, the vocabulary dimension is made
// unit-stride only when it is not, outputs come from the caching allocator and
// the kernels of csrc/cuda/sampling.cu run on the current stream. Nothing here
// reads device memory on the host: no synchronisation, CUDA-graph capturable.
// (valid_len VALUES are not checked here for that reason; the wrapper does.)
// ATen/cuda/CUDAContext.h is avoided: it needs cuSPARSE headers that a bare
// CUDA toolkit install may lack.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "apd/sampling_launch.h"
#include "apd/sampling_params.h"
#include "ops_sampling_common.h"

namespace {

using apd::ops::batch_int64;
using apd::ops::eos_int64;
using apd::ops::logits_dtype;
using apd::ops::sampler_config;

// [B, M, V] logits on a CUDA device with stride 1 along V (copy only when it is not).
at::Tensor unit_stride_vocab(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  apd::ops::check_logits_shape(op, name, t, apd::kMaxSampleVocab,
                               " needs a vocabulary of 1 to 2^23 entries on CUDA, got ");
  return t.stride(2) == 1 ? t : t.contiguous();
}

// [B, M] int64 ids on `dev`, contiguous.
at::Tensor ids_int64(const char* op, const char* name, const at::Tensor& t, int64_t B, int64_t M,
                     const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, op, ": ", name, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == M, op, ": ", name, " must have shape [", B, ", ", M,
              "], got ", t.sizes());
  return t.contiguous();
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor sample_draft_cuda(const at::Tensor& logits_in,     // [B, M, V]
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
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Device dev = logits.device();
  const apd::DType dtype = logits_dtype(op, "logits", logits);
  const int64_t B = logits.size(0), M = logits.size(1);
  const apd::ops::RowVectors rows =
      apd::ops::row_vectors(op, pos_start_in, valid_len_in, seeds_in, steps_in, B, dev);
  const apd::SamplerConfig cfg = sampler_config(op, temperature, top_k, top_p, compat);
  apd::ops::check_banned(op, ban_start, ban_end);
  // Per-row VALUES are not read here (a sync); the Python wrapper checks them.
  const apd::ops::RowSettingTensors per_row =
      apd::ops::row_settings(op, B, dev, row_temperature, row_top_k, row_top_p, row_compat);
  TORCH_CHECK(B * M <= INT32_MAX, op, ": B * M must be below 2^31 (one CTA per row), got ", B * M);

  at::Tensor draft = at::empty({B, M}, logits.options().dtype(at::kLong));
  if (draft.numel() == 0) return draft;
  apd::SampleDraftParams p = apd::ops::sample_draft_params(logits, dtype, rows, cfg, per_row, draft);
  p.ban_start = ban_start, p.ban_end = ban_end;
  check_launch(op, apd::launch_sample_draft(p, c10::cuda::getCurrentCUDAStream()));
  return draft;
}

std::tuple<at::Tensor, at::Tensor> mixture_accept_cuda(
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
  const c10::cuda::CUDAGuard guard(d.device());
  const at::Device dev = d.device();
  TORCH_CHECK(ar_in.device() == dev, op, ": ar_logits must be on ", dev, ", got ", ar_in.device());
  const at::Tensor a = unit_stride_vocab(op, "ar_logits", ar_in);
  const apd::DType dtype = logits_dtype(op, "dllm_logits", d);
  apd::ops::check_ar_like_dllm(op, d, a);
  const int64_t B = d.size(0), M = d.size(1);
  const at::Tensor draft = ids_int64(op, "draft", draft_in, B, M, dev);
  const apd::ops::RowVectors rows =
      apd::ops::row_vectors(op, pos_start_in, valid_len_in, seeds_in, steps_in, B, dev);
  const apd::ops::EosIds eos = eos_int64(op, eos_in, B, dev);
  const apd::ops::MixtureConfig mc =
      apd::ops::mixture_config(op, R, temperature, top_k, top_p, acceptance, compat);
  apd::ops::check_banned(op, ban_start, ban_end);
  const apd::ops::RowSettingTensors per_row = apd::ops::row_settings(
      op, B, dev, row_temperature, row_top_k, row_top_p, row_compat, row_R, row_acceptance);
  TORCH_CHECK(B * M <= INT32_MAX, op, ": B * M must be below 2^31 (one CTA per row), got ", B * M);

  at::Tensor target = at::empty({B, M}, d.options().dtype(at::kLong));
  at::Tensor n_accept = at::empty({B}, d.options().dtype(at::kLong));
  if (B == 0) return {target, n_accept};
  apd::MixtureAcceptParams p =
      apd::ops::mixture_accept_params(d, a, dtype, draft, rows, R, mc, per_row, eos, target, n_accept);
  p.ban_start = ban_start, p.ban_end = ban_end;
  check_launch(op, apd::launch_mixture_accept(p, c10::cuda::getCurrentCUDAStream()));
  return {target, n_accept};
}

at::Tensor accept_prefix_cuda(const at::Tensor& draft_in,      // [B, M] int64
                              const at::Tensor& target_in,     // [B, M] int64
                              const at::Tensor& valid_len_in,  // [B] int
                              const at::Tensor& eos_in) {      // [E] int64
  constexpr const char* op = "accept_prefix";
  TORCH_CHECK(draft_in.is_cuda(), op, ": draft must be a CUDA tensor, got one on ", draft_in.device());
  TORCH_CHECK(draft_in.dim() == 2, op, ": draft must be 2-D [B, M], got ", draft_in.sizes());
  const c10::cuda::CUDAGuard guard(draft_in.device());
  const at::Device dev = draft_in.device();
  const int64_t B = draft_in.size(0), M = draft_in.size(1);
  const at::Tensor draft = ids_int64(op, "draft", draft_in, B, M, dev);
  const at::Tensor target = ids_int64(op, "target", target_in, B, M, dev);
  const at::Tensor valid_len = batch_int64(op, "valid_len", valid_len_in, B, dev);
  const apd::ops::EosIds eos = eos_int64(op, eos_in, B, dev);
  at::Tensor n_accept = at::empty({B}, draft.options());
  const apd::AcceptPrefixParams p = apd::ops::accept_prefix_params(draft, target, valid_len, eos, n_accept);
  check_launch(op, apd::launch_accept_prefix(p, c10::cuda::getCurrentCUDAStream()));
  return n_accept;
}

}  // namespace

TORCH_LIBRARY_IMPL(apd, CUDA, m) {
  m.impl("sample_draft", &sample_draft_cuda);
  m.impl("mixture_accept", &mixture_accept_cuda);
  m.impl("accept_prefix", &accept_prefix_cuda);
}
