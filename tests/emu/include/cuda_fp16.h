// TEST-ONLY shadow of <cuda_fp16.h> for the emulated build (tests/emu).
#pragma once
#include "apd_emu/half.h"
