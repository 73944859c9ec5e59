// TEST-ONLY shadow of the driver API header <cuda.h>: CuTe's TMA descriptor
// header includes it on a host compile; the parts that use driver types are
// behind __CUDACC_VER_MAJOR__, which this build never defines.
#pragma once
#include "apd_emu/emu.h"
