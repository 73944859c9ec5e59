// window_attention, tensor-core kernel: bf16 / fp16 inputs, D in {64, 128},
// mma.sync.m16n8k16 with fp32 accumulation (hand-written PTX; runs on sm_80+,
// built for sm_90a). Selected with APD_ATTN_IMPL=mma (see ops_cuda_attention.cpp).
//
// Tiling (FlashAttention-2 structure, conventions in attention_common.cuh):
//  * grid = (q_tiles, B * Hkv, num_splits); 128 threads = 4 warps.
//  * A CTA owns block_m = 64 packed rows (positions x the G query heads of one
//    kv head); warp w owns packed rows 16w .. 16w + 15 (one m16 tile).
//  * Keys are walked in tiles of block_n = 64, double-buffered with cp.async
//    (tile t + 1 is in flight while tile t is computed).
//  * Shared memory, 16-bit, row stride D + 8 elements (the 16-byte skew makes
//    the 8 row addresses of every ldmatrix hit distinct banks):
//      Qs [64][D + 8], Ks [2][64][D + 8], Vs [2][64][D + 8]
//    = 5 * 64 * (D + 8) * 2 bytes: 87 KB at D = 128, 46 KB at D = 64.
//  * Per warp and key tile: S (16 x 64) = Q K^T by D/16 x 8 mma's (A from Qs
//    with ldmatrix.x4, B from Ks with ldmatrix.x4: K rows are B's columns);
//    online softmax on the S fragments (each thread holds 2 rows x 16 keys,
//    a row's 4 owners reduce with 2 xor-shuffles); O (16 x D) += P V with P
//    re-packed from the S accumulators as A fragments (FA2 register reuse)
//    and V through ldmatrix.x4.trans. Accumulators: 32 (S) + D/2 (O) fp32
//    registers per thread.
//  * Bytes moved per CTA: Q tile once; K and V of its key range once for all
//    G heads; out (or fp32 partials + lse) once.
// Every __syncthreads is outside warp-dependent branches; all loop bounds are
// uniform over the CTA.
#pragma once
#include "apd/cuda/attention_common.cuh"
#include "apd/cuda/ptx.cuh"

