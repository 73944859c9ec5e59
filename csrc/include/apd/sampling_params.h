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

struct SampleDraftParams {
  const void* logits;   // [B, M, V] with stride 1 along V
  DType dtype;
  int64_t B, M, V;
  int64_t stride_b, stride_m;  // in elements
  const int64_t* pos_start;    // [B] absolute position of row 0
  const int64_t* valid_len;    // [B] rows >= valid_len are written as -1
  const int64_t* seeds;        // [B] uint64 bit pattern
  const int64_t* steps;        // [B]
  SamplerConfig cfg;
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
  float R;
  float one_minus_R;           // 1 - R: fp32 1.0f - R by default; float(1.0 - double R) under
                               // compat="official" (the Python scalar the released code passes)
  SamplerConfig cfg;
  int64_t ban_start, ban_end;  // banned ids [ban_start, ban_end): -inf in BOTH rows (lse included)
  Acceptance acceptance;
  const int64_t* eos_ids;      // [E]
  int64_t num_eos;
  int64_t* target;             // [B, M] contiguous, out
  int64_t* n_accept;           // [B], out
};

struct AcceptPrefixParams {
  const int64_t* draft;        // [B, M] contiguous
  const int64_t* target;       // [B, M] contiguous
  const int64_t* valid_len;    // [B]
  const int64_t* eos_ids;      // [E]
  int64_t num_eos;
  int64_t B, M;
  int64_t* n_accept;           // [B], out
};

}  // namespace apd
