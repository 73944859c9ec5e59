// TEST-ONLY. A small torch-free driver for the fault-injection tests
// (tests/test_emu_faults.py): one CUDA launcher (sampling with top-k + top-p,
// or the mma attention kernel) run on fixed synthetic inputs under the three
// schedules of the CPU execution model. The test builds it once from the
// real kernel headers and once per mutation, with a temp include dir holding
// the mutated header first on the include path, and requires every mutant to
// fail: a harness error, a schedule-dependent result, a result that differs
// from the clean build's, or (attention) an error above tolerance against the
// fp64 reference computed here.
//
// Output: one line "RESULT <hex digest>" and exit 0, or a diagnostic and exit 1.
#include "apd_emu/emu.h"
#include "apd_emu/ptx.h"
#if !defined(APD_FAULT_SAMPLING)
#include "apd/cuda/cute_atoms.cuh"  // the emulated twin; CuTe before __CUDACC__ (a host compile)
#endif
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#if defined(APD_FAULT_SAMPLING)
#include "../../csrc/cuda/sampling.cu"
#include "../../csrc/cuda/sampling_draft_fp32.cu"
#include "../../csrc/cuda/sampling_draft_bf16.cu"
#include "../../csrc/cuda/sampling_draft_fp16.cu"
#include "../../csrc/cuda/sampling_mixture_fp32.cu"
#include "../../csrc/cuda/sampling_mixture_bf16.cu"
#include "../../csrc/cuda/sampling_mixture_fp16.cu"
#else
#include "../../csrc/cuda/attention_launch.cu"
#include "../../csrc/cuda/attention_mma_bf16.cu"
#include "../../csrc/cuda/attention_mma_fp16.cu"
#include "../../csrc/cuda/attention_simple_bf16.cu"
#include "../../csrc/cuda/attention_simple_fp16.cu"
#include "../../csrc/cuda/attention_simple_fp32.cu"
#endif
#undef __CUDACC__
#undef __CUDA_ARCH__

#include <cstdio>
#include <vector>

namespace {

uint64_t g_state = 0x2545f4914f6cdd1dull;
float next_normal() {  // deterministic, platform-independent (Box-Muller on an LCG)
  auto u = [] {
    g_state = g_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double((g_state >> 11) & ((1ull << 53) - 1)) + 0.5) / double(1ull << 53);
  };
  const double a = u(), b = u();
  return float(std::sqrt(-2.0 * std::log(a)) * std::cos(6.283185307179586 * b));
}

uint64_t digest(const void* p, size_t n, uint64_t h = 1469598103934665603ull) {
  const auto* c = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ c[i]) * 1099511628211ull;
  return h;
}

template <class F>
int run_schedules(const char* what, F&& run_once, std::vector<unsigned char>& first) {
  for (int s = 0; s < 3; ++s) {
    apd_emu::set_schedule(s, 77);
    std::vector<unsigned char> out;
    try {
      if (!run_once(out)) {
        std::printf("%s: launch failed (schedule %d)\n", what, s);
        return 1;
      }
    } catch (const apd_emu::Error& e) {
      std::printf("HARNESS ERROR %s (schedule %d): %s\n", what, s, e.what());
      return 1;
    }
    if (s == 0) {
      first = out;
    } else if (out != first) {
      size_t i = 0;
      while (out[i] == first[i]) ++i;
      std::printf("SCHEDULE DEPENDENT %s: schedule %d differs from forward at byte %zu\n", what, s, i);
      return 1;
    }
  }
  return 0;
}

