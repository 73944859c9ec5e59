// window_attention, tensor-core kernel: bf16 / fp16 inputs, D in {64, 128},
// mma.sync.m16n8k16 with fp32 accumulation, written with CuTe (TiledMMA over
// the SM80 atom, TiledCopy over ldmatrix; the atoms are named in
// cute_atoms.cuh; runs on sm_80+, built for sm_90a). Selected with
// APD_ATTN_IMPL=mma (see ops_cuda_attention.cpp).
//
// Tiling (FlashAttention-2 structure, conventions in attention_common.cuh):
//  * grid = (CTAs per sequence and kv head, B * Hkv): the q tiles of an
//    unsplit sequence, (split, q tile) pairs of a split one (attention_common.cuh);
//    128 threads = 4 warps.
//  * A CTA owns block_m = 128 packed rows (positions x the G query heads of
//    one kv head), or 64 where the device's opt-in shared memory does not
//    hold 128 (below); warp w owns packed rows 16w + 64 mi .. + 15, mi < BM / 64
//    (TiledMMA: 4 x 1 warps of one m16n8k16 atom, repeated twice along M; N
//    tile 16 so one ldmatrix.x4 feeds two atoms). 32 rows per warp, as FA2:
//    every K / V byte a warp pulls from shared memory feeds 32 rows, and
//    every K / V byte pulled from L2 feeds 128 (64 before: 2x the L2 passes).
//  * Keys are walked in tiles of block_n = 64, double-buffered with cp.async
//    (tile t + 1 is in flight while tile t is computed).
//  * Shared memory, 16-bit, row stride D + 8 elements (the 16-byte skew makes
//    the 8 row addresses of every ldmatrix hit distinct banks):
//      Qs [BM][D + 8], Ks [2][64][D + 8], Vs [2][64][D + 8], + 16 B (a key mask)
//    = (BM + 256) (D + 8) 2 + 16 bytes: BM = 128: 104,464 B at D = 128 (over
//    the 101,376 B opt-in of sm_86 / sm_89), 55,312 B at D = 64; BM = 64:
//    87,056 B at D = 128 (the planner takes it only where 128 does not fit:
//    every K / V byte then feeds 64 rows, not 128, so 2x the L2 passes, and
//    one CTA per SM on sm_86 / sm_89, where 100 KB per SM holds one).
//  * Q: at D = 64 moved to registers once (A fragments, 32 registers per
//    thread) and reused by every key tile; at D = 128 it would take 64
//    registers on top of 128 (O) + 64 (S) accumulators, so it is re-read from
//    shared memory one k16 slice at a time (FA2's default; + 2 ldmatrix.x4
//    per 16 MMAs of S).
//  * Per warp and key tile: S (32 x 64) = Q K^T by 2 x D/16 x 8 mma's (B from
//    Ks with ldmatrix.x4: K rows are B's columns); online softmax on the S
//    accumulators (each thread holds 4 rows x 16 keys, a row's 4 owners
//    reduce with 2 xor-shuffles; the (row, key) of every element comes from
//    CuTe's identity-tensor partition); O (32 x D) += P V with P rounded to
//    16 bits in registers and re-viewed as A fragments (FA2 register reuse)
//    and V^T through ldmatrix.x4.trans. ldmatrix per mma: 0.25 at D = 64,
//    0.31 at D = 128 (0.5 with 16 rows per warp). Accumulators: 64 (S) + D
//    (O) fp32 registers.
//  * ptxas (sm_90a, nvcc 13.0) and the predicted time: bench/NOTES.md.
//  * Bytes moved per CTA: Q tile once; K and V of its key range once for all
//    G heads; out (or 16-bit partials + fp32 lse) once.
//  * NaN (docs/SEMANTICS.md): a NaN score (q or a visible key) is skipped
//    by the fmaxf of the running max and turns p, and through the mma the
//    row's sum and O, NaN; the epilogue treats a row with sum != 0 (NaN
//    included) as seen, so it comes out NaN; a NaN in a visible value
//    (some dims of O) is spread to the row by a quad vote. A masked key's score is -inf
//    before the max (p = 0), but p V would still add 0 * NaN for a non-finite
//    V row: so on a tile that some row of the CTA sees only in part (the
//    causal diagonal; CTA-uniform test, no cost elsewhere) the V rows of the
//    keys past the CTA's smallest limit are checked, a non-finite one zeroed
//    in shared memory, and the running sum of every row that does see it
//    set to NaN (the flag folded into the sum, no extra register).
// Every __syncthreads is outside warp-dependent branches; all loop bounds are
// uniform over the CTA.
#pragma once
#include "apd/cuda/attention_common.cuh"
#include "apd/cuda/cute_atoms.cuh"

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

