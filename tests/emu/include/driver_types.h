// TEST-ONLY shadow of <driver_types.h> (CUTLASS's cuda_host_adapter.hpp
// includes it on a host compile): the emulator's runtime API types.
#pragma once
#include "apd_emu/runtime_api.h"
