// TEST-ONLY. Self-test of the CPU execution model (tests/test_emu_faults.py
// builds and runs it): small kernels whose results follow from the CUDA / PTX
// definitions directly, checked under the three schedules, plus the hard
// errors the harness must raise. Prints "SELFTEST OK" or the first failure.
#include <cstdio>
#include <vector>

#include "apd_emu/check.h"
#include "apd_emu/ptx.h"
#include "apd_emu/runtime_api.h"

namespace apd {
namespace attn {
extern __shared__ __align__(16) uint16_t smem16[];  // storage in kernel_smem.cpp
}  // namespace attn
}  // namespace apd

namespace {

template <class F>
void launch(dim3 grid, dim3 block, size_t smem, F body) {
  static int tag;  // any address serves as the "kernel" id
  const std::function<void()> fn = body;
  const int e = apd_emu::launch(&tag, grid, block, smem, fn);
  CHECK(e == 0, "launch error %d", e);
}

// ldmatrix .x1/.x2/.x4 with and without .trans: 4 matrices 8x8, element (r, c)
// of matrix i holds 64 i + 8 r + c.
void test_ldmatrix() {
  for (int nmat : {1, 2, 4})
    for (bool trans : {false, true}) {
      std::vector<uint32_t> out(32 * 4, 0xdeadbeefu);
      launch(dim3(1), dim3(32), 512, [&] {
        uint16_t* s = apd::attn::smem16;
        const int lane = int(threadIdx.x);
        for (int k = lane; k < 256; k += 32) s[k] = uint16_t(k);
        __syncthreads();
        const int i = lane / 8, r = lane % 8;
        uint32_t reg[4] = {0, 0, 0, 0};
        apd_emu::ldmatrix(reg, nmat, trans, apd_emu::shared_address(s + 64 * i + 8 * r));
        for (int m = 0; m < nmat; ++m) out[lane * 4 + m] = reg[m];
      });
      for (int l = 0; l < 32; ++l)
        for (int m = 0; m < nmat; ++m) {
          const int row = l / 4, col = 2 * (l % 4);
          const uint32_t lo = trans ? 64 * m + 8 * col + row : 64 * m + 8 * row + col;
          const uint32_t hi = trans ? 64 * m + 8 * (col + 1) + row : 64 * m + 8 * row + col + 1;
          CHECK(out[l * 4 + m] == (lo | (hi << 16)), "ldmatrix x%d trans=%d lane %d matrix %d: %08x", nmat, trans, l,
                m, out[l * 4 + m]);
        }
    }
}

void test_warp_ops() {
  std::vector<int> up(32), down(32), xr(32), idx(32);
  std::vector<unsigned> ballot(32), match(32), active(32, 0);
  std::vector<int> any(32), all(32);
  launch(dim3(1), dim3(32), 0, [&] {
    const int l = int(threadIdx.x);
    up[l] = __shfl_up_sync(0xffffffffu, 100 + l, 3, 8);
    down[l] = __shfl_down_sync(0xffffffffu, 100 + l, 2, 16);
    xr[l] = __shfl_xor_sync(0xffffffffu, 100 + l, 5);
    idx[l] = __shfl_sync(0xffffffffu, 100 + l, 7, 8);
    ballot[l] = __ballot_sync(0xffffffffu, l % 3 == 0);
    match[l] = __match_any_sync(0xffffffffu, unsigned(l % 4));
    any[l] = __any_sync(0xffffffffu, l == 31);
    all[l] = __all_sync(0xffffffffu, l < 31);
    if (l < 10) active[l] = __activemask();  // the lanes that took the branch
    __syncwarp();
  });
  unsigned want_ballot = 0;
  for (int l = 0; l < 32; l += 3) want_ballot |= 1u << l;
  for (int l = 0; l < 32; ++l) {
    CHECK(up[l] == 100 + ((l % 8) >= 3 ? l - 3 : l), "shfl_up lane %d: %d", l, up[l]);
    CHECK(down[l] == 100 + ((l % 16) + 2 < 16 ? l + 2 : l), "shfl_down lane %d: %d", l, down[l]);
    CHECK(xr[l] == 100 + (l ^ 5), "shfl_xor lane %d: %d", l, xr[l]);
    CHECK(idx[l] == 100 + (l & ~7) + 7, "shfl width 8 lane %d: %d", l, idx[l]);
    CHECK(ballot[l] == want_ballot, "ballot lane %d: %08x", l, ballot[l]);
    CHECK(match[l] == (0x11111111u << (l % 4)), "match_any lane %d: %08x", l, match[l]);
    CHECK(any[l] == 1 && all[l] == 0, "any/all lane %d", l);
    CHECK(active[l] == (l < 10 ? 0x3ffu : 0u), "activemask lane %d: %08x", l, active[l]);
  }
}

void test_atomics() {
  unsigned long long g_max = 0, g_min = ~0ull, g_cas = 0;
  int g_sum = 0;
  std::vector<unsigned> seen(256);
  launch(dim3(3), dim3(256), 0, [&] {
    __shared__ unsigned counter;
    if (threadIdx.x == 0) counter = 0;
    __syncthreads();
    const unsigned t = threadIdx.x + 256 * blockIdx.x;
    atomicAdd(&counter, 1u);
    atomicAdd(&g_sum, int(t));
    atomicMax(&g_max, (unsigned long long)(t) << 33);
    atomicMin(&g_min, (unsigned long long)(t + 5) << 33);
    atomicCAS(&g_cas, (unsigned long long)t, (unsigned long long)t + 1);  // increments once per matching t
    __syncthreads();
    if (threadIdx.x == 0 && blockIdx.x == 0) seen[0] = counter;
  });
  CHECK(seen[0] == 256, "shared atomicAdd: %u", seen[0]);
  CHECK(g_sum == 767 * 768 / 2, "global atomicAdd: %d", g_sum);
  CHECK(g_max == 767ull << 33 && g_min == 5ull << 33, "atomicMax/Min 64-bit");
  (void)g_cas;  // order-dependent by design; exercised, not checked
}

template <class F>
std::string error_of(dim3 block, F body) {
  try {
    launch(dim3(1), block, 0, body);
  } catch (const apd_emu::Error& e) {
    return e.what();
  }
  return "";
}

// Device profiles: the attributes the planners read, and the opt-in limit of
// the active profile enforced on the attribute and on the launch (hard errors).
void test_profiles(int* key) {
  int n = 0, dev = -1;
  CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0) == cudaSuccess && n == 232448,
        "H100 opt-in: %d", n);
  CHECK(cudaSetDevice(2) == cudaSuccess && cudaGetDevice(&dev) == cudaSuccess && dev == 2, "set device 2: %d", dev);
  const int want[6][2] = {{cudaDevAttrComputeCapabilityMajor, 8}, {cudaDevAttrComputeCapabilityMinor, 6},
                          {cudaDevAttrMaxSharedMemoryPerBlockOptin, 101376},
                          {cudaDevAttrMaxSharedMemoryPerMultiprocessor, 102400},
                          {cudaDevAttrMultiProcessorCount, 64}, {cudaDevAttrMaxRegistersPerMultiprocessor, 65536}};
  for (const auto& w : want) {
    CHECK(cudaDeviceGetAttribute(&n, cudaDeviceAttr(w[0]), dev) == cudaSuccess && n == w[1], "A5000 attr %d: %d",
          w[0], n);
  }
  // The 64 KB attribute set above still fits; one byte over the opt-in limit
  // fails on the attribute and on a launch (the attribute kept from the H100
  // profile notwithstanding).
  const int fits = apd_emu::launch(key, dim3(1), dim3(32), 64 * 1024, [] {});
  CHECK(fits == cudaSuccess, "64 KB on the A5000 profile: %d", fits);
  std::string attr_err, launch_err;
  try {
    (void)apd_emu::set_max_dynamic_smem(key, 101377);
  } catch (const apd_emu::Error& e) {
    attr_err = e.what();
  }
  CHECK(attr_err.find("101376 byte opt-in limit of the A5000 profile (sm_86)") != std::string::npos,
        "attribute over the opt-in limit: '%s'", attr_err.c_str());
  CHECK(cudaSetDevice(0) == cudaSuccess, "back to device 0");
  CHECK(apd_emu::set_max_dynamic_smem(key, 104464) == cudaSuccess, "104464 B on the H100 profile");
  CHECK(cudaSetDevice(3) == cudaSuccess, "device 3");
  try {
    (void)apd_emu::launch(key, dim3(1), dim3(32), 104464, [] {});
  } catch (const apd_emu::Error& e) {
    launch_err = e.what();
  }
  CHECK(launch_err.find("asks for 104464 bytes") != std::string::npos &&
            launch_err.find("RTX4090 profile (sm_89)") != std::string::npos,
        "launch over the opt-in limit: '%s'", launch_err.c_str());
  CHECK(cudaSetDevice(0) == cudaSuccess && cudaSetDevice(4) == cudaErrorInvalidValue, "device ids");
}

