// TEST-ONLY shadow of CUB's BlockScan for the emulated build (tests/emu):
// same API subset (InclusiveScan over per-thread item arrays with a block
// aggregate, ExclusiveSum with a block aggregate) and TempStorage contract, on
// the emulated shuffles and __syncthreads. Algorithm as CUB's default
// BLOCK_SCAN_RAKING results-wise: a sequential scan of each thread's items,
// a Kogge-Stone shfl_up scan in every warp, warp totals through shared memory
// after one barrier. No trailing barrier (reuse needs the caller's).
#pragma once
#include "apd_emu/emu.h"

namespace cub {

template <typename T, int BLOCK_DIM_X, int ALGORITHM = 0, int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1, int PTX_ARCH = 0>
class BlockScan {
  static constexpr int kThreads = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;
  static constexpr int kWarps = kThreads / 32;
  static_assert(kThreads % 32 == 0, "emulated BlockScan: whole warps only");

 public:
  struct TempStorage {
    T warp_total[kWarps];
  };

  explicit BlockScan(TempStorage& storage) : s_(storage) {}

  template <int K, typename ScanOp>
  void InclusiveScan(T (&input)[K], T (&output)[K], ScanOp op, T& block_aggregate) {
    T partial = input[0];
    for (int k = 1; k < K; ++k) partial = op(partial, input[k]);
    T prefix;
    const bool has_prefix = exclusive(partial, op, prefix, block_aggregate);
    T run = has_prefix ? op(prefix, input[0]) : input[0];
    output[0] = run;
    for (int k = 1; k < K; ++k) {
      run = op(run, input[k]);
      output[k] = run;
    }
  }

  void ExclusiveSum(T input, T& output, T& block_aggregate) {
    T prefix;
    const bool has_prefix = exclusive(input, [](const T& a, const T& b) { return a + b; }, prefix, block_aggregate);
    output = has_prefix ? prefix : T(0);
  }

 private:
  TempStorage& s_;

  // Exclusive prefix of `x` over the threads before this one (false: none).
  template <typename ScanOp>
  bool exclusive(T x, ScanOp op, T& prefix, T& aggregate) {
    if (int(blockDim.x * blockDim.y * blockDim.z) != kThreads)
      apd_emu::fail("cub::BlockScan instantiated for " + std::to_string(kThreads) + " threads, launched with " +
                    std::to_string(blockDim.x * blockDim.y * blockDim.z));
    const int tid = int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
    const int lane = tid % 32, warp = tid / 32;
    T incl = x;
    for (int o = 1; o < 32; o <<= 1) {
      const T y = __shfl_up_sync(0xffffffffu, incl, unsigned(o));
      if (lane >= o) incl = op(y, incl);
    }
    T excl = __shfl_up_sync(0xffffffffu, incl, 1u);
    if (lane == 31) s_.warp_total[warp] = incl;
    __syncthreads();
    T warp_prefix = s_.warp_total[0];
    for (int w = 1; w < warp; ++w) warp_prefix = op(warp_prefix, s_.warp_total[w]);
    aggregate = s_.warp_total[0];
    for (int w = 1; w < kWarps; ++w) aggregate = op(aggregate, s_.warp_total[w]);
    if (warp == 0) {
      prefix = excl;
      return lane > 0;
    }
    prefix = lane > 0 ? op(warp_prefix, excl) : warp_prefix;
    return true;
  }
};

}  // namespace cub
