// Explicit instantiation of mixture_target_kernel (mixture_accept's targets) for bf16_t
// (apd/cuda/sampling.cuh; launched from csrc/cuda/sampling.cu).
#include "apd/cuda/sampling.cuh"

namespace apd {
namespace cuda {

template cudaError_t launch_mixture_rows<bf16_t>(const MixtureAcceptParams&, dim3, cudaStream_t);

}  // namespace cuda
}  // namespace apd
