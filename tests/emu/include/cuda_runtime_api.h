// TEST-ONLY shadow of <cuda_runtime_api.h> for the emulated build (tests/emu).
#pragma once
#include "apd_emu/runtime_api.h"