namespace apd {
namespace attn {

// Two fp32 -> one 32-bit register of 16-bit values, `lo` in the low half.
APD_DEVICE uint32_t pack2(float lo, float hi, bf16_t) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
APD_DEVICE uint32_t pack2(float lo, float hi, fp16_t) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <int D>
struct MmaCfg {
  static constexpr int kWarps = 4;
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 64;
  static constexpr int kStride = D + 8;  // elements per smem row
  static constexpr int kTile = 64 * kStride;
  static constexpr size_t kSmemBytes = size_t(5) * kTile * 2;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert(D == 64 || D == 128, "mma kernel: D in {64, 128}");
  static_assert(kBlockM == kMmaBlockM && kBlockN == kMmaBlockN, "planner tile sizes");
};

template <typename T, int D>
__global__ void __launch_bounds__(128) window_attention_mma_kernel(const AttnArgs a) {
  using Cfg = MmaCfg<D>;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, S = Cfg::kStride, CH = Cfg::kChunks;
  constexpr int NT = Cfg::kWarps * 32;
  constexpr int NS = BN / 8;  // S n-tiles per warp
  constexpr int NO = D / 8;   // O n-tiles per warp

  extern __shared__ __align__(16) uint16_t smem16[];
  uint16_t* Qs = smem16;                 // [BM][S]
  uint16_t* Ks = Qs + Cfg::kTile;        // [2][BN][S]
  uint16_t* Vs = Ks + 2 * Cfg::kTile;    // [2][BN][S]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t row0 = int64_t(blockIdx.x) * BM;
  const int b = int(blockIdx.y / a.Hkv), kvh = int(blockIdx.y % a.Hkv);
  const int split = int(blockIdx.z);
  const int G = a.G;
  const int64_t npacked = int64_t(a.Lq) * G;
  const SeqInfo s = load_seq(a, b);

  int kb, ke;
  cta_key_range(a, s, row0, BM, split, kb, ke);
  const int ntiles = ke > kb ? (ke - kb + BN - 1) / BN : 0;

  const T* qg = static_cast<const T*>(a.q);
  const T* kg = static_cast<const T*>(a.k);
  const T* vg = static_cast<const T*>(a.v);

  // Async load of one K/V tile into buffer `buf`; keys >= ke are zero-filled.
  auto load_kv = [&](int kt, int buf) {
    uint16_t* kd = Ks + buf * Cfg::kTile;
    uint16_t* vd = Vs + buf * Cfg::kTile;
    for (int c = tid; c < BN * CH; c += NT) {
      const int j = c / CH, d0 = (c % CH) * 8;
      const int key = kt + j;
      const bool ok = key < ke;
      const T* ks = ok ? kg + int64_t(b) * a.k_sb + int64_t(key) * a.k_sl + int64_t(kvh) * a.k_sh + d0 : kg;
      const T* vs = ok ? vg + int64_t(b) * a.v_sb + int64_t(key) * a.v_sl + int64_t(kvh) * a.v_sh + d0 : vg;
      cp_async_16(smem_u32(kd + j * S + d0), ks, ok ? 16 : 0);
      cp_async_16(smem_u32(vd + j * S + d0), vs, ok ? 16 : 0);
    }
  };

  if (ntiles > 0) {
    // Q tile (zeros for padding rows), then the first K/V tile: one group.
    for (int c = tid; c < BM * CH; c += NT) {
      const int r = c / CH, d0 = (c % CH) * 8;
      const int64_t prow = row0 + r;
      const int64_t pos = prow / G;
      const bool ok = prow < npacked && pos < s.q_len;
      const T* src = qg;
      if (ok) {
        const int hq = kvh * G + int(prow % G);
        src = qg + int64_t(b) * a.q_sb + pos * a.q_sl + int64_t(hq) * a.q_sh + d0;
      }
      cp_async_16(smem_u32(Qs + r * S + d0), src, ok ? 16 : 0);
    }
    load_kv(kb, 0);
  }
  cp_async_commit();

  // This thread's two rows: lane / 4 and lane / 4 + 8 of the warp's m16 tile.
  int lim[2];
  bool warp_active = false;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t prow = row0 + warp * 16 + lane / 4 + 8 * h;
    const int64_t pos = prow / G;
    lim[h] = (prow < npacked && pos < s.q_len) ? key_limit(a, s, int(pos)) : 0;
    if (lim[h] > ke) lim[h] = ke;
  }
  // Warp-uniform: does any of the warp's 16 rows see a key of this CTA's range?
  warp_active = __any_sync(0xffffffffu, lim[0] > kb || lim[1] > kb);

  float m[2] = {-INFINITY, -INFINITY}, lsum[2] = {0.f, 0.f};
  float oacc[NO][4];
#pragma unroll
  for (int i = 0; i < NO; ++i) oacc[i][0] = oacc[i][1] = oacc[i][2] = oacc[i][3] = 0.f;

  for (int t = 0; t < ntiles; ++t) {
    const int kt = kb + t * BN;
    const int buf = t & 1;
    if (t + 1 < ntiles) {
      load_kv(kt + BN, buf ^ 1);  // that buffer was released by the barrier ending tile t - 1
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    if (warp_active) {
      const uint16_t* kbuf = Ks + buf * Cfg::kTile;
      const uint16_t* vbuf = Vs + buf * Cfg::kTile;

      // S = Q K^T (16 x 64 per warp).
      float sacc[NS][4];
#pragma unroll
      for (int i = 0; i < NS; ++i) sacc[i][0] = sacc[i][1] = sacc[i][2] = sacc[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t qa[4];
        ldmatrix_x4(qa, smem_u32(Qs + (warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * S + kk * 16 +
                                 (lane / 16) * 8));
#pragma unroll
        for (int np = 0; np < NS / 2; ++np) {
          uint32_t kf[4];
          ldmatrix_x4(kf, smem_u32(kbuf + (np * 16 + (lane % 8) + (lane / 16) * 8) * S + kk * 16 +
                                   ((lane / 8) % 2) * 8));
          mma_16816(sacc[2 * np], qa, kf[0], kf[1], T{});
          mma_16816(sacc[2 * np + 1], qa, kf[2], kf[3], T{});
        }
      }

      // Online softmax (base 2). Element (nt, c) is row lane/4 + 8*(c/2),
      // key kt + 8*nt + 2*(lane%4) + c%2.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = kt + nt * 8 + (lane % 4) * 2 + e;
            const float x = key < lim[h] ? sacc[nt][2 * h + e] * a.scale_log2 : -INFINITY;
            sacc[nt][2 * h + e] = x;
            mx = fmaxf(mx, x);
          }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mnew = fmaxf(m[h], mx);
        const float mref = mnew == -INFINITY ? 0.f : mnew;
        const float alpha = exp2f(m[h] - mref);
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = exp2f(sacc[nt][2 * h + e] - mref);
            sacc[nt][2 * h + e] = p;
            sum += p;
          }
        }
        lsum[h] = lsum[h] * alpha + sum;
        m[h] = mnew;
#pragma unroll
        for (int i = 0; i < NO; ++i) {
          oacc[i][2 * h] *= alpha;
          oacc[i][2 * h + 1] *= alpha;
        }
      }

