// The row math (sampling_row.h, philox.h) gives the same bits when built with
// -march=native -mfma as with the default flags: -ffp-contract=off keeps g++
// from fusing R*d + (1-R)*a into an FMA (which CUDA's __fmul_rn/__fadd_rn
// never do), and the explicit fma_rn calls of log_fp32 are FMAs everywhere.
// Built by CMakeLists.txt from tests/cpp/native/ (two objects, two flag sets).
#include <cstdint>
#include <cstdio>

uint64_t apd_probe_default(uint32_t n);
uint64_t apd_probe_native(uint32_t n);

int main() {
  const uint32_t n = 1u << 18;
  const uint64_t a = apd_probe_default(n), b = apd_probe_native(n);
  std::printf("default 0x%016llx  native 0x%016llx\n", (unsigned long long)a, (unsigned long long)b);
  if (a != b) {
    std::fprintf(stderr, "row math differs between the default and the -march=native -mfma build\n");
    return 1;
  }
  return 0;
}
