// TEST-ONLY twin of csrc/include/apd/cuda/cute_atoms.cuh (found first on the
// emulated build's include path): the same names, bound to emulated CuTe atoms.
// Each emulated op has the real op's register types and counts, and its
// MMA_Traits / Copy_Traits are the real atom's (inherited: same thread-value
// layouts, so CuTe partitions exactly as on the device); only the body that
// would be inline PTX runs apd_emu/ptx.h (the PTX ISA's fragment semantics).
//
// CuTe is included here before the emulated build defines __CUDACC__ /
// __CUDA_ARCH__ (kernels_attention_mma.cpp and fault_driver.cpp include this
// header first), so CuTe takes its host-compile path: CUTE_HOST_DEVICE is
// plain inline and no CUTE_ARCH_* macro is on. Its libcu++, vector-type,
// cuComplex and driver-type includes resolve to the shadows in tests/emu/include.
#pragma once
#if defined(__CUDACC__)
#error "tests/emu: include apd/cuda/cute_atoms.cuh before defining __CUDACC__ (CuTe must see a host compile)"
#endif
#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cute/tensor.hpp>

#include "apd_emu/ptx.h"

// Not apd/common.h: it must be first included with __CUDA_ARCH__ set (its
// device branches), after this header.
namespace apd {
struct bf16_t;
struct fp16_t;
}  // namespace apd

namespace apd_emu {
namespace cute_atoms {

template <bool BF16>
struct Mma16816 {
  using DRegisters = float[4];
  using ARegisters = uint32_t[4];
  using BRegisters = uint32_t[2];
  using CRegisters = float[4];
  static void fma(float& d0, float& d1, float& d2, float& d3, uint32_t const& a0, uint32_t const& a1,
                  uint32_t const& a2, uint32_t const& a3, uint32_t const& b0, uint32_t const& b1, float const& c0,
                  float const& c1, float const& c2, float const& c3) {
    float d[4] = {c0, c1, c2, c3};  // C may alias D
    const uint32_t a[4] = {a0, a1, a2, a3};
    mma_m16n8k16(d, a, b0, b1, BF16);
    d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
  }
};

template <bool Trans>
struct Ldsm4 {
  using SRegisters = cute::uint128_t[1];
  using DRegisters = uint32_t[4];
  static void copy(cute::uint128_t const& smem_src, uint32_t& dst0, uint32_t& dst1, uint32_t& dst2, uint32_t& dst3) {
    uint32_t r[4];
    ldmatrix(r, 4, Trans, shared_address(&smem_src));
    dst0 = r[0], dst1 = r[1], dst2 = r[2], dst3 = r[3];
  }
};

struct CpAsyncZfill {
  using SRegisters = cute::uint128_t[1];
  using DRegisters = cute::uint128_t[1];
  static void copy(cute::uint128_t const& gmem_src, cute::uint128_t& smem_dst, bool pred) {
    cp_async(shared_address(&smem_dst), &gmem_src, 16, pred ? 16 : 0);
  }
};

}  // namespace cute_atoms
}  // namespace apd_emu

namespace cute {
template <>
struct MMA_Traits<apd_emu::cute_atoms::Mma16816<true>> : MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN> {};
template <>
struct MMA_Traits<apd_emu::cute_atoms::Mma16816<false>> : MMA_Traits<SM80_16x8x16_F32F16F16F32_TN> {};
template <>
struct Copy_Traits<apd_emu::cute_atoms::Ldsm4<false>> : Copy_Traits<SM75_U32x4_LDSM_N> {};
template <>
struct Copy_Traits<apd_emu::cute_atoms::Ldsm4<true>> : Copy_Traits<SM75_U16x8_LDSM_T> {};

// As Copy_Traits<SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>> (copy_traits_sm80.hpp),
// which cannot be inherited: its with() and copy_unpack name the real op.
template <>
struct Copy_Traits<apd_emu::cute_atoms::CpAsyncZfill> {
  using ThrID = Layout<_1>;
  using SrcLayout = Layout<Shape<_1, Int<128>>>;
  using DstLayout = Layout<Shape<_1, Int<128>>>;
  using RefLayout = SrcLayout;
  bool pred = true;  // true = load, false = zero fill
  constexpr Copy_Traits<apd_emu::cute_atoms::CpAsyncZfill> with(bool p) const { return {p}; }
  template <class TS, class SLayout, class TD, class DLayout>
  friend constexpr void copy_unpack(Copy_Traits const& traits, Tensor<TS, SLayout> const& src,
                                    Tensor<TD, DLayout>& dst) {
    static_assert(is_gmem<TS>::value, "Expected gmem source for cp.async.");
    static_assert(is_smem<TD>::value, "Expected smem destination for cp.async.");
    Tensor rS = recast<uint128_t>(src);
    Tensor rD = recast<uint128_t>(dst);
    CUTE_STATIC_ASSERT_V(size(rS) == Int<1>{});
    CUTE_STATIC_ASSERT_V(size(rD) == Int<1>{});
    apd_emu::cute_atoms::CpAsyncZfill::copy(rS[0], rD[0], traits.pred);
  }
};
}  // namespace cute

namespace apd {
namespace attn {
namespace atoms {

template <typename T>
struct MmaFor;
template <>
struct MmaFor<bf16_t> {
  using type = apd_emu::cute_atoms::Mma16816<true>;
  using elem = cute::bfloat16_t;
};
template <>
struct MmaFor<fp16_t> {
  using type = apd_emu::cute_atoms::Mma16816<false>;
  using elem = cute::half_t;
};
template <typename T>
using Mma = typename MmaFor<T>::type;
template <typename T>
using Elem = typename MmaFor<T>::elem;

using LdsmN = apd_emu::cute_atoms::Ldsm4<false>;
using LdsmT = apd_emu::cute_atoms::Ldsm4<true>;
using CpAsync = apd_emu::cute_atoms::CpAsyncZfill;

inline void cp_async_fence() { apd_emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  apd_emu::cp_async_wait(N);
}

}  // namespace atoms
}  // namespace attn
}  // namespace apd
