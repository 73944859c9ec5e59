// TEST-ONLY. torch.ops.apd_emu.*: the CUDA launchers of csrc/cuda (compiled as
// host code against the CPU execution model) on CPU tensors. Never part of the
// wheel, never registered under torch.ops.apd: a test asks for it by name.
//
// Every call runs the launcher under each schedule of set_schedules() (default:
// forward, reverse, seeded shuffle) into freshly poisoned outputs, and fails
// unless all runs agree bit for bit: a schedule-dependent result is a race (a
// missing __syncthreads / __syncwarp) or a read of unwritten memory.
// Argument checks are those of the CUDA bindings (csrc/ops_cuda_*.cpp), shared
// through csrc/ops_*_common.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "apd/attention_launch.h"
#include "apd/sampling_launch.h"
#include "apd_emu/emu.h"
#include "ops_attention_common.h"
#include "ops_sampling_common.h"

namespace {

std::vector<int64_t> g_schedules = {0, 1, 2};
int64_t g_seed = 1234;

const char* schedule_name(int64_t k) { return k == 0 ? "forward" : (k == 1 ? "reverse" : "shuffle"); }

// Fills t with a schedule-dependent byte pattern: an output element that the
// kernels never write then differs between schedules.
void poison(at::Tensor& t, int64_t schedule) {
  if (t.numel() == 0) return;
  std::memset(t.data_ptr(), schedule == 0 ? 0x5a : (schedule == 1 ? 0xa5 : 0x3c), t.nbytes());
}

// Runs launch(outs) under every schedule; outputs of the first run are returned.
// outs[i] for i < names.size() are compared between schedules.
std::vector<at::Tensor> run_schedules(const char* op, const std::vector<const char*>& names,
                                      const std::function<std::vector<at::Tensor>()>& alloc,
                                      const std::function<cudaError_t(std::vector<at::Tensor>&)>& launch) {
  TORCH_CHECK(!g_schedules.empty(), op, ": no schedule set");
  std::vector<at::Tensor> first;
  for (size_t s = 0; s < g_schedules.size(); ++s) {
    std::vector<at::Tensor> outs = alloc();
    for (auto& t : outs) poison(t, g_schedules[s]);
    apd_emu::set_schedule(int(g_schedules[s]), uint64_t(g_seed));
    cudaError_t err;
    try {
      err = launch(outs);
    } catch (const apd_emu::Error& e) {
      TORCH_CHECK(false, op, " (schedule ", schedule_name(g_schedules[s]), "): ", e.what());
    }
    TORCH_CHECK(err == cudaSuccess, op, ": emulated CUDA launch failed: ", cudaGetErrorString(err));
    if (s == 0) {
      first = outs;
      continue;
    }
    // Only the named outputs: the rest (a split workspace) is scratch whose
    // unused parts keep the poison.
    for (size_t i = 0; i < names.size(); ++i) {
      const at::Tensor& a = first[i];
      const at::Tensor& b = outs[i];
      if (a.numel() == 0 || std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) == 0) continue;
      const auto* pa = static_cast<const unsigned char*>(a.data_ptr());
      const auto* pb = static_cast<const unsigned char*>(b.data_ptr());
      int64_t at_byte = 0;
      while (pa[at_byte] == pb[at_byte]) ++at_byte;
      TORCH_CHECK(false, op, ": output '", names[i], "' depends on the thread schedule (", schedule_name(g_schedules[0]),
                  " vs ", schedule_name(g_schedules[s]), ", first difference at element ",
                  at_byte / int64_t(a.element_size()), "): a race in the kernel");
    }
  }
  return first;
}

at::Tensor unit_stride_vocab(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the emulator, got ", t.device());
  apd::ops::check_logits_shape(op, name, t, apd::kMaxSampleVocab, " needs a vocabulary of 1 to 2^23 entries, got ");
  return t.stride(2) == 1 ? t : t.contiguous();
}

