// The device limits the kernel planners read (attention_launch.cu,
// sampling.cu): one cudaDeviceGetAttribute set per device, cached, so a plan
// is a pure function of (DeviceProfile, shapes) and tests can hand the
// planners any profile (the CPU execution harness, tests/emu, answers these
// attribute calls from its own device profiles: A100, A5000, RTX 4090, H100).
//
// Figures of the cards the wheel targets (CUDA C Programming Guide, "Technical
// Specifications per Compute Capability"; the opt-in limit is per block, one
// more KB per block is reserved by the driver out of the per-SM pool):
//   sm_80 A100      166,912 B opt-in, 167,936 B per SM, 108 SMs, 65,536 regs/SM
//   sm_86 A5000     101,376 B         102,400 B          64 SMs
//   sm_89 RTX 4090  101,376 B         102,400 B         128 SMs
//   sm_90 H100      232,448 B         233,472 B         132 SMs
#pragma once
#include <cuda_runtime_api.h>

#include <mutex>

namespace apd {

struct DeviceProfile {
  int cc_major = 9, cc_minor = 0;  // compute capability
  int smem_optin = 232448;         // cudaDevAttrMaxSharedMemoryPerBlockOptin: dynamic smem one block may opt in to
  int smem_per_sm = 233472;        // cudaDevAttrMaxSharedMemoryPerMultiprocessor
  int sm_count = 132;              // cudaDevAttrMultiProcessorCount
  int regs_per_sm = 65536;         // cudaDevAttrMaxRegistersPerMultiprocessor
};

// Blocks of one kernel that fit on an SM at once, by shared memory (plus the
// 1 KB the driver reserves per block) and by registers (threads x the
// kernel's per-thread cap from its launch bounds), at most `cap`.
constexpr int blocks_per_sm(const DeviceProfile& d, size_t smem, int threads, int regs_per_thread, int cap) {
  int n = cap;
  const size_t by_smem = size_t(d.smem_per_sm) / (smem + 1024);
  if (size_t(n) > by_smem) n = int(by_smem);
  const int by_regs = d.regs_per_sm / (threads * regs_per_thread);
  if (n > by_regs) n = by_regs;
  return n < 1 ? 1 : n;
}

// The current device's profile, read once per device id and cached. A failed
// query (no device) leaves the H100 defaults and clears the sticky error, so
// that the caller's own launch reports the real problem.
inline DeviceProfile current_device_profile() {
  constexpr int kMaxDevices = 64;
  static std::mutex mu;
  static DeviceProfile cache[kMaxDevices];
  static bool known[kMaxDevices] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    (void)cudaGetLastError();
    return DeviceProfile{};
  }
  std::lock_guard<std::mutex> lock(mu);
  if (known[dev]) return cache[dev];
  DeviceProfile d;
  int v[6] = {0, 0, 0, 0, 0, 0};
  const cudaDeviceAttr attrs[6] = {cudaDevAttrComputeCapabilityMajor, cudaDevAttrComputeCapabilityMinor,
                                   cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                                   cudaDevAttrMultiProcessorCount, cudaDevAttrMaxRegistersPerMultiprocessor};
  for (int i = 0; i < 6; ++i) {
    if (cudaDeviceGetAttribute(&v[i], attrs[i], dev) != cudaSuccess || v[i] < (i == 1 ? 0 : 1)) {  // minor may be 0
      (void)cudaGetLastError();
      return DeviceProfile{};  // not cached: a later call may succeed
    }
  }
  d.cc_major = v[0];
  d.cc_minor = v[1];
  d.smem_optin = v[2];
  d.smem_per_sm = v[3];
  d.sm_count = v[4];
  d.regs_per_sm = v[5];
  cache[dev] = d;
  known[dev] = true;
  return d;
}

}  // namespace apd
