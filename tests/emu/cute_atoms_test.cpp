// TEST-ONLY. The emulated CuTe atoms (include/apd/cuda/cute_atoms.cuh) through
// CuTe itself, as the mma attention kernel uses them (tests/test_emu_faults.py
// builds and runs it): a TiledMMA of 4 warps x m16n8k16 (N tile 16) computes
//   C  = A B^T  (A [64 x 32] and B [32 x 32] K-major in shared memory, both
//               through ldmatrix.x4 TiledCopies: the S = Q K^T path)
//   C2 = A V    (V [32 x 32] key-major, as V^T through ldmatrix.x4.trans: the
//               O += P V path)
// with A, B, V loaded by the cp.async zero-fill atom (every 5th row of A with
// pred = false, so it must arrive as zeros) and committed / waited as one group.
// Small integer inputs make every sum exact, so C and C2 must equal the host
// products bit for bit, for bf16 and fp16, under the three schedules. Prints
// "CUTE ATOMS OK" or the first failures.
#include "apd_emu/emu.h"
#include "apd_emu/check.h"
#include "apd_emu/ptx.h"
#include "apd/cuda/cute_atoms.cuh"  // the emulated twin (CuTe as host code)
#include "apd/common.h"
#include "apd_emu/runtime_api.h"

#include <cmath>
#include <cstdio>
#include <vector>

namespace apd {
namespace attn {
extern __shared__ __align__(16) uint16_t smem16[];  // storage in kernel_smem.cpp
}  // namespace attn
}  // namespace apd

