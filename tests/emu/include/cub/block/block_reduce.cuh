// TEST-ONLY shadow of CUB's BlockReduce for the emulated build (tests/emu):
// same API and TempStorage contract, built on the emulated warp shuffles and
// __syncthreads (so its barrier is a real sync point of the execution model).
// Algorithm as CUB's default BLOCK_REDUCE_WARP_REDUCTIONS: a shfl_down tree in
// every warp (offsets 1, 2, 4, 8, 16), warp aggregates to shared memory, one
// barrier, thread 0 folds them in warp order. The result is valid in thread 0
// only (other threads get their warp's partial, as in CUB); there is no
// trailing barrier, so reusing TempStorage needs the caller's __syncthreads.
#pragma once
#include "apd_emu/emu.h"

namespace cub {

template <typename T, int BLOCK_DIM_X, int ALGORITHM = 0, int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1, int PTX_ARCH = 0>
class BlockReduce {
  static constexpr int kThreads = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;
  static constexpr int kWarps = kThreads / 32;
  static_assert(kThreads % 32 == 0, "emulated BlockReduce: whole warps only");

 public:
  struct TempStorage {
    T warp_aggregate[kWarps];
  };

  explicit BlockReduce(TempStorage& storage) : s_(storage) {}

  template <typename ReductionOp>
  T Reduce(T input, ReductionOp op) {
    if (int(blockDim.x * blockDim.y * blockDim.z) != kThreads)
      apd_emu::fail("cub::BlockReduce instantiated for " + std::to_string(kThreads) + " threads, launched with " +
                    std::to_string(blockDim.x * blockDim.y * blockDim.z));
    const int tid = int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
    const int lane = tid % 32, warp = tid / 32;
    T x = input;
    for (int o = 1; o < 32; o <<= 1) {
      const T y = __shfl_down_sync(0xffffffffu, x, unsigned(o));
      if (lane + o < 32) x = op(x, y);
    }
    if (lane == 0) s_.warp_aggregate[warp] = x;
    __syncthreads();
    if (tid == 0)
      for (int w = 1; w < kWarps; ++w) x = op(x, s_.warp_aggregate[w]);
    return x;
  }

  T Sum(T input) {
    return Reduce(input, [](const T& a, const T& b) { return a + b; });
  }

 private:
  TempStorage& s_;
};

}  // namespace cub