// fp32 -> CuTe element, round to nearest even (P before P V).
APD_DEVICE cute::bfloat16_t to_elem(float x, cute::bfloat16_t) {
  return cute::bfloat16_t::bitcast(__bfloat16_as_ushort(__float2bfloat16_rn(x)));
}
APD_DEVICE cute::half_t to_elem(float x, cute::half_t) {
  return cute::half_t::bitcast(__half_as_ushort(__float2half_rn(x)));
}

template <typename T, int D, int BM>
struct MmaCfg {
  static constexpr int kWarps = 4;
  static constexpr int kBlockM = BM;  // 128: 32 rows per warp (two m16 atoms); 64: 16 (one)
  static constexpr int kBlockN = 64;
  static constexpr int kStride = D + 8;  // elements per smem row
  static constexpr int kTileQ = kBlockM * kStride;
  static constexpr int kTile = kBlockN * kStride;  // one K or V buffer
  // + the 64-bit mask of non-finite V rows of a partly visible tile (16 B).
  static constexpr size_t kSmemBytes = size_t(kTileQ + 4 * kTile) * 2 + 16;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  // Q fragments of 32 rows cost D registers per thread: kept across key tiles
  // at D = 64; at D = 128 they would add 64 to the 128 (O) + 64 (S) fp32
  // accumulators, over the 255 limit, so Q is re-read from shared memory one
  // k16 slice at a time, as FlashAttention-2 does.
  static constexpr bool kQInRegs = D <= 64;
  static_assert(D == 64 || D == 128, "mma kernel: D in {64, 128}");
  static_assert(BM == 64 || BM == 128, "mma kernel: block_m in {64, 128}");
  static_assert(kWarps * 32 == kMmaThreads && kBlockN == kMmaBlockN, "planner tile sizes");
  static_assert(kSmemBytes == mma_smem_bytes(D, BM), "planner smem size");

  using E = atoms::Elem<T>;
  // 4 warps along M, one m16n8k16 atom each, repeated twice over the 128-row
  // tile (warp w: rows 16w .. 16w + 15 and 64 + 16w .. 64 + 16w + 15); the N
  // tile of 16 lets one ldmatrix.x4 feed two atoms (B operand), as in FA2.
  using TiledMma = decltype(cute::make_tiled_mma(atoms::Mma<T>{}, cute::Layout<cute::Shape<cute::_4, cute::_1, cute::_1>>{},
                                                 cute::Tile<cute::Int<kWarps * 16>, cute::_16, cute::_16>{}));
  // Shared-memory views (padded rows; all static layouts).
  using LayoutQ = cute::Layout<cute::Shape<cute::Int<kBlockM>, cute::Int<D>>, cute::Stride<cute::Int<kStride>, cute::_1>>;
  using LayoutK = cute::Layout<cute::Shape<cute::Int<kBlockN>, cute::Int<D>>, cute::Stride<cute::Int<kStride>, cute::_1>>;
  // V^T: (dim, key) over V's key-major rows: the B operand of O += P V.
  using LayoutVt = cute::Layout<cute::Shape<cute::Int<D>, cute::Int<kBlockN>>, cute::Stride<cute::_1, cute::Int<kStride>>>;
  // gmem -> smem for K and V: 16-byte cp.async (zero fill) per thread, a row
  // of D / 8 threads, 128 / (D / 8) rows per pass over the 64-key tile.
  using GmemCopyKV = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<atoms::CpAsync, E>{},
      cute::Layout<cute::Shape<cute::Int<kWarps * 32 / kChunks>, cute::Int<kChunks>>, cute::Stride<cute::Int<kChunks>, cute::_1>>{},
      cute::Layout<cute::Shape<cute::_1, cute::_8>>{}));
};

