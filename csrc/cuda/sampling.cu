// Launchers of the CUDA sampling kernels (apd/cuda/sampling.cuh): grid shapes
// and the static dtype switch. Torch-free. The row kernels themselves are
// instantiated in sampling_{draft,mixture}_<dtype>.cu (one kernel per
// translation unit, built in parallel); this one compiles only the accept scan.
#include <cstdint>

#include "apd/cuda/launch.cuh"
#include "apd/cuda/sampling.cuh"
#include "apd/sampling_launch.h"

namespace apd {
namespace cuda {

// Defined here, not in the header: a non-template kernel in a header included
// by several translation units (sampling_*.cu) would be defined in each.
// n_accept[b] = accept_prefix_row(...), one thread per sequence. V bounds the
// draft ids that can match (INT64_MAX for accept_prefix).
__global__ void accept_prefix_kernel(const int64_t* __restrict__ draft,   // [B, M]
                                     const int64_t* __restrict__ target,  // [B, M]
                                     const int64_t* __restrict__ valid_len,  // [B]
                                     const int64_t* __restrict__ eos_ids,    // [E] or [B, E]
                                     int64_t num_eos, int64_t eos_stride, int64_t B, int64_t M, int64_t V,
                                     int64_t* __restrict__ n_accept) {  // [B]
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  // valid_len is validated by the caller; the clamp only keeps a bad value in bounds.
  const int64_t vl = valid_len[b] < 0 ? 0 : (valid_len[b] > M ? M : valid_len[b]);
  n_accept[b] = accept_prefix_row(draft + b * M, target + b * M, vl, V, eos_ids + b * eos_stride, num_eos);
}

}  // namespace cuda

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
  const dim3 grid{unsigned(rows)};
  switch (p.dtype) {
    case DType::kFloat32: return cuda::launch_draft_rows<float>(p, grid, stream);
    case DType::kBFloat16: return cuda::launch_draft_rows<bf16_t>(p, grid, stream);
    case DType::kFloat16: return cuda::launch_draft_rows<fp16_t>(p, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_mixture_accept(const MixtureAcceptParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.M;
  if (rows > INT32_MAX || p.V_D <= 0 || p.V_A <= 0 || p.V_D > kMaxSampleVocab || p.V_A > kMaxSampleVocab)
    return cudaErrorInvalidValue;
  if (rows > 0) {
    const dim3 grid{unsigned(rows)};
    cudaError_t err = cudaSuccess;
    switch (p.dtype) {
      case DType::kFloat32: err = cuda::launch_mixture_rows<float>(p, grid, stream); break;
      case DType::kBFloat16: err = cuda::launch_mixture_rows<bf16_t>(p, grid, stream); break;
      case DType::kFloat16: err = cuda::launch_mixture_rows<fp16_t>(p, grid, stream); break;
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
