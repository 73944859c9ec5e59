// The one place of the kernel<<<...>>> syntax: every launcher calls
// apd::cuda::launch, so that the CPU emulator (tests/emu, test-only) can
// supply a twin that runs the grid and the launchers' own grid math is
// exercised there as host code.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

namespace apd {
namespace cuda {

// kernel<<<grid, block, smem, stream>>>(args...), then the launch status.
template <typename... Params, typename... Args>
inline cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace apd