// Accumulator layout ((2, 2), M, N) of m16n8k16 -> A-operand layout
// ((2, 2, 2), M, N / 2): two neighbouring n8 tiles of S are one k16 slice of P
// (FA2's register reuse: P never leaves the registers).
template <typename Layout>
APD_DEVICE auto acc_to_a_layout(Layout l) {
  using namespace cute;
  auto d = logical_divide(l, Shape<Underscore, Underscore, _2>{});  // ((2, 2), M, (2, N / 2))
  return make_layout(make_layout(get<0>(get<0>(d)), get<1>(get<0>(d)), get<0>(get<2>(d))), get<1>(d),
                     get<1>(get<2>(d)));
}

// Non-finite 16-bit value: all exponent bits set.
APD_DEVICE bool nonfinite16(uint16_t x, bf16_t) { return (x & 0x7f80u) == 0x7f80u; }
APD_DEVICE bool nonfinite16(uint16_t x, fp16_t) { return (x & 0x7c00u) == 0x7c00u; }

template <typename T, int D, int BLOCK_M>
__global__ void __launch_bounds__(128) window_attention_mma_kernel(const AttnArgs a) {
  using namespace cute;
  using Cfg = MmaCfg<T, D, BLOCK_M>;
  using E = typename Cfg::E;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, S = Cfg::kStride, CH = Cfg::kChunks;
  static_assert(BN % (Cfg::kWarps * 32 / CH) == 0, "K/V copy passes");
  constexpr int NT = Cfg::kWarps * 32;

  extern __shared__ __align__(16) uint16_t smem16[];
  uint16_t* Qs = smem16;                 // [BM][S]
  uint16_t* Ks = Qs + Cfg::kTileQ;       // [2][BN][S]
  uint16_t* Vs = Ks + 2 * Cfg::kTile;    // [2][BN][S]
  uint32_t* vbad = reinterpret_cast<uint32_t*>(Vs + 2 * Cfg::kTile);  // [2]: keys 0-31, 32-63

  const int tid = threadIdx.x;
  const int b = int(blockIdx.y / a.Hkv), kvh = int(blockIdx.y % a.Hkv);
  const int G = a.G;
  const int64_t npacked = int64_t(a.Lq) * G;
  const SeqInfo s = load_seq(a, b);
  CtaWork w;
  if (!cta_work(a, s, int(blockIdx.x), w)) return;  // past this sequence's CTAs (CTA-uniform)
  const int64_t row0 = w.row0;

  int kb, ke;
  cta_key_range(a, s, w, BM, kb, ke);
  const int ntiles = ke > kb ? (ke - kb + BN - 1) / BN : 0;
  // Smallest key limit of the CTA's valid rows (CTA-uniform): limits grow
  // with the position, so it is the first row's (causal); ke otherwise.
  int lo_lim = ke;
  if (a.causal && row0 / G < s.q_len) {
    lo_lim = key_limit(a, s, int(row0 / G));
    if (lo_lim > ke) lo_lim = ke;
  }

  const T* qg = static_cast<const T*>(a.q);
  const T* kg = static_cast<const T*>(a.k);
  const T* vg = static_cast<const T*>(a.v);

  // gmem -> smem for Q: one cp.async atom per 16-byte chunk, addressed by
  // hand: packed Q rows (position r / G, head r % G) are not an affine layout.
  auto chunk = [](uint16_t* dst, const T* src, bool ok) {
    atoms::CpAsync::copy(*reinterpret_cast<const uint128_t*>(src), *reinterpret_cast<uint128_t*>(dst), ok);
  };
  // K and V tiles are (key, dim) with strides (k_sl, 1): a TiledCopy of the
  // same atom, predicated per key row (keys >= ke are zero-filled; their
  // source is redirected to the tile's first key, which is always < ke).
  typename Cfg::GmemCopyKV gmem_copy;
  auto thr_gmem = gmem_copy.get_thread_slice(tid);
  Tensor tKVc = thr_gmem.partition_S(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));  // (CPY, rows, 1): (key, dim)
  auto load_tile = [&](const T* base, int64_t sl, uint16_t* dst, int kt) {
    Tensor g = make_tensor(make_gmem_ptr(reinterpret_cast<const E*>(base + int64_t(kt) * sl)),
                           make_layout(Shape<Int<BN>, Int<D>>{}, make_stride(sl, _1{})));
    Tensor sm = make_tensor(make_smem_ptr(reinterpret_cast<E*>(dst)), typename Cfg::LayoutK{});
    Tensor src = thr_gmem.partition_S(g);
    Tensor dsm = thr_gmem.partition_D(sm);
#pragma unroll
    for (int r = 0; r < size<1>(dsm); ++r) {
      const bool ok = kt + get<0>(tKVc(0, r, 0)) < ke;
#pragma unroll
      for (int c = 0; c < size<2>(dsm); ++c) copy(gmem_copy.with(ok), src(_, ok ? r : 0, c), dsm(_, r, c));
    }
  };
  const T* kbase = kg + int64_t(b) * a.k_sb + int64_t(kvh) * a.k_sh;
  const T* vbase = vg + int64_t(b) * a.v_sb + int64_t(kvh) * a.v_sh;
  auto load_kv = [&](int kt, int buf) {
    load_tile(kbase, a.k_sl, Ks + buf * Cfg::kTile, kt);
    load_tile(vbase, a.v_sl, Vs + buf * Cfg::kTile, kt);
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
      chunk(Qs + r * S + d0, src, ok);
    }
    load_kv(kb, 0);
  }
  atoms::cp_async_fence();

  // MMA partitions of this thread (CuTe: warp w owns packed rows 16w + 64 mi .. + 15, mi = 0, 1).
  typename Cfg::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<E*>(Qs)), typename Cfg::LayoutQ{});
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);  // ((2,2,2), MI, D/16): Q as A fragments
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<BM>, Int<D>>{});  // ((2,2), MI, D/8) fp32
  clear(acc_o);
  constexpr int MI = decltype(size<1>(acc_o))::value;  // m16 atoms per warp (2)

  auto copy_q = make_tiled_copy_A(Copy_Atom<atoms::LdsmN, E>{}, tiled_mma);
  auto copy_k = make_tiled_copy_B(Copy_Atom<atoms::LdsmN, E>{}, tiled_mma);
  auto copy_v = make_tiled_copy_B(Copy_Atom<atoms::LdsmT, E>{}, tiled_mma);
  auto thr_copy_q = copy_q.get_thread_slice(tid);
  Tensor tSsQ = thr_copy_q.partition_S(sQ);
  Tensor tSrQ_v = thr_copy_q.retile_D(tSrQ);
  auto thr_copy_k = copy_k.get_thread_slice(tid);
  auto thr_copy_v = copy_v.get_thread_slice(tid);

  // (row, key) and (row, dim) coordinates of this thread's accumulator elements.
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));  // ((2,2), MI, BN/8)
  Tensor tOcO = thr_mma.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));   // ((2,2), MI, D/8)

  // This thread's 2 MI rows: accumulator elements (0, 1) (h = 0) and (2, 3)
  // (h = 1) of atom mi.
  int lim[MI][2];
  bool any_row = false;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t prow = row0 + get<0>(tScS(2 * h, mi, 0));
      const int64_t pos = prow / G;
      int l = (prow < npacked && pos < s.q_len) ? key_limit(a, s, int(pos)) : 0;
      if (l > ke) l = ke;
      lim[mi][h] = l;
      any_row |= l > kb;
    }
  }
  // Warp-uniform: does any of the warp's 32 rows see a key of this CTA's range?
  const bool warp_active = __any_sync(0xffffffffu, any_row);

  float m[MI][2], lsum[MI][2];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
    m[mi][0] = m[mi][1] = -INFINITY;
    lsum[mi][0] = lsum[mi][1] = 0.f;
  }

  for (int t = 0; t < ntiles; ++t) {
    const int kt = kb + t * BN;
    const int buf = t & 1;
    if (t + 1 < ntiles) {
      load_kv(kt + BN, buf ^ 1);  // that buffer was released by the barrier ending tile t - 1
      atoms::cp_async_fence();
      atoms::cp_async_wait<1>();
    } else {
      atoms::cp_async_wait<0>();
    }
    __syncthreads();

    // A tile that some valid row sees only in part (CTA-uniform): keys
    // [lo_lim, tile end) are masked for some rows. Their V rows are checked
    // (warps 0-1, one key per thread); a non-finite one is zeroed, so that
    // the 0 * v of the rows that do not see it stays 0, and flagged for the
    // rows that do see it.
    const int tile_end = kt + BN < ke ? kt + BN : ke;
    if (lo_lim < tile_end) {
      uint16_t* vt = Vs + buf * Cfg::kTile;
      if (tid < BN) {
        bool bad = false;
        if (kt + tid >= lo_lim && kt + tid < tile_end) {
          for (int d = 0; d < D; ++d) bad |= nonfinite16(vt[tid * S + d], T{});
          if (bad)
            for (int d = 0; d < D; ++d) vt[tid * S + d] = 0;
        }
        const uint32_t mask = __ballot_sync(0xffffffffu, bad);
        if (tid % 32 == 0) vbad[tid / 32] = mask;
      }
      __syncthreads();
      const uint64_t bad = uint64_t(vbad[0]) | (uint64_t(vbad[1]) << 32);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // The flag is folded into the running sum: NaN stays NaN through
          // the later rescales, and the epilogue makes the row NaN.
          const int nvis = lim[mi][h] - kt;  // keys of this tile the row sees
          if (nvis > 0 && (bad & (nvis >= 64 ? ~uint64_t(0) : (uint64_t(1) << nvis) - 1)) != 0)
            lsum[mi][h] = __uint_as_float(0x7fc00000u);
        }
      }
    }

    if (Cfg::kQInRegs && t == 0) {
      // Q to registers once (the Q tile landed with the first K/V group).
      copy(copy_q, tSsQ, tSrQ_v);
    }

    if (warp_active) {
      Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<E*>(Ks + buf * Cfg::kTile)), typename Cfg::LayoutK{});
      Tensor sVt = make_tensor(make_smem_ptr(reinterpret_cast<E*>(Vs + buf * Cfg::kTile)), typename Cfg::LayoutVt{});

      // S = Q K^T (32 x 64 per warp); K (and at D = 128 Q) through
      // ldmatrix.x4, one k16 slice at a time.
      Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<BM>, Int<BN>>{});  // ((2,2), MI, BN/8)
      clear(acc_s);
      Tensor tSrK = thr_mma.partition_fragment_B(sK);  // ((2,2), BN/8, D/16)
      Tensor tSsK = thr_copy_k.partition_S(sK);
      Tensor tSrK_v = thr_copy_k.retile_D(tSrK);
