// TEST-ONLY shadow of <cuda_bf16.h> for the emulated build (tests/emu).
#pragma once
#include "apd_emu/half.h"

// The raw-bits struct CUTLASS's bfloat16_t converts through on a host compile.
struct __nv_bfloat16_raw {
  unsigned short x;
  __nv_bfloat16_raw() = default;
  __nv_bfloat16_raw(__nv_bfloat16 b) : x(b.x) {}
  operator __nv_bfloat16() const { return __nv_bfloat16{x}; }
};