      // O += P V: k-step j covers keys 16j .. 16j + 15 of the tile.
#pragma unroll
      for (int j = 0; j < BN / 16; ++j) {
        const uint32_t pa[4] = {pack2(sacc[2 * j][0], sacc[2 * j][1], T{}),
                                pack2(sacc[2 * j][2], sacc[2 * j][3], T{}),
                                pack2(sacc[2 * j + 1][0], sacc[2 * j + 1][1], T{}),
                                pack2(sacc[2 * j + 1][2], sacc[2 * j + 1][3], T{})};
#pragma unroll
        for (int dp = 0; dp < NO / 2; ++dp) {
          uint32_t vf[4];
          ldmatrix_x4_trans(vf, smem_u32(vbuf + (j * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * S + dp * 16 +
                                         (lane / 16) * 8));
          mma_16816(oacc[2 * dp], pa, vf[0], vf[1], T{});
          mma_16816(oacc[2 * dp + 1], pa, vf[2], vf[3], T{});
        }
      }
    }
    __syncthreads();  // buffer `buf` may be overwritten by the next prefetch
  }

  // Epilogue: thread owns dims 8 nt + 2 (lane % 4) + {0, 1} of its two rows.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = lsum[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int64_t prow = row0 + warp * 16 + lane / 4 + 8 * h;
    if (prow >= npacked) continue;
    const int64_t pos = prow / G;
    const int hq = kvh * G + int(prow % G);
    const bool valid = pos < s.q_len;
    const bool seen = valid && l > 0.f;
    const float inv = seen ? 1.f / l : 0.f;
    const int dl = (lane % 4) * 2;
    if (a.num_splits == 1) {
      T* o = static_cast<T*>(a.out) + ((int64_t(b) * a.Lq + pos) * a.Hq + hq) * D;
#pragma unroll
      for (int nt = 0; nt < NO; ++nt) {
        const float x0 = seen ? oacc[nt][2 * h] * inv : 0.f;
        const float x1 = seen ? oacc[nt][2 * h + 1] * inv : 0.f;
        *reinterpret_cast<uint32_t*>(o + nt * 8 + dl) = pack2(x0, x1, T{});
      }
    } else if (valid) {
      const int64_t idx = ((int64_t(split) * a.B + b) * a.Lq + pos) * a.Hq + hq;
      float* o = a.ws_o + idx * D;
#pragma unroll
      for (int nt = 0; nt < NO; ++nt) {
        const float x0 = seen ? oacc[nt][2 * h] * inv : 0.f;
        const float x1 = seen ? oacc[nt][2 * h + 1] * inv : 0.f;
        *reinterpret_cast<float2*>(o + nt * 8 + dl) = make_float2(x0, x1);
      }
      if (lane % 4 == 0) a.ws_lse[idx] = seen ? m[h] + log2f(l) : -INFINITY;
    }
  }
}

template <typename T, int D>
cudaError_t launch_mma(const AttnArgs& a, int64_t q_tiles, cudaStream_t stream) {
  using Cfg = MmaCfg<D>;
  return launch_tiled(window_attention_mma_kernel<T, D>, a, q_tiles, Cfg::kWarps * 32, Cfg::kSmemBytes, stream);
}

}  // namespace attn
}  // namespace apd