#pragma unroll
      for (int kk = 0; kk < size<2>(tSrK); ++kk) {
        if (!Cfg::kQInRegs) copy(copy_q, tSsQ(_, _, kk), tSrQ_v(_, _, kk));
        copy(copy_k, tSsK(_, _, kk), tSrK_v(_, _, kk));
        gemm(tiled_mma, tSrQ(_, _, kk), tSrK(_, _, kk), acc_s);
      }

      // Online softmax (base 2) on the accumulators: element (e + 2 h, mi, nt)
      // is row (mi, h)'s key kt + get<1>(tScS(e + 2 h, mi, nt)).
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < size<2>(acc_s); ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int key = kt + get<1>(tScS(2 * h + e, mi, nt));
              const float x = key < lim[mi][h] ? acc_s(2 * h + e, mi, nt) * a.scale_log2 : -INFINITY;
              acc_s(2 * h + e, mi, nt) = x;
              mx = fmaxf(mx, x);
            }
          }
          // A row's scores are spread over the 4 lanes of a quad.
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float mnew = fmaxf(m[mi][h], mx);
          const float mref = mnew == -INFINITY ? 0.f : mnew;
          const float alpha = exp2f(m[mi][h] - mref);
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < size<2>(acc_s); ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float p = exp2f(acc_s(2 * h + e, mi, nt) - mref);
              acc_s(2 * h + e, mi, nt) = p;
              sum += p;
            }
          }
          lsum[mi][h] = lsum[mi][h] * alpha + sum;
          m[mi][h] = mnew;
