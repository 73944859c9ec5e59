// TEST-ONLY. csrc/cuda/{attention_mma_bf16,attention_mma_fp16}.cu compiled as host C++ against the CPU
// execution model (tests/emu): the include path puts tests/emu/include (shadow
// CUDA / CUB headers and the PTX / launch twins) before csrc/include.
// __CUDACC__ / __CUDA_ARCH__ select the device branches of the shared row
// math (apd/common.h, philox.h, sampling_row.h), as nvcc would.
#include "apd_emu/emu.h"  // standard headers first, before the macros below
#include "apd_emu/ptx.h"
#include "apd/cuda/cute_atoms.cuh"  // the emulated twin; CuTe before __CUDACC__ (a host compile)
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#include "../../csrc/cuda/attention_mma_bf16.cu"
#include "../../csrc/cuda/attention_mma_fp16.cu"
