// TEST-ONLY. CPU execution model for the project's CUDA kernels (issue 11).
//
// The unchanged kernel templates of csrc/include/apd/cuda/*.cuh are compiled as
// host C++ against this header (reached through the shadow <cuda_runtime.h>,
// <cuda_fp16.h>, <cuda_bf16.h> and cub/ headers of tests/emu/include; the real
// CUDA include dir is never on that include path).
//
// Execution model
//   * CTAs run one at a time, in an order that depends on the schedule. The
//     threads of a CTA are cooperative fibers (own stacks, x86-64 stack switch
//     in emu.cpp); a fiber runs alone until it reaches a synchronisation point:
//     __syncthreads, a warp collective (shuffles, votes, match, __activemask,
//     __syncwarp, ldmatrix, mma). Between two such points a thread's code runs
//     without interleaving, so a run is deterministic for a given schedule.
//   * Schedules: the ready fibers of a CTA run, at every round, in forward,
//     reverse or seeded-shuffle order of their linear thread id; CTAs too.
//     A result that depends on the schedule is a race.
//   * Warp collectives resolve when every fiber of the CTA is blocked. The
//     lanes named by a collective's mask must all be blocked at the same kind
//     of collective with the same mask; otherwise (a lane exited, waits at a
//     barrier or at another collective) the launch fails with an error naming
//     the kernel, the block, the warp and the masks. __activemask() returns the
//     lanes of the warp that are blocked at __activemask() at that moment.
//   * __syncthreads releases when all threads wait at it; if some exited or
//     wait at a warp collective that cannot complete, the launch fails.
//   * Shared memory: `__shared__` is `thread_local` (one OS thread runs a CTA's
//     fibers; CTAs are sequential), so static __shared__ variables are per CTA.
//     Dynamic `extern __shared__` arrays are defined by the harness
//     (kernel_smem.cpp), poisoned with a schedule-dependent byte pattern before
//     every CTA, and their size is checked against the opt-in attribute.
//     Static __shared__ variables are NOT poisoned (they keep the previous
//     CTA's bytes).
//   * Launch limits as the driver: grid x < 2^31, y, z <= 65535; <= 1024
//     threads (x, y <= 1024, z <= 64); dynamic smem <= 48 KB unless raised by
//     cudaFuncSetAttribute(MaxDynamicSharedMemorySize), never above the active
//     device profile's opt-in limit (227 KB on the default H100 profile).
//   * Device profiles: the emulated "devices" are the profiles of real cards
//     (A100 sm_80, A5000 sm_86, RTX 4090 sm_89, H100 sm_90; device id =
//     profile index, cudaSetDevice picks one, H100 by default).
//     cudaDeviceGetAttribute answers from the active one (compute capability,
//     opt-in shared memory per block, shared memory and registers per SM, SM
//     count), so the planners read it through the calls the product makes.
//     Raising a kernel's attribute above the opt-in limit fails as on the
//     driver (cudaErrorInvalidValue), and a launch asking for more dynamic
//     shared memory than the opt-in limit is a hard harness error (Error
//     naming the kernel, the bytes and the profile), whatever attribute a
//     kernel kept from another profile.
//
// Device math: intrinsics with an exact IEEE definition (__fmul_rn,
// __fadd_rn, bit casts, RNE conversions to half / bfloat16 / integers) are
// exact here. expf, exp2f, logf, log2f, exp, log are the HOST libm: glibc is
// within 1 ulp (usually correctly rounded), the device's expf / exp2f are
// within 2 ulp and logf / log2f within 1 ulp (CUDA Programming Guide, Table
// "Single-Precision Mathematical Functions"). So emulated results can differ
// from a real device by those ulps: tests compare against the CPU kernels with
// the near-tie / fp64-tolerance rules of docs/SEMANTICS.md, never bit-exactly
// where libm is involved. mma.m16n8k16 accumulates exactly (fp64) and rounds
// once to fp32 (the tensor core's internal order and truncation are not
// modelled). Not modelled at all: memory ordering between CTAs running
// concurrently, timing, occupancy, register pressure, bank conflicts, L1/L2.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------------------
// Vector types and launch geometry
// ---------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---------------------------------------------------------------------------
// Qualifiers: kernels are plain host functions here.
// ---------------------------------------------------------------------------
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local

namespace apd_emu {

// Raised (as a C++ exception, from the launch) for every harness error.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Op : int {
  kNone = 0,
  kShfl,
  kShflUp,
  kShflDown,
  kShflXor,
  kBallot,
  kAny,
  kAll,
  kMatchAny,
  kActiveMask,
  kSyncWarp,
  kLdmatrix,
  kMma,
};
const char* op_name(Op op);

