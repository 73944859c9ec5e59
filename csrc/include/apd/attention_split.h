// The split-KV rule of the CUDA window_attention kernels, per sequence
// (DESIGN.md §8, docs/SEMANTICS.md "Batch invariance"). Torch-free, host and
// device: the planner (attention_launch.cu) bounds the grid and the workspace
// with it, the kernels (attention_common.cuh) size each sequence's splits.
//
// ALGORITHM. A sequence b with q_len_b query positions and kv_len_b keys is
// cut into n_b splits of whole key tiles, chosen from the device profile (SM
// count, CTAs per SM), the kernel's tiles (block_m, block_n), the head shapes
// (Hkv, G = Hq / Hkv) and ITS OWN q_len_b and kv_len_b, never from the batch
// (B, the padded window Lq, the cache allocation Lmax, batch-mates' lengths).
// So split boundaries, the order in which a row's keys are reduced and the
// combine over the splits are those of the same request run alone, and its
// output is bit for bit the same in any batch.
//   tiles_b = ceil(kv_len_b / block_n)
//   ctas_b  = Hkv * ceil(q_len_b * G / block_m)     the CTAs of its (kv head, q tile) grid
//   want_b  = ctas_per_sm * SMs / ctas_b  if ctas_b < SMs, else 1   (one wave of the device
//             for the request alone, rounded down: a partial second wave costs a whole one)
//   want_b  = min(want_b, ceil(tiles_b / min_tiles), 64)            (>= 128 keys per split)
//   or want_b = request when a split count was requested (APD_ATTN_SPLITS, tests)
//   per_b   = ceil(tiles_b / want_b) key tiles per split; n_b = ceil(tiles_b / per_b)
// (the last split may be shorter, none is empty). This is the rule the
// planner applied to the whole batch before (issue 28), applied to one request
// at a time: a request gets, in any batch, the split it got alone (B = 1,
// Lq = q_len, Lmax = kv_len) under that rule.
//
// NUMBERS (Dream-7B: Hq 28, Hkv 4, D 128, mma 128-row tiles, 64-key tiles,
// H100 profile: 132 SMs x 2 CTAs): q_len 16, kv 4096: 4 CTAs -> 66 wanted,
// 32 by length: 32 splits of 128 keys, 128 CTAs. q_len 216 (1512 packed rows,
// 12 q tiles): 48 CTAs -> 264 / 48 = 5 splits of 13 key tiles, 240 CTAs in
// one wave (6 splits of 11 tiles would be 288 CTAs on 264 slots: 2 waves, 22
// tile-times per SM against 13; bench/NOTES.md). A batch no longer lowers a
// request's split count: at B = 8, q_len 100, kv 4096 each request keeps its 11
// splits (2112 CTAs, 8 full waves) where the batch-wide rule took 1 (192
// CTAs); the cost is the partials (written and combined) and one Q tile
// re-read per split: bench/attn_model.py models both rules (bench/NOTES.md).
#pragma once
#include "apd/common.h"

namespace apd {

struct SplitRule {
  int request = 0;      // >= 1: every sequence takes min(request, its key tiles) splits; 0: the rule above
  int sm_count = 1;     // the profile's SMs
  int ctas_per_sm = 1;  // CTAs of the kernel that fit one SM (blocks_per_sm)
  int heads = 1;        // Hkv: CTAs per q tile
  int group = 1;        // G = Hq / Hkv: packed rows per query position
  int block_m = 1;      // packed rows per CTA
  int block_n = 1;      // keys per tile
  int min_tiles = 1;    // key tiles per split at least (128 keys)
  int max_splits = 64;
};

// Key tiles per split of a sequence (per_b above, >= 1); *splits = n_b (>= 1).
APD_HD int split_tiles(const SplitRule& r, int q_len, int kv_len, int* splits) {
  const int tiles = kv_len > 0 ? (kv_len + r.block_n - 1) / r.block_n : 0;
  int want = 1;
  if (tiles > 1) {
    if (r.request > 0) {
      want = r.request;
    } else if (q_len > 0) {
      const long long rows = (long long)q_len * r.group;
      const long long ctas = (long long)r.heads * ((rows + r.block_m - 1) / r.block_m);
      if (ctas < r.sm_count) {
        want = int((long long)r.ctas_per_sm * r.sm_count / ctas);  // >= 1
        const int by_len = (tiles + r.min_tiles - 1) / r.min_tiles;
        if (want > by_len) want = by_len;
        if (want > r.max_splits) want = r.max_splits;
      }
    }
  }
  if (want < 1) want = 1;
  const int per = tiles > 1 ? (tiles + want - 1) / want : 1;
  *splits = tiles > 1 ? (tiles + per - 1) / per : 1;
  return per;
}

APD_HD int row_splits(const SplitRule& r, int q_len, int kv_len) {
  int n = 1;
  (void)split_tiles(r, q_len, kv_len, &n);
  return n;
}

}  // namespace apd