namespace {

uint16_t bits_of(float x, apd::bf16_t) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
uint16_t bits_of(float x, apd::fp16_t) { return __half_as_ushort(__float2half_rn(x)); }

template <typename T>
void test_gemm(int seed) {
  using namespace cute;
  using E = apd::attn::atoms::Elem<T>;
  using Atoms = apd::attn::atoms::MmaFor<T>;
  constexpr int M = 64, N = 32, K = 32, SA = K + 8, SV = N + 8;
  const auto val = [&](int i, int j, int salt) { return float((i * 7 + j * 3 + salt + seed) % 9 - 4); };
  // Global inputs (operator new: 16-byte aligned rows, as cp.async needs).
  std::vector<uint16_t> ga(M * K), gb(N * K), gv(K * N);
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; ++k) ga[m * K + k] = bits_of(val(m, k, 1), T{});
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) gb[n * K + k] = bits_of(val(n, k, 2), T{});
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < N; ++n) gv[k * N + n] = bits_of(val(k, n, 5), T{});
  std::vector<float> c(M * N, NAN), c2(M * N, NAN);
  static int tag;
  const std::function<void()> body = [&] {
    uint16_t* sa = apd::attn::smem16;  // [M][SA]
    uint16_t* sb = sa + M * SA;        // [N][SA]
    uint16_t* sv = sb + N * SA;        // [K][SV]
    const int tid = int(threadIdx.x);
    using Cp = apd::attn::atoms::CpAsync;
    for (int q = tid; q < M * K / 8; q += 128) {
      const int r = q / (K / 8), d = (q % (K / 8)) * 8;
      Cp::copy(*reinterpret_cast<const uint128_t*>(&ga[r * K + d]), *reinterpret_cast<uint128_t*>(sa + r * SA + d),
               r % 5 != 3);
    }
    for (int q = tid; q < N * K / 8; q += 128) {
      const int r = q / (K / 8), d = (q % (K / 8)) * 8;
      Cp::copy(*reinterpret_cast<const uint128_t*>(&gb[r * K + d]), *reinterpret_cast<uint128_t*>(sb + r * SA + d),
               true);
    }
    for (int q = tid; q < K * N / 8; q += 128) {
      const int r = q / (N / 8), d = (q % (N / 8)) * 8;
      Cp::copy(*reinterpret_cast<const uint128_t*>(&gv[r * N + d]), *reinterpret_cast<uint128_t*>(sv + r * SV + d),
               true);
    }
    apd::attn::atoms::cp_async_fence();
    apd::attn::atoms::cp_async_wait<0>();
    __syncthreads();

    auto tiled_mma = make_tiled_mma(typename Atoms::type{}, Layout<Shape<_4, _1, _1>>{}, Tile<_64, _16, _16>{});
    auto thr = tiled_mma.get_thread_slice(tid);
    Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<E*>(sa)), make_layout(Shape<_64, _32>{}, Stride<Int<SA>, _1>{}));
    Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<E*>(sb)), make_layout(Shape<_32, _32>{}, Stride<Int<SA>, _1>{}));
    Tensor sVt = make_tensor(make_smem_ptr(reinterpret_cast<E*>(sv)), make_layout(Shape<_32, _32>{}, Stride<_1, Int<SV>>{}));
    Tensor rA = thr.partition_fragment_A(sA);
    Tensor rB = thr.partition_fragment_B(sB);
    Tensor rVt = thr.partition_fragment_B(sVt);
    auto cpa = make_tiled_copy_A(Copy_Atom<apd::attn::atoms::LdsmN, E>{}, tiled_mma);
    auto cpb = make_tiled_copy_B(Copy_Atom<apd::attn::atoms::LdsmN, E>{}, tiled_mma);
    auto cpv = make_tiled_copy_B(Copy_Atom<apd::attn::atoms::LdsmT, E>{}, tiled_mma);
    copy(cpa, cpa.get_thread_slice(tid).partition_S(sA), cpa.get_thread_slice(tid).retile_D(rA));
    copy(cpb, cpb.get_thread_slice(tid).partition_S(sB), cpb.get_thread_slice(tid).retile_D(rB));
    copy(cpv, cpv.get_thread_slice(tid).partition_S(sVt), cpv.get_thread_slice(tid).retile_D(rVt));
    Tensor acc = partition_fragment_C(tiled_mma, Shape<_64, _32>{});
    Tensor acc2 = partition_fragment_C(tiled_mma, Shape<_64, _32>{});
    clear(acc);
    clear(acc2);
    gemm(tiled_mma, rA, rB, acc);
    gemm(tiled_mma, rA, rVt, acc2);
    Tensor coord = thr.partition_C(make_identity_tensor(Shape<_64, _32>{}));
    for (int i = 0; i < size(acc); ++i) {
      const int m = get<0>(coord(i)), n = get<1>(coord(i));
      c[m * N + n] = acc(i);
      c2[m * N + n] = acc2(i);
    }
  };
  const int e = apd_emu::launch(&tag, dim3(1), dim3(128), size_t(M * SA + N * SA + K * SV) * 2, body);
  CHECK(e == 0, "launch error %d", e);
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double s = 0, s2 = 0;
      for (int k = 0; k < K; ++k) {
        const double a = m % 5 == 3 ? 0.0 : val(m, k, 1);
        s += a * val(n, k, 2);
        s2 += a * val(k, n, 5);
      }
      CHECK(c[m * N + n] == float(s), "%s A B^T (%d, %d): %g, expected %g", sizeof(E) == 2 && std::is_same_v<T, apd::bf16_t> ? "bf16" : "fp16", m, n, c[m * N + n], s);
      CHECK(c2[m * N + n] == float(s2), "%s A V (%d, %d): %g, expected %g", std::is_same_v<T, apd::bf16_t> ? "bf16" : "fp16", m, n, c2[m * N + n], s2);
    }
}

}  // namespace

int main() {
  for (int s = 0; s < 3; ++s) {
    apd_emu::set_schedule(s, 7);
    test_gemm<apd::bf16_t>(s);
    test_gemm<apd::fp16_t>(s);
  }
  if (g_fail) return 1;
  std::printf("CUTE ATOMS OK\n");
  return 0;
}