at::Tensor ids_int64(const char* op, const char* name, const at::Tensor& t, int64_t B, int64_t M) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == M, op, ": ", name, " must have shape [", B, ", ", M,
              "], got ", t.sizes());
  return t.contiguous();
}

at::Tensor sample_draft_emu(const at::Tensor& logits_in, const at::Tensor& pos_start, const at::Tensor& valid_len,
                            const at::Tensor& seeds, const at::Tensor& steps, double temperature, int64_t top_k,
                            double top_p, c10::string_view compat, int64_t ban_start, int64_t ban_end,
                            const std::optional<at::Tensor>& row_temperature,
                            const std::optional<at::Tensor>& row_top_k,
                            const std::optional<at::Tensor>& row_top_p,
                            const std::optional<at::Tensor>& row_compat) {
  constexpr const char* op = "apd_emu.sample_draft";
  const at::Tensor logits = unit_stride_vocab(op, "logits", logits_in);
  const apd::DType dtype = apd::ops::logits_dtype(op, "logits", logits);
  const int64_t B = logits.size(0), M = logits.size(1);
  const apd::ops::RowVectors rows =
      apd::ops::row_vectors(op, pos_start, valid_len, seeds, steps, B, at::Device(at::kCPU));
  const apd::SamplerConfig cfg = apd::ops::sampler_config(op, temperature, top_k, top_p, compat);
  apd::ops::check_banned(op, ban_start, ban_end);
  const apd::ops::RowSettingTensors per_row = apd::ops::row_settings(
      op, B, at::Device(at::kCPU), row_temperature, row_top_k, row_top_p, row_compat);
  TORCH_CHECK(B * M <= INT32_MAX, op, ": B * M must be below 2^31, got ", B * M);
  auto alloc = [&] { return std::vector<at::Tensor>{at::empty({B, M}, logits.options().dtype(at::kLong))}; };
  if (B * M == 0) return alloc()[0];
  return run_schedules(op, {"draft"}, alloc, [&](std::vector<at::Tensor>& o) {
    apd::SampleDraftParams p = apd::ops::sample_draft_params(logits, dtype, rows, cfg, per_row, o[0]);
    p.ban_start = ban_start, p.ban_end = ban_end;
    return apd::launch_sample_draft(p, nullptr);
  })[0];
}

std::tuple<at::Tensor, at::Tensor> mixture_accept_emu(const at::Tensor& dllm_in, const at::Tensor& ar_in,
                                                      const at::Tensor& draft_in, const at::Tensor& pos_start,
                                                      const at::Tensor& valid_len, const at::Tensor& seeds,
                                                      const at::Tensor& steps, double R, double temperature,
                                                      int64_t top_k, double top_p, const at::Tensor& eos_in,
                                                      c10::string_view acceptance, c10::string_view compat,
                                                      int64_t ban_start, int64_t ban_end,
                                                      const std::optional<at::Tensor>& row_R,
                                                      const std::optional<at::Tensor>& row_temperature,
                                                      const std::optional<at::Tensor>& row_top_k,
                                                      const std::optional<at::Tensor>& row_top_p,
                                                      const std::optional<at::Tensor>& row_acceptance,
                                                      const std::optional<at::Tensor>& row_compat) {
  constexpr const char* op = "apd_emu.mixture_accept";
  const at::Device cpu(at::kCPU);
  const at::Tensor d = unit_stride_vocab(op, "dllm_logits", dllm_in);
  const at::Tensor a = unit_stride_vocab(op, "ar_logits", ar_in);
  const apd::DType dtype = apd::ops::logits_dtype(op, "dllm_logits", d);
  apd::ops::check_ar_like_dllm(op, d, a);
  const int64_t B = d.size(0), M = d.size(1);
  const at::Tensor draft = ids_int64(op, "draft", draft_in, B, M);
  const apd::ops::RowVectors rows = apd::ops::row_vectors(op, pos_start, valid_len, seeds, steps, B, cpu);
  const apd::ops::EosIds eos = apd::ops::eos_int64(op, eos_in, B, cpu);
  const apd::ops::MixtureConfig mc = apd::ops::mixture_config(op, R, temperature, top_k, top_p, acceptance, compat);
  apd::ops::check_banned(op, ban_start, ban_end);
  const apd::ops::RowSettingTensors per_row = apd::ops::row_settings(
      op, B, cpu, row_temperature, row_top_k, row_top_p, row_compat, row_R, row_acceptance);
  auto alloc = [&] {
    return std::vector<at::Tensor>{at::empty({B, M}, d.options().dtype(at::kLong)),
                                   at::empty({B}, d.options().dtype(at::kLong))};
  };
  if (B == 0) {
    auto o = alloc();
    return {o[0], o[1]};
  }
  auto o = run_schedules(op, {"target", "n_accept"}, alloc, [&](std::vector<at::Tensor>& out) {
    apd::MixtureAcceptParams p =
        apd::ops::mixture_accept_params(d, a, dtype, draft, rows, R, mc, per_row, eos, out[0], out[1]);
    p.ban_start = ban_start, p.ban_end = ban_end;
    return apd::launch_mixture_accept(p, nullptr);
  });
  return {o[0], o[1]};
}

