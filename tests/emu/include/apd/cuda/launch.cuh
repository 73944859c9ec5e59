// TEST-ONLY twin of csrc/include/apd/cuda/launch.cuh (found first on the
// emulated build's include path): runs the grid on the CPU execution model.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <functional>

namespace apd {
namespace cuda {

template <typename... Params, typename... Args>
inline cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream*/,
                          Args&&... args) {
  // Every thread gets its own copies of the by-value kernel parameters.
  const std::function<void()> body = [&] { kernel(args...); };
  const int err = apd_emu::launch(reinterpret_cast<const void*>(kernel), grid, block, smem, body);
  (void)apd_emu::take_last_error();  // as cudaGetLastError() after the real launch
  return cudaError_t(err);
}

}  // namespace cuda
}  // namespace apd
