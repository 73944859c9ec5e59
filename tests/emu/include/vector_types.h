// TEST-ONLY shadow of <vector_types.h> (CUTLASS's platform.h includes it on a
// host compile): the emulator's vector types (apd_emu/emu.h) plus the ones
// CUTLASS names in its alignment table.
#pragma once
#include "apd_emu/emu.h"
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) longlong2 {
  long long x, y;
};
struct alignas(16) ulonglong2 {
  unsigned long long x, y;
};
struct alignas(16) double2 {
  double x, y;
};
struct alignas(16) long4 {
  long x, y, z, w;
};
struct alignas(16) ulong4 {
  unsigned long x, y, z, w;
};
struct alignas(16) longlong4 {
  long long x, y, z, w;
};
struct alignas(16) ulonglong4 {
  unsigned long long x, y, z, w;
};
struct alignas(16) double4 {
  double x, y, z, w;
};
