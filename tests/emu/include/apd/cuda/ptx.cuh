// TEST-ONLY twin of csrc/include/apd/cuda/ptx.cuh (found first on the emulated
// build's include path): one emulated function per inline-PTX wrapper, with
// the same names and signatures; the semantics are in apd_emu/ptx.h.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "apd/common.h"
#include "apd_emu/ptx.h"

namespace apd {
namespace attn {

APD_DEVICE uint32_t smem_u32(const void* p) { return apd_emu::shared_address(p); }
APD_DEVICE void cp_async_16(uint32_t dst, const void* src, int src_bytes) { apd_emu::cp_async(dst, src, 16, src_bytes); }
APD_DEVICE void cp_async_commit() { apd_emu::cp_async_commit(); }
template <int N>
APD_DEVICE void cp_async_wait() {
  apd_emu::cp_async_wait(N);
}
APD_DEVICE void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { apd_emu::ldmatrix(r, 4, false, addr); }
APD_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { apd_emu::ldmatrix(r, 4, true, addr); }
APD_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bf16_t) {
  apd_emu::mma_m16n8k16(d, a, b0, b1, /*bf16=*/true);
}
APD_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, fp16_t) {
  apd_emu::mma_m16n8k16(d, a, b0, b1, /*bf16=*/false);
}

}  // namespace attn
}  // namespace apd