constexpr int kMaxWords = 8;  // 32-bit words a lane contributes to one collective

struct CpAsyncCopy {
  unsigned char* dst;
  unsigned char data[16];
};

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  unsigned char* stack = nullptr;
  uint3 tid{0, 0, 0};
  int linear = 0, warp = 0, lane = 0;
  int state = 0;  // see emu.cpp
  // The pending collective.
  Op op = Op::kNone;
  unsigned mask = 0;
  int nwords = 0;
  uint32_t words[kMaxWords];
  // Its outcome: the lanes that took part and every lane's words (a snapshot
  // per warp, valid until the warp's next resolution: a released lane reads it
  // as soon as it resumes, before any other collective of its warp resolves).
  unsigned arrived = 0;
  const uint32_t (*got)[kMaxWords] = nullptr;
  // cp.async: the open group and the committed, not yet waited groups.
  std::vector<CpAsyncCopy> cp_open;
  std::vector<std::vector<CpAsyncCopy>> cp_groups;
};

extern Fiber* g_fiber;  // the running fiber
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

// Blocks the calling fiber at a warp collective; on return g_fiber->arrived
// and g_fiber->got hold the outcome.
void collective(Op op, unsigned mask, const uint32_t* words, int nwords);
void syncthreads();
[[noreturn]] void fail(const std::string& what);  // harness error from inside a kernel

// Schedules: 0 forward, 1 reverse, 2 seeded shuffle.
void set_schedule(int kind, uint64_t seed);
int schedule_kind();

// Runs `body` as the kernel at `kernel` over grid x block (throws Error on a
// harness error; returns a launch error code as the driver would).
int launch(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);
int set_max_dynamic_smem(const void* kernel, int bytes);

// Device profiles (the cards of the build's arch list; figures from the CUDA C
// Programming Guide's per-compute-capability table and the cards' specs).
struct DeviceProfile {
  const char* name;
  int cc_major, cc_minor;
  int smem_optin;   // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int smem_per_sm;  // cudaDevAttrMaxSharedMemoryPerMultiprocessor
  int sm_count;     // cudaDevAttrMultiProcessorCount
  int regs_per_sm;  // cudaDevAttrMaxRegistersPerMultiprocessor
};
int device_count();
const DeviceProfile& device_profile(int device);
int active_device();
int set_active_device(int device);  // cudaErrorInvalidValue (1) for an unknown id

// Dynamic shared memory arrays (`extern __shared__ T name[]`), registered by
// kernel_smem.cpp; `get` returns this OS thread's instance.
constexpr size_t kMaxSmemBytes = 227 * 1024;
void register_dynamic_smem(void* (*get)(), const char* name);
uint32_t shared_address(const void* p);   // __cvta_generic_to_shared
unsigned char* shared_pointer(uint32_t a, size_t bytes);  // its inverse, bounds-checked

// Stats of the last launch (tests print them).
uint64_t collectives_resolved();

}  // namespace apd_emu

#define threadIdx (::apd_emu::g_fiber->tid)
#define blockIdx (::apd_emu::g_block_idx)
#define blockDim (::apd_emu::g_block_dim)
#define gridDim (::apd_emu::g_grid_dim)

