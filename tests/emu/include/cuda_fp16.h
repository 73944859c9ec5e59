// TEST-ONLY shadow of <cuda_fp16.h> for the emulated build (tests/emu).
#pragma once
#include "apd_emu/half.h"

// CUDA names __half `half` too (CUTLASS uses both).
using half = __half;
using half2 = __half2;
inline __half __float2half(float x) { return __float2half_rn(x); }
// The raw-bits struct CUTLASS's half_t converts through on a host compile.
struct __half_raw {
  unsigned short x;
  __half_raw() = default;
  __half_raw(__half h) : x(h.x) {}
  operator __half() const { return __half{x}; }
};
