// TEST-ONLY shadow of <cuda_runtime.h> for the emulated build (tests/emu).
#pragma once
#include "apd_emu/runtime_api.h"
#include "apd_emu/half.h"