// ---------------------------------------------------------------------------
// Warp collectives (exact mask semantics: see the top of this file)
// ---------------------------------------------------------------------------
namespace apd_emu {

template <typename T>
inline T shuffle_words(Op op, unsigned mask, T v, int arg, int width) {
  static_assert(std::is_trivially_copyable<T>::value, "shuffled types must be trivially copyable");
  constexpr int n = int((sizeof(T) + 3) / 4);
  static_assert(n <= kMaxWords, "shuffled type too large for the harness");
  uint32_t w[kMaxWords] = {};
  std::memcpy(w, &v, sizeof(T));
  collective(op, mask, w, n);
  Fiber* f = g_fiber;
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width must be a power of two <= 32");
  const int lane = f->lane;
  const int base = lane & ~(width - 1);
  int src = lane;
  switch (op) {
    case Op::kShfl: src = base + (arg & (width - 1)); break;
    case Op::kShflUp: src = (lane - base) >= arg ? lane - arg : lane; break;
    case Op::kShflDown: src = (lane - base) + arg < width ? lane + arg : lane; break;
    case Op::kShflXor: src = lane ^ arg; if (src >= base + width || src < base) src = lane; break;
    default: break;
  }
  if (!((f->arrived >> src) & 1u))
    fail(std::string(op_name(op)) + ": lane " + std::to_string(lane) + " reads lane " + std::to_string(src) +
         ", which is not in the mask");
  T out;
  std::memcpy(&out, f->got[src], sizeof(T));
  return out;
}

inline unsigned vote(Op op, unsigned mask, bool pred) {
  const uint32_t w = pred ? 1u : 0u;
  collective(op, mask, &w, 1);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l)
    if (((g_fiber->arrived >> l) & 1u) && g_fiber->got[l][0]) bits |= 1u << l;
  return bits;
}

}  // namespace apd_emu

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return apd_emu::shuffle_words(apd_emu::Op::kShfl, mask, v, src, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return apd_emu::shuffle_words(apd_emu::Op::kShflUp, mask, v, int(delta), width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return apd_emu::shuffle_words(apd_emu::Op::kShflDown, mask, v, int(delta), width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return apd_emu::shuffle_words(apd_emu::Op::kShflXor, mask, v, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return apd_emu::vote(apd_emu::Op::kBallot, mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return apd_emu::vote(apd_emu::Op::kAny, mask, pred != 0) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  const unsigned bits = apd_emu::vote(apd_emu::Op::kAll, mask, pred != 0);
  return bits == apd_emu::g_fiber->arrived;
}
inline unsigned __match_any_sync(unsigned mask, unsigned value) {
  apd_emu::collective(apd_emu::Op::kMatchAny, mask, &value, 1);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l)
    if (((apd_emu::g_fiber->arrived >> l) & 1u) && apd_emu::g_fiber->got[l][0] == value) bits |= 1u << l;
  return bits;
}
inline unsigned __activemask() {
  apd_emu::collective(apd_emu::Op::kActiveMask, 0u, nullptr, 0);
  return apd_emu::g_fiber->arrived;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { apd_emu::collective(apd_emu::Op::kSyncWarp, mask, nullptr, 0); }
inline void __syncthreads() { apd_emu::syncthreads(); }

// ---------------------------------------------------------------------------
// Atomics (32/64-bit add, max, min, CAS) on shared and global memory: fibers
// never interleave inside one, and CTAs run one at a time, so plain
// read-modify-write is atomic here.
// ---------------------------------------------------------------------------
template <typename T>
inline T __apd_emu_atomic_check(T* p) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomics are 32- or 64-bit");
  if (reinterpret_cast<uintptr_t>(p) % sizeof(T) != 0) apd_emu::fail("misaligned atomic address");
  return *p;
}
inline int atomicAdd(int* p, int v) { const int o = __apd_emu_atomic_check(p); *p = int(unsigned(o) + unsigned(v)); return o; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { const unsigned o = __apd_emu_atomic_check(p); *p = o + v; return o; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long o = __apd_emu_atomic_check(p); *p = o + v; return o;
}
inline float atomicAdd(float* p, float v) { const float o = __apd_emu_atomic_check(p); *p = o + v; return o; }
inline double atomicAdd(double* p, double v) { const double o = __apd_emu_atomic_check(p); *p = o + v; return o; }
template <typename T>
inline T atomicMax(T* p, T v) { const T o = __apd_emu_atomic_check(p); *p = o < v ? v : o; return o; }
template <typename T>
inline T atomicMin(T* p, T v) { const T o = __apd_emu_atomic_check(p); *p = v < o ? v : o; return o; }
template <typename T>
inline T atomicCAS(T* p, T compare, T v) { const T o = __apd_emu_atomic_check(p); if (o == compare) *p = v; return o; }
template <typename T>
inline T atomicExch(T* p, T v) { const T o = __apd_emu_atomic_check(p); *p = v; return o; }

// ---------------------------------------------------------------------------
// Integer and float intrinsics
// ---------------------------------------------------------------------------
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a < b ? b : a; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a < b ? b : a; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a < b ? b : a; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a < b ? b : a; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a < b ? b : a; }
// fabsf, fmaxf, expf, exp2f, logf, log2f, exp, log: the host's <math.h> (see the top).

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
// The build uses -ffp-contract=off, so these are single IEEE operations (RNE).
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
// One rounding, as the device's FFMA (std::fmaf is exact with or without hardware FMA).
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
// Round to nearest even; NaN -> 2^63, out of range saturates (as the device's cvt.rni.u64.f32).
inline unsigned long long __float2ull_rn(float x) {
  if (x != x) return 1ull << 63;
  if (x <= 0.0f) return 0;
  if (x >= 18446744073709551616.0f) return ~0ull;
  return (unsigned long long)std::nearbyint(double(x));
}
inline int __float2int_rn(float x) { return int(std::nearbyint(x)); }
