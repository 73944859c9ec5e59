// Launchers of the CUDA sampling kernels (apd/cuda/sampling.cuh): grid shapes
// and the static dtype switch. Torch-free.
#include <cstdint>

#include "apd/cuda/launch.cuh"
#include "apd/cuda/sampling.cuh"
#include "apd/sampling_launch.h"

namespace apd {
namespace {

constexpr int kPrefixThreads = 128;

// The sampler needs no per-device plan (unlike window_attention's,
// attention_launch.cu): one 512-thread CTA per row, <= 128 registers per
// thread by its launch bounds (512 x 128 = the 65,536 registers of one SM on
// every sm_80+ device), no dynamic shared memory and static shared memory
// within the 48 KB static limit that every device has (ptxas, nvcc 13.0
// sm_80: 45,728 B, so 3,424 B of headroom; 37,376 B in the emulated build).
// Checked here at compile time, so no device profile can refuse its launch.
static_assert(sizeof(cuda::SampleSmem) <= 48 * 1024, "sampler static shared memory over the 48 KB static limit");

cudaError_t launch_n_accept(const int64_t* draft, const int64_t* target, const int64_t* valid_len,
                            const int64_t* eos_ids, int64_t num_eos, int64_t eos_stride, int64_t B,
                            int64_t M, int64_t V,
                            int64_t* n_accept, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const unsigned grid = unsigned(ceil_div<int64_t>(B, kPrefixThreads));
  return cuda::launch(cuda::accept_prefix_kernel, dim3(grid), dim3(unsigned(kPrefixThreads)), 0, stream, draft, target,
                      valid_len, eos_ids, num_eos, eos_stride, B, M, V, n_accept);
}

}  // namespace

cudaError_t launch_sample_draft(const SampleDraftParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.M;  // one CTA per row
  if (rows == 0) return cudaSuccess;
  if (rows > INT32_MAX || p.V <= 0 || p.V > kMaxSampleVocab) return cudaErrorInvalidValue;
  const dim3 grid{unsigned(rows)}, block{unsigned(cuda::kSampleThreads)};
  cudaError_t err = cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: err = cuda::launch(cuda::sample_draft_kernel<float>, grid, block, 0, stream, p); break;
    case DType::kBFloat16: err = cuda::launch(cuda::sample_draft_kernel<bf16_t>, grid, block, 0, stream, p); break;
    case DType::kFloat16: err = cuda::launch(cuda::sample_draft_kernel<fp16_t>, grid, block, 0, stream, p); break;
    default: return cudaErrorInvalidValue;
  }
  return err;
}

cudaError_t launch_mixture_accept(const MixtureAcceptParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.M;
  if (rows > INT32_MAX || p.V_D <= 0 || p.V_A <= 0 || p.V_D > kMaxSampleVocab || p.V_A > kMaxSampleVocab)
    return cudaErrorInvalidValue;
  if (rows > 0) {
    const dim3 grid{unsigned(rows)}, block{unsigned(cuda::kSampleThreads)};
    cudaError_t err = cudaSuccess;
    switch (p.dtype) {
      case DType::kFloat32: err = cuda::launch(cuda::mixture_target_kernel<float>, grid, block, 0, stream, p); break;
      case DType::kBFloat16: err = cuda::launch(cuda::mixture_target_kernel<bf16_t>, grid, block, 0, stream, p); break;
      case DType::kFloat16: err = cuda::launch(cuda::mixture_target_kernel<fp16_t>, grid, block, 0, stream, p); break;
      default: return cudaErrorInvalidValue;
    }
    if (err != cudaSuccess) return err;
  }
  // Stream order makes the targets visible to the scan: no host sync.
  const int64_t V = p.V_D < p.V_A ? p.V_D : p.V_A;
  return launch_n_accept(p.draft, p.target, p.valid_len, p.eos_ids, p.num_eos, p.eos_stride, p.B, p.M, V,
                         p.n_accept, stream);
}

cudaError_t launch_accept_prefix(const AcceptPrefixParams& p, cudaStream_t stream) {
  return launch_n_accept(p.draft, p.target, p.valid_len, p.eos_ids, p.num_eos, p.eos_stride, p.B, p.M, INT64_MAX,
                         p.n_accept, stream);
}

}  // namespace apd