#if defined(APD_FAULT_SAMPLING)
int main_impl() {
  const int B = 2, M = 3, V = 3001;
  std::vector<apd::bf16_t> logits(size_t(B) * M * V);
  for (auto& x : logits) x = apd::to_bf16(3.0f * next_normal());
  std::vector<int64_t> pos{5, 900}, valid{3, 2}, seeds{11, -12345678901ll}, steps{3, 1ll << 35};
  std::vector<unsigned char> first;
  // top_k 5 stages about a dozen candidates (select_small); top_k 300 stages
  // more than kSmallSelect (the radix passes over the staged entries).
  const int rc = run_schedules("sample_draft", [&](std::vector<unsigned char>& out) {
    bool ok = true;
    out.clear();
    for (const int top_k : {5, 300}) {
      std::vector<int64_t> draft(size_t(B) * M, 0x5a5a5a5a);
      apd::SampleDraftParams p{};
      p.logits = logits.data();
      p.dtype = apd::DType::kBFloat16;
      p.B = B, p.M = M, p.V = V, p.stride_b = int64_t(M) * V, p.stride_m = V;
      p.pos_start = pos.data(), p.valid_len = valid.data(), p.seeds = seeds.data(), p.steps = steps.data();
      p.cfg = apd::SamplerConfig{0.7f, top_k, 0.9f, false};
      p.draft = draft.data();
      ok = ok && apd::launch_sample_draft(p, nullptr) == cudaSuccess;
      out.insert(out.end(), reinterpret_cast<unsigned char*>(draft.data()),
                 reinterpret_cast<unsigned char*>(draft.data() + draft.size()));
    }
    return ok;
  }, first);
  if (rc) return rc;
  std::printf("RESULT %016llx\n", (unsigned long long)digest(first.data(), first.size()));
  return 0;
}
#else
int main_impl() {
  // GQA 2, D 64, a partial last q tile, causal, two sequences (one with q_len 0).
  const int B = 2, Lq = 20, Hq = 4, Hkv = 2, D = 64, Lmax = 150;
  std::vector<apd::bf16_t> q(size_t(B) * Lq * Hq * D), k(size_t(B) * Lmax * Hkv * D), v(k.size());
  for (auto& x : q) x = apd::to_bf16(next_normal());
  for (auto& x : k) x = apd::to_bf16(next_normal());
  for (auto& x : v) x = apd::to_bf16(next_normal());
  std::vector<int64_t> q_start{100, 0}, q_len{20, 0}, kv_len{120, 7};
  const float scale = 0.125f;
  apd::WindowAttentionParams p{};
  p.q = q.data(), p.k_cache = k.data(), p.v_cache = v.data();
  p.dtype = apd::DType::kBFloat16;
  p.B = B, p.Lq = Lq, p.Hq = Hq, p.Hkv = Hkv, p.D = D, p.Lmax = Lmax;
  p.q_stride_b = int64_t(Lq) * Hq * D, p.q_stride_l = int64_t(Hq) * D, p.q_stride_h = D;
  p.k_stride_b = int64_t(Lmax) * Hkv * D, p.k_stride_l = int64_t(Hkv) * D, p.k_stride_h = D;
  p.v_stride_b = p.k_stride_b, p.v_stride_l = p.k_stride_l, p.v_stride_h = p.k_stride_h;
  p.q_start = q_start.data(), p.q_len = q_len.data(), p.kv_len = kv_len.data();
  p.causal = true;
  p.scale = scale;
  apd::WindowAttentionOptions opt;
  opt.impl = apd::AttnImpl::kMma;
  opt.num_splits = 1;
  const apd::WindowAttentionPlan plan = apd::plan_window_attention(p, opt);
  if (plan.impl != apd::AttnImpl::kMma) {
    std::printf("driver: the mma kernel does not apply\n");
    return 2;
  }
  std::vector<apd::bf16_t> out(q.size());
  std::vector<unsigned char> first;
  const int rc = run_schedules("window_attention(mma)", [&](std::vector<unsigned char>& bytes) {
    std::fill(out.begin(), out.end(), apd::bf16_t{0x7fc1});
    p.out = out.data();
    const bool ok = apd::launch_window_attention(p, plan, nullptr, 0, nullptr) == cudaSuccess;
    bytes.assign(reinterpret_cast<unsigned char*>(out.data()), reinterpret_cast<unsigned char*>(out.data() + out.size()));
    return ok;
  }, first);
  if (rc) return rc;
  // fp64 reference of the same inputs.
  double max_err = 0.0;
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < Lq; ++i)
      for (int h = 0; h < Hq; ++h) {
        const int kh = h / (Hq / Hkv);
        const size_t o = ((size_t(b) * Lq + i) * Hq + h) * D;
        std::vector<double> ref(D, 0.0);
        if (i < q_len[b]) {
          const int64_t lim = std::min<int64_t>(kv_len[b], q_start[b] + i + 1);
          std::vector<double> s(static_cast<size_t>(lim));
          double m = -1e300;
          for (int64_t j = 0; j < lim; ++j) {
            double dot = 0.0;
            for (int d = 0; d < D; ++d)
              dot += double(apd::to_float(q[o + d])) *
                     double(apd::to_float(k[((size_t(b) * Lmax + j) * Hkv + kh) * D + d]));
            s[j] = dot * scale;
            m = std::max(m, s[j]);
          }
          double den = 0.0;
          for (int64_t j = 0; j < lim; ++j) den += std::exp(s[j] - m);
          for (int64_t j = 0; j < lim; ++j)
            for (int d = 0; d < D; ++d)
              ref[d] += std::exp(s[j] - m) / den * double(apd::to_float(v[((size_t(b) * Lmax + j) * Hkv + kh) * D + d]));
        }
        for (int d = 0; d < D; ++d) {
          const double got = double(apd::to_float(out[o + d]));
          const double err = std::fabs(got - ref[d]);
          if (!(err <= max_err)) max_err = err;  // NaN sticks
        }
      }
  // bf16 output of values in [-1, 1]: a few ulps at 2^-8.
  if (!(max_err <= 0.03)) {
    std::printf("WRONG RESULT window_attention(mma): max error %g against the fp64 reference\n", max_err);
    return 1;
  }
  std::printf("RESULT %016llx max_err %g\n", (unsigned long long)digest(first.data(), first.size()), max_err);
  return 0;
}
#endif

}  // namespace

int main() { return main_impl(); }