at::Tensor accept_prefix_emu(const at::Tensor& draft_in, const at::Tensor& target_in, const at::Tensor& valid_len_in,
                             const at::Tensor& eos_in) {
  constexpr const char* op = "apd_emu.accept_prefix";
  const at::Device cpu(at::kCPU);
  TORCH_CHECK(draft_in.dim() == 2, op, ": draft must be 2-D [B, M], got ", draft_in.sizes());
  const int64_t B = draft_in.size(0), M = draft_in.size(1);
  const at::Tensor draft = ids_int64(op, "draft", draft_in, B, M);
  const at::Tensor target = ids_int64(op, "target", target_in, B, M);
  const at::Tensor valid_len = apd::ops::batch_int64(op, "valid_len", valid_len_in, B, cpu);
  const apd::ops::EosIds eos = apd::ops::eos_int64(op, eos_in, B, cpu);
  auto alloc = [&] { return std::vector<at::Tensor>{at::empty({B}, draft.options())}; };
  return run_schedules(op, {"n_accept"}, alloc, [&](std::vector<at::Tensor>& o) {
    const apd::AcceptPrefixParams p = apd::ops::accept_prefix_params(draft, target, valid_len, eos, o[0]);
    return apd::launch_accept_prefix(p, nullptr);
  })[0];
}

