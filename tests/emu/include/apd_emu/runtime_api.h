// TEST-ONLY. The CUDA runtime API subset that the project's launchers use,
// for the emulated build (tests/emu). No device memory: the "device" pointers
// are host pointers (CPU tensors).
#pragma once
#include "apd_emu/emu.h"

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr : int {  // the runtime's values
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxRegistersPerMultiprocessor = 82,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

namespace apd_emu {
cudaError_t take_last_error();
void set_last_error(cudaError_t e);
}  // namespace apd_emu

inline cudaError_t cudaGetLastError() { return apd_emu::take_last_error(); }
inline cudaError_t cudaPeekAtLastError() {
  const cudaError_t e = apd_emu::take_last_error();
  apd_emu::set_last_error(e);
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    case cudaErrorInvalidDeviceFunction: return "invalid device function (emulated)";
    default: return "unspecified launch failure (emulated)";
  }
}
// Devices are the harness's device profiles (apd_emu/emu.h).
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = apd_emu::active_device();
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int dev) { return cudaError_t(apd_emu::set_active_device(dev)); }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= apd_emu::device_count()) return cudaErrorInvalidValue;
  const apd_emu::DeviceProfile& d = apd_emu::device_profile(device);
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sm_count; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = d.cc_major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = d.cc_minor; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = d.smem_per_sm; return cudaSuccess;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *value = d.regs_per_sm; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_optin; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return cudaError_t(apd_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value));
}
