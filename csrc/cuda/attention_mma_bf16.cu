// Explicit instantiations of the tensor-core window_attention kernel for
// bf16_t, D = 64 and 128.
#include "apd/cuda/attention_mma.cuh"

namespace apd {
namespace attn {

template cudaError_t launch_mma<bf16_t, 64>(const AttnArgs&, int64_t, cudaStream_t);
template cudaError_t launch_mma<bf16_t, 128>(const AttnArgs&, int64_t, cudaStream_t);

}  // namespace attn
}  // namespace apd