// window_attention with the kernel choice as arguments (the CUDA binding reads
// APD_ATTN_IMPL / APD_ATTN_SPLITS): impl "simple" or "mma", num_splits 0 =
// the planner's heuristic (on the active device profile, set_device).
at::Tensor window_attention_emu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const at::Tensor& q_start_in, const at::Tensor& q_len_in, const at::Tensor& kv_len_in,
                                bool causal, double scale, c10::string_view impl, int64_t num_splits) {
  constexpr const char* op = "apd_emu.window_attention";
  TORCH_CHECK(q_in.device().is_cpu() && k_in.device().is_cpu() && v_in.device().is_cpu(), op,
              ": q, k_cache and v_cache must be CPU tensors for the emulator");
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.sizes() == k_in.sizes(), op,
              ": q [B, Lq, Hq, D], k_cache and v_cache [B, Lmax, Hkv, D] expected");
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(), op,
              ": q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(impl == "simple" || impl == "mma", op, ": impl must be \"simple\" or \"mma\"");
  TORCH_CHECK(num_splits >= 0 && num_splits <= 65535, op, ": num_splits must be in [0, 65535]");
  apd::ops::check_k_like_q(q_in, k_in);
  const int64_t B = q_in.size(0), Lq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  const apd::DType dtype = apd::ops::attention_dtype(q_in.scalar_type());
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  const at::Tensor q_start = q_start_in.to(at::kLong).contiguous();
  const at::Tensor q_len = q_len_in.to(at::kLong).contiguous();
  const at::Tensor kv_len = kv_len_in.to(at::kLong).contiguous();
  apd::WindowAttentionOptions opt;
  opt.impl = impl == "mma" ? apd::AttnImpl::kMma : apd::AttnImpl::kSimple;
  opt.num_splits = int(num_splits);
  at::Tensor probe = at::empty({B, Lq, Hq, D}, q.options());
  if (probe.numel() == 0) return probe;
  const apd::WindowAttentionParams p0 =
      apd::ops::window_attention_params(q, k, v, probe, dtype, q_start, q_len, kv_len, causal, scale);
  if (const char* why = apd::window_attention_unsupported(p0)) TORCH_CHECK(false, op, ": ", why);
  const apd::WindowAttentionPlan plan = apd::plan_window_attention(p0, opt);
  auto alloc = [&] {
    std::vector<at::Tensor> o{at::empty({B, Lq, Hq, D}, q.options())};
    if (plan.workspace_bytes > 0) o.push_back(at::empty({int64_t(plan.workspace_bytes)}, q.options().dtype(at::kByte)));
    return o;
  };
  auto outs = run_schedules(op, {"out"}, alloc, [&](std::vector<at::Tensor>& o) {
    const apd::WindowAttentionParams p =
        apd::ops::window_attention_params(q, k, v, o[0], dtype, q_start, q_len, kv_len, causal, scale);
    return apd::launch_window_attention(p, plan, plan.workspace_bytes > 0 ? o[1].data_ptr() : nullptr,
                                        plan.workspace_bytes, nullptr);
  });
  return outs[0];
}

// The plan the CUDA path would use on the active device profile (impl,
// splits, block_m, dynamic shared memory bytes), for tests that must know that
// a case really took the mma kernel, a split or a tile. splits: those of
// sequence 0 (q_len = Lq, its kv_len) under the plan's per-sequence rule
// (apd/attention_split.h): every sequence's own, whatever the batch.
std::tuple<std::string, int64_t, int64_t, int64_t> window_attention_plan_emu(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& kv_len, c10::string_view impl,
                                                          int64_t num_splits) {
  const at::Tensor q_len = at::full({q.size(0)}, q.size(1), kv_len.options().dtype(at::kLong));
  const at::Tensor kv = kv_len.to(at::kLong).contiguous();
  at::Tensor out = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
  const apd::WindowAttentionParams p = apd::ops::window_attention_params(
      q, k, k, out, apd::ops::attention_dtype(q.scalar_type()), at::zeros_like(kv), q_len, kv, false, 1.0);
  apd::WindowAttentionOptions opt;
  opt.impl = impl == "mma" ? apd::AttnImpl::kMma : apd::AttnImpl::kSimple;
  opt.num_splits = int(num_splits);
  const apd::WindowAttentionPlan plan = apd::plan_window_attention(p, opt);
  const int64_t kv0 = q.size(0) > 0 ? kv[0].item<int64_t>() : 0;
  const int splits = apd::row_splits(plan.split, int(q.size(1)), int(std::min<int64_t>(kv0, k.size(1))));
  return {plan.impl == apd::AttnImpl::kMma ? "mma" : "simple", int64_t(splits), int64_t(plan.block_m),
          int64_t(plan.smem_bytes)};
}

void set_schedules(std::vector<int64_t> kinds, int64_t seed) {
  for (int64_t k : kinds) TORCH_CHECK(k >= 0 && k <= 2, "apd_emu.set_schedules: kinds are 0, 1, 2, got ", k);
  TORCH_CHECK(!kinds.empty(), "apd_emu.set_schedules: at least one schedule");
  g_schedules = std::move(kinds);
  g_seed = seed;
}

int64_t last_sync_points() { return int64_t(apd_emu::collectives_resolved()); }

