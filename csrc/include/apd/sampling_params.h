// Torch-free parameter blocks of the sampling ops (DESIGN.md §4). The torch
// layer fills them (int inputs already converted to contiguous int64, the
// vocabulary dimension contiguous) and hands them to the CPU or CUDA kernels.
#pragma once
#include <cstdint>

#include "apd/common.h"

namespace apd {

enum class Acceptance : int { kCoupled = 0, kArgmax = 1 };

// Per-row sampler settings shared by draft and target.
struct SamplerConfig {
  float temperature;  // 0 -> argmax
  int64_t top_k;      // <= 0 or >= V: off
  float top_p;        // >= 1: off
  bool official;      // compat="official": the released code's arithmetic (SEMANTICS.md)
  DType dtype;        // the logits' dtype: compat="official" rounds to it as torch does
};

// Per-row settings, so that one call serves rows with different sampling
// parameters (the Engine's requests): each pointer is a [B] vector on the
// kernels' device, or nullptr, and then every row takes the params block's
// scalar. Values are trusted (the CPU binding checks them; on CUDA the Python
// wrapper does, on the host, under check_lengths).
struct RowSettings {
  const float* temperature = nullptr;  // [B] fp32, >= 0 (0 -> argmax)
  const int64_t* top_k = nullptr;      // [B] <= 0 or >= V: off
  const float* top_p = nullptr;        // [B] fp32 in (0, 1]
  const int64_t* official = nullptr;   // [B] compat: 1 = "official", 0 = default
  const double* R = nullptr;           // [B] in [0, 1] (mixture_accept only; fp64: see row_mixture)
  const int64_t* acceptance = nullptr; // [B] Acceptance code: 0 coupled, 1 argmax (mixture_accept only)
};

// Row b's sampler settings: the scalars of `base` with row b's overrides.
APD_HD SamplerConfig row_config(SamplerConfig base, const RowSettings& s, int64_t b) {
  if (s.temperature) base.temperature = s.temperature[b];
  if (s.top_k) base.top_k = s.top_k[b];
  if (s.top_p) base.top_p = s.top_p[b];
  if (s.official) base.official = s.official[b] != 0;
  return base;
}

struct SampleDraftParams {
  const void* logits;   // [B, M, V] with stride 1 along V
  DType dtype;
  int64_t B, M, V;
  int64_t stride_b, stride_m;  // in elements
  const int64_t* pos_start;    // [B] absolute position of row 0
  const int64_t* valid_len;    // [B] rows >= valid_len are written as -1
  const int64_t* seeds;        // [B] uint64 bit pattern
  const int64_t* steps;        // [B]
  SamplerConfig cfg;           // every row's settings, unless per_row overrides them
  RowSettings per_row;         // temperature, top_k, top_p, official
  int64_t ban_start, ban_end;  // banned ids [ban_start, ban_end) read as -inf (empty when equal)
  int64_t* draft;              // [B, M] contiguous, out
};

struct MixtureAcceptParams {
  const void* dllm_logits;     // [B, M, V_D], stride 1 along V_D
  const void* ar_logits;       // [B, M, V_A], stride 1 along V_A; same dtype as dllm_logits
  DType dtype;
  int64_t B, M, V_D, V_A;
  int64_t d_stride_b, d_stride_m;
  int64_t a_stride_b, a_stride_m;
  const int64_t* draft;        // [B, M] contiguous
  const int64_t* pos_start;    // [B]
  const int64_t* valid_len;    // [B]
  const int64_t* seeds;        // [B]
  const int64_t* steps;        // [B]
  double R;                    // the scalar R as given (see row_mixture for how it is rounded)
  SamplerConfig cfg;
  Acceptance acceptance;
  RowSettings per_row;         // all six fields may override the scalars row by row
  int64_t ban_start, ban_end;  // banned ids [ban_start, ban_end): -inf in BOTH rows (lse included)
  const int64_t* eos_ids;      // [E] shared (eos_stride 0) or [B, E] per row (eos_stride E); < 0: padding
  int64_t num_eos, eos_stride;
  int64_t* target;             // [B, M] contiguous, out
  int64_t* n_accept;           // [B], out
};

// Row b's mixture settings. R: fp32. 1 - R: fp32 1.0f - R by default;
// float(1.0 - double R) under compat="official" (the Python scalar the
// released code passes). The per-row R is kept in fp64 for that reason: a row
// then equals a scalar call with the same R bit for bit in both modes (an fp32
// R of 0.7 would move the official 1 - R by an ulp).
struct MixtureSettings {
  float R, one_minus_R;
  Acceptance acceptance;
};

APD_HD MixtureSettings row_mixture(const MixtureAcceptParams& p, const SamplerConfig& cfg, int64_t b) {
  const double R = p.per_row.R ? p.per_row.R[b] : p.R;
  MixtureSettings m;
  m.R = float(R);
  m.one_minus_R = cfg.official ? float(1.0 - R) : 1.0f - m.R;
  m.acceptance = p.per_row.acceptance ? (p.per_row.acceptance[b] != 0 ? Acceptance::kArgmax : Acceptance::kCoupled)
                                      : p.acceptance;
  return m;
}

struct AcceptPrefixParams {
  const int64_t* draft;        // [B, M] contiguous
  const int64_t* target;       // [B, M] contiguous
  const int64_t* valid_len;    // [B]
  const int64_t* eos_ids;      // [E] or [B, E] (eos_stride E), as in MixtureAcceptParams
  int64_t num_eos, eos_stride;
  int64_t B, M;
  int64_t* n_accept;           // [B], out
};

}  // namespace apd
