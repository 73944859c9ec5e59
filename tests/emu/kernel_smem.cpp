// TEST-ONLY. Storage of the kernels' dynamic shared memory for the emulated
// build: `extern __shared__ T name[]` becomes `extern thread_local T name[]`
// (apd_emu/emu.h), so each array the kernels declare is defined here once, at
// the largest size a launch may ask for, and registered with the harness (for
// poisoning before every CTA and for __cvta_generic_to_shared). A kernel that
// declares a new dynamic array fails to link until it is added here.
#include <cstdint>

#include "apd_emu/emu.h"

namespace apd {
namespace attn {
alignas(16) thread_local float smem[apd_emu::kMaxSmemBytes / sizeof(float)];        // attention_simple.cuh
alignas(16) thread_local uint16_t smem16[apd_emu::kMaxSmemBytes / sizeof(uint16_t)];  // attention_mma.cuh
}  // namespace attn
}  // namespace apd

namespace {
void* get_smem() { return apd::attn::smem; }
void* get_smem16() { return apd::attn::smem16; }
const bool registered = (apd_emu::register_dynamic_smem(&get_smem, "apd::attn::smem"),
                         apd_emu::register_dynamic_smem(&get_smem16, "apd::attn::smem16"), true);
}  // namespace