void test_errors() {
  const std::string div = error_of(dim3(64), [] {
    if (threadIdx.x < 40) __syncthreads();
  });
  CHECK(div.find("__syncthreads not reached") != std::string::npos, "divergent barrier: '%s'", div.c_str());
  const std::string mask = error_of(dim3(32), [] {
    if (threadIdx.x < 16) (void)__shfl_sync(0xffffffffu, 1, 0);
  });
  CHECK(mask.find("mask 0xffffffff") != std::string::npos && mask.find("warp 0") != std::string::npos,
        "shuffle of absent lanes: '%s'", mask.c_str());
  static int keys[3];  // a fresh "kernel" per schedule: the attribute persists, as on a device
  int* key = &keys[apd_emu::schedule_kind()];
  const int e = apd_emu::launch(key, dim3(1), dim3(1025), 0, [] {});
  CHECK(e == cudaErrorInvalidConfiguration, "1025 threads: %d", e);
  const int s = apd_emu::launch(key, dim3(1), dim3(32), 64 * 1024, [] {});
  CHECK(s == cudaErrorInvalidValue, "64 KB dynamic smem without the attribute: %d", s);
  CHECK(apd_emu::set_max_dynamic_smem(key, 64 * 1024) == cudaSuccess, "attribute");
  const int ok = apd_emu::launch(key, dim3(1), dim3(32), 64 * 1024, [] {});
  CHECK(ok == cudaSuccess, "64 KB dynamic smem with the attribute: %d", ok);
  (void)apd_emu::take_last_error();
  test_profiles(key);
}

}  // namespace

int main() {
  for (int s = 0; s < 3; ++s) {
    apd_emu::set_schedule(s, 99);
    test_ldmatrix();
    test_warp_ops();
    test_atomics();
    test_errors();
  }
  if (g_fail) return 1;
  std::printf("SELFTEST OK\n");
  return 0;
}
