// TEST-ONLY shadow of <cuda_bf16.h> for the emulated build (tests/emu).
#pragma once
#include "apd_emu/half.h"
