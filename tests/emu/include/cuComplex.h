// TEST-ONLY shadow of <cuComplex.h> (CUTLASS's complex.h includes it; the
// attention kernel uses no complex type): the two structs and helpers it names.
#pragma once
struct alignas(8) cuFloatComplex {
  float x, y;
};
struct alignas(16) cuDoubleComplex {
  double x, y;
};
inline cuFloatComplex make_cuFloatComplex(float x, float y) { return cuFloatComplex{x, y}; }
inline cuDoubleComplex make_cuDoubleComplex(double x, double y) { return cuDoubleComplex{x, y}; }
inline float cuCrealf(cuFloatComplex z) { return z.x; }
inline float cuCimagf(cuFloatComplex z) { return z.y; }
inline double cuCreal(cuDoubleComplex z) { return z.x; }
inline double cuCimag(cuDoubleComplex z) { return z.y; }