#pragma unroll
          for (int nt = 0; nt < size<2>(acc_o); ++nt) {
            acc_o(2 * h, mi, nt) *= alpha;
            acc_o(2 * h + 1, mi, nt) *= alpha;
          }
        }
      }

      // O += P V: P rounded to T in registers, re-viewed as A fragments; V^T
      // through ldmatrix.x4.trans, one k16 slice (16 keys) at a time.
      Tensor rP = make_tensor<E>(acc_s.layout());
#pragma unroll
      for (int i = 0; i < size(acc_s); ++i) rP(i) = to_elem(acc_s(i), E{});
      Tensor tOrP = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));  // ((2,2,2), MI, BN/16)
      Tensor tOrVt = thr_mma.partition_fragment_B(sVt);  // ((2,2), D/8, BN/16)
      Tensor tOsVt = thr_copy_v.partition_S(sVt);
      Tensor tOrVt_v = thr_copy_v.retile_D(tOrVt);
#pragma unroll
      for (int j = 0; j < size<2>(tOrVt); ++j) {
        copy(copy_v, tOsVt(_, _, j), tOrVt_v(_, _, j));
        gemm(tiled_mma, tOrP(_, _, j), tOrVt(_, _, j), acc_o);
      }
    }
    __syncthreads();  // buffer `buf` may be overwritten by the next prefetch
  }

  // Epilogue: elements (2 h, mi, nt), (2 h + 1, mi, nt) are two neighbouring
  // dims of row (mi, h).
