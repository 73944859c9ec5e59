// Torch-free host API of the CUDA window_attention kernels (DESIGN.md §5).
//
// Two steps, so that the caller can allocate the workspace from its own
// (caching, graph-safe) allocator and never synchronises with the device:
//   plan = plan_window_attention(params, options);       // pure host logic
//   ws   = <plan.workspace_bytes bytes on the device>;   // 0 when not split
//   err  = launch_window_attention(params, plan, ws, plan.workspace_bytes, stream);
// The plan is a pure function of the device profile (apd/device_profile.h:
// opt-in shared memory, shared memory and registers per SM, SM count) and of
// shapes, dtype and pointer alignment, never of the contents of q_start /
// q_len / kv_len: it picks the kernel and its tile that fits the device's
// opt-in shared memory (from the profile, dtype, D and alignment only), and
// the per-sequence split rule (apd/attention_split.h) with the grid and the
// workspace that bound it. Batch invariance (DESIGN.md §8): nothing that
// touches a row's arithmetic depends on B, Lq, Lmax or another sequence's
// lengths; the batch's shapes only size the grid (more CTAs, the extra ones
// exit) and the workspace.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "apd/attention_params.h"
#include "apd/attention_split.h"
#include "apd/device_profile.h"

namespace apd {

enum class AttnImpl : int {
  kSimple = 0,  // CUDA-core fp32 kernel: any D % 8 == 0, D <= 256, fp32/bf16/fp16 (the default)
  kMma = 1,     // tensor-core mma.sync m16n8k16 kernel: D in {64, 128}, bf16/fp16
};

struct WindowAttentionOptions {
  AttnImpl impl = AttnImpl::kSimple;  // kMma falls back to kSimple where it does not apply
  int num_splits = 0;                 // 0: heuristic; >= 1: requested number of KV splits
};

struct WindowAttentionPlan {
  AttnImpl impl = AttnImpl::kSimple;  // the kernel that will run
  int block_m = 0;                    // packed (position, head) query rows per CTA: simple 64 (32 where
                                      // 64 does not fit), mma 128 (64 where 128 does not fit)
  int block_n = 0;                    // keys per K/V tile
  int64_t q_tiles = 0;                // ceil(Lq * Hq / Hkv / block_m): q tiles of the padded window
  SplitRule split;                    // each sequence's split count and boundaries (attention_split.h)
  int num_splits = 1;                 // most splits a sequence of this call can take (kv_len <= Lmax);
                                      // 1 = none splits: no workspace, no combine
  int64_t ws_items = 0;               // workspace slots per (b, kv head): the most (q tile, split) CTAs
                                      // of a split sequence, q_tiles_b * n_b (0 when num_splits == 1)
  int64_t grid_x = 0;                 // CTAs per (b, kv head): max(q_tiles, ws_items); a sequence's
                                      // CTAs past its own q_tiles_b * n_b (or q_tiles unsplit) exit
  size_t workspace_bytes = 0;         // partial out [B, Hkv, ws_items, block_m, D] (input dtype) + fp32 lse
  size_t smem_bytes = 0;              // the kernel's dynamic shared memory (<= the profile's opt-in, except
                                      // for a simple-kernel tile that fits no tile: then the launch fails)
  int ctas_per_sm = 0;                // CTAs of the kernel that fit one SM (the split rule's unit)
};

// nullptr when the CUDA kernels support these shapes, else a message naming the
// problem (e.g. an unsupported head dim). Host-only, no device access.
const char* window_attention_unsupported(const WindowAttentionParams& p);

// Chooses the kernel, its tile and the split rule for `dev` (a pure function).
WindowAttentionPlan plan_window_attention(const DeviceProfile& dev, const WindowAttentionParams& p,
                                          const WindowAttentionOptions& opt);
// The same for the current device (current_device_profile(), cached per device).
WindowAttentionPlan plan_window_attention(const WindowAttentionParams& p,
                                          const WindowAttentionOptions& opt);

// Launches the attention kernel (and the combine kernel when split) on
// `stream`. `workspace` must hold plan.workspace_bytes bytes, 16-byte aligned.
// Returns the launch error, if any; never synchronises.
cudaError_t launch_window_attention(const WindowAttentionParams& p, const WindowAttentionPlan& plan,
                                    void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace apd
