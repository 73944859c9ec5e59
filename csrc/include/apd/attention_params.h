// Torch-free parameter block of window_attention (DESIGN.md §5).
#pragma once
#include <cstdint>

#include "apd/common.h"

namespace apd {

struct WindowAttentionParams {
  const void* q;        // [B, Lq, Hq, D], stride 1 along D
  const void* k_cache;  // [B, Lmax, Hkv, D], stride 1 along D
  const void* v_cache;  // [B, Lmax, Hkv, D], stride 1 along D
  void* out;            // [B, Lq, Hq, D] contiguous, same dtype as q
  DType dtype;
  int64_t B, Lq, Hq, Hkv, D, Lmax;
  int64_t q_stride_b, q_stride_l, q_stride_h;  // in elements
  int64_t k_stride_b, k_stride_l, k_stride_h;
  int64_t v_stride_b, v_stride_l, v_stride_h;
  const int64_t* q_start;  // [B] absolute position of query row 0
  const int64_t* q_len;    // [B] rows >= q_len are written as zeros
  const int64_t* kv_len;   // [B] keys [0, kv_len) are visible (causal: also <= own position)
  bool causal;
  float scale;          // softmax scale, usually 1/sqrt(D)
};

}  // namespace apd
