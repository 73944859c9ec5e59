// Host test of apd/cpu/attention.h without torch: the portable (baseline
// ISA) build of the kernel against a naive fp64 softmax, for fp32 / bf16 /
// fp16 storage, GQA, ragged windows, padding rows, causal and bidirectional.
// (pytest covers the AVX2 variant the extension dispatches to on x86-64.)
#define APD_CPU_MULTIVERSION  // baseline variant only
#include "apd/cpu/attention.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

struct Shape {
  int64_t B, Lq, Hq, Hkv, D, Lmax;
  std::vector<int64_t> q_start, q_len, kv_len;
};

template <typename T>
int check(const Shape& s, bool causal, double rel_tol, const char* name) {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto fill = [&](std::vector<T>& v, std::vector<double>& exact, int64_t n) {
    v.resize(n);
    exact.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      v[i] = apd::from_float<T>(normal(rng));
      exact[i] = apd::to_float(v[i]);  // the values the kernel sees
    }
  };
  std::vector<T> q, k, v, out(s.B * s.Lq * s.Hq * s.D);
  std::vector<double> qd, kd, vd;
  fill(q, qd, s.B * s.Lq * s.Hq * s.D);
  fill(k, kd, s.B * s.Lmax * s.Hkv * s.D);
  fill(v, vd, s.B * s.Lmax * s.Hkv * s.D);
  const float scale = 1.0f / std::sqrt(float(s.D));

  apd::WindowAttentionParams p{};
  p.q = q.data(), p.k_cache = k.data(), p.v_cache = v.data(), p.out = out.data();
  p.B = s.B, p.Lq = s.Lq, p.Hq = s.Hq, p.Hkv = s.Hkv, p.D = s.D, p.Lmax = s.Lmax;
  p.q_stride_h = s.D, p.q_stride_l = s.Hq * s.D, p.q_stride_b = s.Lq * s.Hq * s.D;
  p.k_stride_h = p.v_stride_h = s.D, p.k_stride_l = p.v_stride_l = s.Hkv * s.D;
  p.k_stride_b = p.v_stride_b = s.Lmax * s.Hkv * s.D;
  p.q_start = s.q_start.data(), p.q_len = s.q_len.data(), p.kv_len = s.kv_len.data();
  p.causal = causal, p.scale = scale;
  apd::cpu::window_attention<T>(p);

  int failures = 0;
  double worst = 0;
  const int64_t g = s.Hq / s.Hkv;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t j = 0; j < s.Lq; ++j)
      for (int64_t h = 0; h < s.Hq; ++h) {
        const double* qr = &qd[((b * s.Lq + j) * s.Hq + h) * s.D];
        const T* orow = &out[((b * s.Lq + j) * s.Hq + h) * s.D];
        std::vector<double> ref(s.D, 0.0);
        if (j < s.q_len[b]) {
          const int64_t n_vis = causal ? std::min(s.kv_len[b], s.q_start[b] + j + 1) : s.kv_len[b];
          std::vector<double> w(n_vis);
          double mx = -INFINITY, sum = 0;
          for (int64_t n = 0; n < n_vis; ++n) {
            const double* kr = &kd[((b * s.Lmax + n) * s.Hkv + h / g) * s.D];
            double dot = 0;
            for (int64_t d = 0; d < s.D; ++d) dot += qr[d] * kr[d];
            w[n] = dot * scale;
            mx = std::max(mx, w[n]);
          }
          for (int64_t n = 0; n < n_vis; ++n) sum += (w[n] = std::exp(w[n] - mx));
          for (int64_t n = 0; n < n_vis; ++n)
            for (int64_t d = 0; d < s.D; ++d) ref[d] += w[n] / sum * vd[((b * s.Lmax + n) * s.Hkv + h / g) * s.D + d];
        }
        for (int64_t d = 0; d < s.D; ++d) {
          const double got = apd::to_float(orow[d]);
          const double err = std::fabs(got - ref[d]);
          const bool pad = j >= s.q_len[b];
          worst = std::max(worst, err);
          if ((pad && got != 0.0) || err > rel_tol * std::fabs(ref[d]) + 1e-5) {
            if (failures++ < 5)
              std::printf("  %s causal=%d b=%lld j=%lld h=%lld d=%lld: got %.7g want %.7g\n", name, int(causal),
                          (long long)b, (long long)j, (long long)h, (long long)d, got, ref[d]);
          }
        }
      }
  std::printf("%-5s causal=%d max err %.3g %s\n", name, int(causal), worst, failures ? "FAIL" : "ok");
  return failures;
}

}  // namespace

int main() {
  // GQA 3, odd head dim 40, ragged: a window at 0 with kv_len larger, a tight
  // window across a 64-key block edge, an empty window (padding only).
  const Shape s{3, 21, 6, 2, 40, 150, {0, 60, 5}, {17, 21, 0}, {40, 81, 5}};
  int failures = 0;
  for (bool causal : {false, true}) {
    failures += check<float>(s, causal, 1e-5, "fp32");
    failures += check<apd::bf16_t>(s, causal, 1.0 / 256, "bf16");  // output rounding: half an ulp is 2^-9
    failures += check<apd::fp16_t>(s, causal, 1.0 / 2048, "fp16");
  }
  return failures ? 1 : 0;
}
