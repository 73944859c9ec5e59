// The CuTe atoms of the tensor-core attention kernel (attention_mma.cuh), named
// in this one header so that the CPU emulator (tests/emu, test-only) can supply
// a twin of each through include-path shadowing (tests/emu/include/apd/cuda/
// cute_atoms.cuh); the kernel itself carries no #ifdef. The real atoms execute their inline PTX only when
// CuTe's CUTE_ARCH_*_ENABLED macros are on (a device compile for sm_80+).
//   * Mma<T>:  mma.sync.m16n8k16, bf16 or fp16 inputs, fp32 accumulators;
//   * LdsmN:   ldmatrix.x4 (four 8x8 b16 matrices: the A and K operands);
//   * LdsmT:   ldmatrix.x4.trans (V, stored key-major, as the B operand of P V);
//   * CpAsync: cp.async.cg 16 bytes with zero fill (src-size 0 when !pred);
//   * cp_async_fence / cp_async_wait<N>: commit_group / wait_group N.
#pragma once
#if !__has_include(<cute/tensor.hpp>)
#error "apd: the CUDA attention kernel needs the CuTe headers: pip install nvidia-cutlass==4.2.0.0 (setup.py and cmake/ApdCutlass.cmake then add cutlass_library/source/include)"
#endif
#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <cute/tensor.hpp>

#include "apd/common.h"

namespace apd {
namespace attn {
namespace atoms {

template <typename T>
struct MmaFor;
template <>
struct MmaFor<bf16_t> {
  using type = cute::SM80_16x8x16_F32BF16BF16F32_TN;
  using elem = cute::bfloat16_t;
};
template <>
struct MmaFor<fp16_t> {
  using type = cute::SM80_16x8x16_F32F16F16F32_TN;
  using elem = cute::half_t;
};
template <typename T>
using Mma = typename MmaFor<T>::type;
template <typename T>
using Elem = typename MmaFor<T>::elem;  // CuTe's element type for T

using LdsmN = cute::SM75_U32x4_LDSM_N;
using LdsmT = cute::SM75_U16x8_LDSM_T;
using CpAsync = cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>;

APD_DEVICE void cp_async_fence() { cute::cp_async_fence(); }
template <int N>
APD_DEVICE void cp_async_wait() {
  cute::cp_async_wait<N>();
}

}  // namespace atoms
}  // namespace attn
}  // namespace apd
