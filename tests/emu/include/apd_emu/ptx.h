// TEST-ONLY. Lane-by-lane emulation of the inline PTX the kernels use, from
// the PTX ISA's fragment layouts (PTX ISA 8.x, "Matrix fragments for
// mma.m16n8k16 with floating point type" and "ldmatrix"):
//   * ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16: a warp
//     collective (all 32 lanes). Lanes 8i..8i+7 give the row addresses of
//     matrix i (16 bytes each, 16-byte aligned); lane l receives, per matrix,
//     the 32-bit pair (row l/4, columns 2(l%4), 2(l%4)+1), low half first;
//     .trans gives the transposed matrix's pair.
//   * mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: a warp
//     collective that gathers the 32 lanes' fragments. groupID g = lane/4,
//     t = lane%4; A regs a0..a3 hold (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..),
//     (g+8, 2t+8..); B regs b0, b1 hold rows (2t, 2t+1) and (2t+8, 2t+9) of
//     column g; C/D c0..c3 are (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
//     The 16 products are summed exactly (fp64) onto C and rounded once.
//   * cp.async.cg.shared.global 16 with commit_group / wait_group N: the source
//     is read at issue, but the bytes land in shared memory only when the
//     issuing thread waits for their group, so a missing wait reads stale data.
#pragma once
#include "apd_emu/emu.h"
#include "apd_emu/half.h"

namespace apd_emu {

inline void cp_async(uint32_t dst, const void* src, int cp_size, int src_bytes) {
  if (cp_size != 16) fail("cp.async: only the 16-byte .cg form is emulated");
  if (src_bytes < 0 || src_bytes > cp_size) fail("cp.async: src-size must be in [0, cp-size]");
  if (dst % 16 != 0 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0))
    fail("cp.async: 16-byte copies need 16-byte aligned addresses");
  CpAsyncCopy c;
  c.dst = shared_pointer(dst, 16);
  std::memset(c.data, 0, sizeof c.data);
  if (src_bytes > 0) std::memcpy(c.data, src, size_t(src_bytes));
  g_fiber->cp_open.push_back(c);
}

inline void cp_async_commit() {
  Fiber* f = g_fiber;
  f->cp_groups.push_back(std::move(f->cp_open));
  f->cp_open.clear();
}

inline void cp_async_wait(int n) {
  Fiber* f = g_fiber;
  while (int(f->cp_groups.size()) > n) {
    for (const CpAsyncCopy& c : f->cp_groups.front()) std::memcpy(c.dst, c.data, 16);
    f->cp_groups.erase(f->cp_groups.begin());
  }
}

// r[0..nmat) as ldmatrix .x1 / .x2 / .x4 (nmat = 1, 2, 4).
template <int N>
inline void ldmatrix(uint32_t (&r)[N], int nmat, bool trans, uint32_t addr) {
  static_assert(N >= 1 && N <= 4, "ldmatrix destinations");
  if (nmat != 1 && nmat != 2 && nmat != 4) fail("ldmatrix: .x1, .x2 or .x4");
  collective(Op::kLdmatrix, 0xffffffffu, &addr, 1);
  const Fiber* f = g_fiber;
  const int lane = f->lane;
  const int row = lane / 4, col = 2 * (lane % 4);
  for (int i = 0; i < nmat && i < N; ++i) {
    uint16_t h[2];
    for (int e = 0; e < 2; ++e) {
      // Element (row, col + e) of matrix i, or of its transpose.
      const int src_row = trans ? col + e : row;
      const int src_col = trans ? row : col + e;
      const uint32_t a = f->got[8 * i + src_row][0];
      if (a % 16 != 0) fail("ldmatrix: row addresses must be 16-byte aligned");
      std::memcpy(&h[e], shared_pointer(a, 16) + 2 * src_col, 2);
    }
    r[i] = uint32_t(h[0]) | (uint32_t(h[1]) << 16);
  }
}

inline float half_bits_to_float(uint32_t bits16, bool bf16) {
  return bf16 ? __bfloat162float(__ushort_as_bfloat16(uint16_t(bits16))) : __half2float(__ushort_as_half(uint16_t(bits16)));
}

inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  const uint32_t w[6] = {a[0], a[1], a[2], a[3], b0, b1};
  collective(Op::kMma, 0xffffffffu, w, 6);
  const Fiber* f = g_fiber;
  // A[r][k]: lane (r % 8) * 4 + (k % 8) / 2, register (r >= 8) + 2 (k >= 8), half k % 2.
  const auto A = [&](int r, int k) {
    const uint32_t reg = f->got[(r % 8) * 4 + (k % 8) / 2][(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
    return half_bits_to_float((reg >> (16 * (k % 2))) & 0xffffu, bf16);
  };
  // B[k][n]: lane n * 4 + (k % 8) / 2, register b0 (k < 8) or b1, half k % 2.
  const auto B = [&](int k, int n) {
    const uint32_t reg = f->got[n * 4 + (k % 8) / 2][4 + (k >= 8 ? 1 : 0)];
    return half_bits_to_float((reg >> (16 * (k % 2))) & 0xffffu, bf16);
  };
  const int g = f->lane / 4, t = f->lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i >= 2 ? 8 : 0), n = 2 * t + (i & 1);
    double s = double(d[i]);
    for (int k = 0; k < 16; ++k) s += double(A(r, k)) * double(B(k, n));
    d[i] = float(s);
  }
}

}  // namespace apd_emu
