// Torch-free basics shared by every apd kernel header: host/device
// qualifiers, the element types the ops accept, and exact conversions to fp32.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define APD_HD __host__ __device__ __forceinline__
#define APD_DEVICE __device__ __forceinline__
#else
#define APD_HD inline
#define APD_DEVICE inline
#endif

namespace apd {

// Runtime dtype tag passed from the torch layer to the launchers, so that the
// binding code never needs CUDA's own half types.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Storage-only 16-bit types, layout-compatible with c10::BFloat16 / c10::Half,
// __nv_bfloat16 / __half. Kernels convert to fp32 on load.
struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

APD_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

APD_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

APD_HD float to_float(float x) { return x; }
APD_HD float to_float(bf16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }

// IEEE binary16 -> binary32, exact (normals, subnormals, inf, NaN).
APD_HD float to_float(fp16_t x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  // Subnormal or zero: man * 2^-24, exact in fp32.
  const float mag = float(man) * 5.9604644775390625e-08f;
  return sign ? -mag : mag;
}

// Round-to-nearest-even fp32 -> bf16 / fp16 (used when writing outputs on the CPU).
APD_HD bf16_t to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}

APD_HD fp16_t to_fp16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return fp16_t{uint16_t(sign | 0x7e00u)};  // NaN
  if (au >= 0x477ff000u) return fp16_t{uint16_t(sign | 0x7c00u)};  // overflow -> inf
  if (au < 0x38800000u) {  // result is subnormal or zero: round(|f| * 2^24)
    const float mag = bits_to_float(au) * 16777216.0f;
    // Round half to even on the integer: mag < 1024 so the fp32 add is exact.
    float r = mag + 8388608.0f;  // 2^23 forces rounding to integer (RNE)
    const uint32_t m = float_to_bits(r) - 0x4b000000u;
    return fp16_t{uint16_t(sign | m)};
  }
  const uint32_t exp = ((au >> 23) - 112u) << 10;
  uint32_t man = au & 0x7fffffu;
  uint32_t h = exp | (man >> 13);
  const uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;  // may carry into exp: correct
  return fp16_t{uint16_t(sign | h)};
}

template <typename T> struct from_float_impl;
template <> struct from_float_impl<float> { APD_HD static float apply(float f) { return f; } };
template <> struct from_float_impl<bf16_t> { APD_HD static bf16_t apply(float f) { return to_bf16(f); } };
template <> struct from_float_impl<fp16_t> { APD_HD static fp16_t apply(float f) { return to_fp16(f); } };
template <typename T> APD_HD T from_float(float f) { return from_float_impl<T>::apply(f); }

// Integer ceil-div used by every launcher.
template <typename T> APD_HD T ceil_div(T a, T b) { return (a + b - 1) / b; }

}  // namespace apd