#pragma unroll
  for (int mh = 0; mh < 2 * MI; ++mh) {
    const int mi = mh / 2, h = mh % 2;
    float l = lsum[mi][h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    // A NaN in a visible value reaches only some dims of O: spread it to the
    // row (its dims are held by the 4 lanes of a quad; all lanes shuffle).
    int nan_row = 0;
#pragma unroll
    for (int nt = 0; nt < size<2>(acc_o); ++nt) {
      const float x0 = acc_o(2 * h, mi, nt), x1 = acc_o(2 * h + 1, mi, nt);
      nan_row |= int(x0 != x0) | int(x1 != x1);  // NaN
    }
    nan_row |= __shfl_xor_sync(0xffffffffu, nan_row, 1);
    nan_row |= __shfl_xor_sync(0xffffffffu, nan_row, 2);
    const int64_t prow = row0 + get<0>(tOcO(2 * h, mi, 0));
    if (prow >= npacked) continue;
    const int64_t pos = prow / G;
    const int hq = kvh * G + int(prow % G);
    const bool valid = pos < s.q_len;
    const bool seen = valid && l != 0.f;  // NaN: seen, and the row comes out NaN
    const float inv = nan_row ? __uint_as_float(0x7fc00000u) : (seen ? 1.f / l : 0.f);
    if (w.nsplit == 1) {
      T* o = static_cast<T*>(a.out) + ((int64_t(b) * a.Lq + pos) * a.Hq + hq) * D;
#pragma unroll
      for (int nt = 0; nt < size<2>(acc_o); ++nt) {
        const float x0 = seen ? acc_o(2 * h, mi, nt) * inv : 0.f;
        const float x1 = seen ? acc_o(2 * h + 1, mi, nt) * inv : 0.f;
        *reinterpret_cast<uint32_t*>(o + get<1>(tOcO(2 * h, mi, nt))) = pack2(x0, x1, T{});
      }
    } else if (valid) {
      const int64_t idx = ws_row(a, b, kvh, w.slot, int(prow - row0));
      T* o = static_cast<T*>(a.ws_o) + idx * D;
#pragma unroll
      for (int nt = 0; nt < size<2>(acc_o); ++nt) {
        const float x0 = seen ? acc_o(2 * h, mi, nt) * inv : 0.f;
        const float x1 = seen ? acc_o(2 * h + 1, mi, nt) * inv : 0.f;
        *reinterpret_cast<uint32_t*>(o + get<1>(tOcO(2 * h, mi, nt))) = pack2(x0, x1, T{});
      }
      if (tid % 4 == 0) a.ws_lse[idx] = seen ? m[mi][h] + log2f(l) : -INFINITY;
    }
  }
}

template <typename T, int D, int BM>
cudaError_t launch_mma(const AttnArgs& a, int64_t grid_x, cudaStream_t stream) {
  using Cfg = MmaCfg<T, D, BM>;
  return launch_tiled(window_attention_mma_kernel<T, D, BM>, a, grid_x, Cfg::kWarps * 32, Cfg::kSmemBytes, stream);
}

}  // namespace attn
}  // namespace apd
