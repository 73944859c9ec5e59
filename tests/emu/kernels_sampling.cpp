// TEST-ONLY. csrc/cuda/sampling*.cu compiled as host C++ against the CPU
// execution model (tests/emu): the include path puts tests/emu/include (shadow
// CUDA / CUB headers and the PTX / launch twins) before csrc/include.
// __CUDACC__ / __CUDA_ARCH__ select the device branches of the shared row
// math (apd/common.h, philox.h, sampling_row.h), as nvcc would.
#include "apd_emu/emu.h"  // standard headers first, before the macros below
#include "apd_emu/ptx.h"
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#include "../../csrc/cuda/sampling.cu"
#include "../../csrc/cuda/sampling_draft_fp32.cu"
#include "../../csrc/cuda/sampling_draft_bf16.cu"
#include "../../csrc/cuda/sampling_draft_fp16.cu"
#include "../../csrc/cuda/sampling_mixture_fp32.cu"
#include "../../csrc/cuda/sampling_mixture_bf16.cu"
#include "../../csrc/cuda/sampling_mixture_fp16.cu"
