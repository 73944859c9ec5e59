// Explicit instantiation of sample_draft_kernel for float
// (apd/cuda/sampling.cuh; launched from csrc/cuda/sampling.cu).
#include "apd/cuda/sampling.cuh"

namespace apd {
namespace cuda {

template cudaError_t launch_draft_rows<float>(const SampleDraftParams&, dim3, cudaStream_t);

}  // namespace cuda
}  // namespace apd
