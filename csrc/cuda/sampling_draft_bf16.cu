// Explicit instantiation of sample_draft_kernel for bf16_t
// (apd/cuda/sampling.cuh; launched from csrc/cuda/sampling.cu).
#include "apd/cuda/sampling.cuh"

namespace apd {
namespace cuda {

template cudaError_t launch_draft_rows<bf16_t>(const SampleDraftParams&, dim3, cudaStream_t);

}  // namespace cuda
}  // namespace apd
