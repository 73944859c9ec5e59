// Explicit instantiations of the CUDA-core window_attention kernel for float:
// head-dim buckets D <= 32, 64, 128, 256 (NDC = ceil(D / 32) rounded up to a
// power of two; at D > 128 also the 4-rows-per-warp tile for devices whose
// opt-in shared memory does not hold 8), plus the split-KV combine kernel.
#include "apd/cuda/attention_simple.cuh"

namespace apd {
namespace attn {

template cudaError_t launch_simple<float, 1, 8>(const AttnArgs&, int64_t, cudaStream_t);
template cudaError_t launch_simple<float, 2, 8>(const AttnArgs&, int64_t, cudaStream_t);
template cudaError_t launch_simple<float, 4, 8>(const AttnArgs&, int64_t, cudaStream_t);
template cudaError_t launch_simple<float, 8, 8>(const AttnArgs&, int64_t, cudaStream_t);
template cudaError_t launch_simple<float, 8, 4>(const AttnArgs&, int64_t, cudaStream_t);  // D > 128 where 8 rows do not fit
template cudaError_t launch_combine<float>(const AttnArgs&, cudaStream_t);

}  // namespace attn
}  // namespace apd