// The emulated devices are device profiles (apd_emu/emu.h): the planners read
// the active one through cudaGetDevice / cudaDeviceGetAttribute.
void set_device(int64_t device) {
  TORCH_CHECK(device >= 0 && device < apd_emu::device_count(), "apd_emu.set_device: device must be in [0, ",
              apd_emu::device_count(), "), got ", device);
  TORCH_CHECK(cudaSetDevice(int(device)) == cudaSuccess, "apd_emu.set_device: failed");
}
int64_t get_device() { return apd_emu::active_device(); }
int64_t device_count() { return apd_emu::device_count(); }
// (name, compute capability as 10 major + minor, opt-in smem per block, smem per SM, SMs, registers per SM)
std::tuple<std::string, int64_t, int64_t, int64_t, int64_t, int64_t> device_profile(int64_t device) {
  TORCH_CHECK(device >= 0 && device < apd_emu::device_count(), "apd_emu.device_profile: device must be in [0, ",
              apd_emu::device_count(), "), got ", device);
  const apd_emu::DeviceProfile& d = apd_emu::device_profile(int(device));
  return {d.name, d.cc_major * 10 + d.cc_minor, d.smem_optin, d.smem_per_sm, d.sm_count, d.regs_per_sm};
}

}  // namespace

TORCH_LIBRARY(apd_emu, m) {
  // The schemas of csrc/torch_bindings.cpp.
  m.def("sample_draft(Tensor logits, Tensor pos_start, Tensor valid_len, Tensor seeds, Tensor steps, "
        "float temperature, int top_k, float top_p, str compat, int ban_start=0, int ban_end=0, "
        "Tensor? row_temperature=None, Tensor? row_top_k=None, Tensor? row_top_p=None, "
        "Tensor? row_compat=None) -> Tensor");
  m.def("mixture_accept(Tensor dllm_logits, Tensor ar_logits, Tensor draft, Tensor pos_start, Tensor valid_len, "
        "Tensor seeds, Tensor steps, float R, float temperature, int top_k, float top_p, Tensor eos_ids, "
        "str acceptance, str compat, int ban_start=0, int ban_end=0, "
        "Tensor? row_R=None, Tensor? row_temperature=None, Tensor? row_top_k=None, Tensor? row_top_p=None, "
        "Tensor? row_acceptance=None, Tensor? row_compat=None) -> (Tensor, Tensor)");
  m.def("accept_prefix(Tensor draft, Tensor target, Tensor valid_len, Tensor eos_ids) -> Tensor");
  m.def("window_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor q_start, Tensor q_len, Tensor kv_len, "
        "bool causal, float scale, str impl, int num_splits) -> Tensor");
  m.def("window_attention_plan(Tensor q, Tensor k_cache, Tensor kv_len, str impl, int num_splits) -> (str, int, int, int)");
  m.def("set_schedules(int[] kinds, int seed) -> ()");
  m.def("last_sync_points() -> int");
  m.def("set_device(int device) -> ()");
  m.def("get_device() -> int");
  m.def("device_count() -> int");
  m.def("device_profile(int device) -> (str, int, int, int, int, int)");
}

TORCH_LIBRARY_IMPL(apd_emu, CPU, m) {
  m.impl("sample_draft", &sample_draft_emu);
  m.impl("mixture_accept", &mixture_accept_emu);
  m.impl("accept_prefix", &accept_prefix_emu);
  m.impl("window_attention", &window_attention_emu);
  m.impl("window_attention_plan", &window_attention_plan_emu);
}

TORCH_LIBRARY_IMPL(apd_emu, CompositeExplicitAutograd, m) {
  m.impl("set_schedules", &set_schedules);
  m.impl("last_sync_points", &last_sync_points);
  m.impl("set_device", &set_device);
  m.impl("get_device", &get_device);
  m.impl("device_count", &device_count);
  m.impl("device_profile", &device_profile);
}
