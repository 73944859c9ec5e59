// Torch-free entry points of the CUDA sampling kernels (csrc/cuda/sampling.cu).
// The caller (csrc/ops_cuda_sampling.cpp) has validated the shapes, converted
// the integer inputs to contiguous int64 on the device and allocated the
// outputs; every launcher only enqueues work on `stream` (no host sync) and
// returns the launch status.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "apd/sampling_params.h"

namespace apd {

// Largest vocabulary the CUDA sampler takes: int indexing of a row, and the
// top-p mass histogram (2^-40 fixed point per entry) must not overflow 2^64.
constexpr int64_t kMaxSampleVocab = int64_t(1) << 23;

// draft [B, M] from logits [B, M, V]; 1 <= V <= kMaxSampleVocab.
cudaError_t launch_sample_draft(const SampleDraftParams& params, cudaStream_t stream);

// target [B, M] and n_accept [B] (two kernels on `stream`); 1 <= V_D, V_A <= kMaxSampleVocab.
cudaError_t launch_mixture_accept(const MixtureAcceptParams& params, cudaStream_t stream);

// n_accept [B] from caller-provided draft and target ids.
cudaError_t launch_accept_prefix(const AcceptPrefixParams& params, cudaStream_t stream);

}  // namespace apd
