#!/usr/bin/env python3
"""Predicted time of window_attention (mma kernel) and of FA2 through SDPA at
the bench_attention.py shapes, from tile counts and bytes: a model for the
device-less sessions (bench/NOTES.md), not a measurement.

    python bench/attn_model.py [--markdown out.md]

Per kernel configuration it counts the CTAs (q tiles x kv heads x splits, the
planner's split rule), the waves at two CTAs per SM, and per SM the MMA
FLOPs, the shared-memory bytes (ldmatrix reads of K, V and, when Q is not
held in registers, Q per warp and key tile; cp.async writes) and, over the
whole GPU, the K / V bytes pulled from L2 (one pass per q tile) and the split
partials (written, then read by the combine). Time = max(MMA, smem, L2) per
wave + the combine. Rates (assumed, H200): mma.sync at 3.8 TFLOP/s per SM
(~60 % of the wgmma peak), shared memory 128 B/clk at 1.98 GHz = 253 GB/s per
SM, L2 -> SMs 5.5 TB/s, HBM 4.3 TB/s, 2 us per extra launch (the combine).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import emit_table  # noqa: E402

SMS, SLOTS = 132, 2  # SMs, CTAs per SM (both configurations: smem and registers)
MMA_FLOPS_SM, SMEM_BPS_SM, L2_BPS, HBM_BPS, LAUNCH_S = 3.8e12, 253e9, 5.5e12, 4.3e12, 2e-6
BN = 64  # keys per tile

# name -> (rows per CTA, warps, Q re-read from smem per key tile, GQA-packed rows)
CONFIGS = {
    "mma before (64 rows, 16 / warp)": (64, 4, False, True),
    "mma after (128 rows, 32 / warp)": (128, 4, None, True),  # None: Q from smem at D = 128 only
    "FA2 via SDPA (128 rows, 32 / warp)": (128, 4, True, False),
}


def splits(ctas: int, kv: int, after: bool) -> int:
    """The planner's rule (csrc/cuda/attention_launch.cu) before and after this change (rounded
    down to one wave, >= 128 keys per split instead of 256). FA2's own heuristic also avoids a
    partial wave: it is modelled with the new rule."""
    if ctas >= SMS:
        return 1
    want = SLOTS * SMS // ctas if after else math.ceil(SLOTS * SMS / ctas)
    want = min(want, math.ceil(kv / (128 if after else 256)), 64)
    tiles = math.ceil(kv / BN)
    per = math.ceil(tiles / want)
    return math.ceil(tiles / per)


def predict(cfg: str, B: int, Lq: int, kv: int, Hq: int, Hkv: int, D: int, per_request: bool = False) -> dict:
    """B identical requests. per_request: the split of csrc/include/apd/attention_split.h (issue 28),
    each request split as if alone, whatever B; else the batch-wide rule it replaced."""
    bm, warps, q_smem, packed = CONFIGS[cfg]
    if q_smem is None:
        q_smem = D > 64
    heads, rows = (Hkv, Lq * Hq // Hkv) if packed else (Hq, Lq)
    qt = math.ceil(rows / bm)
    ctas = B * heads * qt
    ns = splits(ctas // B if per_request else ctas, kv, after="before" not in cfg)
    tiles = math.ceil(math.ceil(kv / BN) / ns)  # key tiles per CTA
    total = ctas * ns
    waves = math.ceil(total / (SMS * SLOTS))
    per_sm = min(SLOTS, math.ceil(total / SMS))  # CTAs running together on the busiest SM
    flop = bm * tiles * BN * D * 4 * per_sm
    kv_tile = BN * D * 2  # bytes of one K or V tile
    smem = per_sm * (tiles * warps * (2 * kv_tile + (bm // warps) * D * 2 * q_smem) + tiles * 2 * kv_tile + bm * D * 2)
    l2 = total * tiles * 2 * kv_tile
    t_mma, t_smem, t_l2 = flop / MMA_FLOPS_SM * waves, smem / SMEM_BPS_SM * waves, l2 / L2_BPS
    part = 2 * ns * B * Lq * Hq * D * 2 if ns > 1 else 0
    t_comb = LAUNCH_S + part / HBM_BPS if ns > 1 else 0.0
    return dict(rows=qt * bm * heads * B, ctas=total, splits=ns, tiles=tiles, waves=waves, mma=t_mma, smem=t_smem,
                l2=t_l2, combine=t_comb, total=max(t_mma, t_smem, t_l2) + t_comb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    shapes = [("Dream-7B", B, Lq, kv, 28, 4, 128) for B in (1, 8) for Lq in (16, 100, 116, 216) for kv in (4096, 16384)]
    shapes += [("Qwen2.5-0.5B", 1, Lq, kv, 14, 2, 64) for Lq in (16, 100) for kv in (1024, 4096)]
    us = lambda s: f"{s * 1e6:.1f}"  # noqa: E731
    body = []
    for model, B, Lq, kv, Hq, Hkv, D in shapes:
        floor = 4 * B * Lq * Hq * kv * D / 790e12
        res = {c: predict(c, B, Lq, kv, Hq, Hkv, D) for c in CONFIGS}
        before, after, fa2 = (res[c] for c in CONFIGS)
        body.append([model, str(B), str(Lq), str(kv), us(floor),
                     f"{us(before['total'])} ({before['ctas']}, {before['waves']}w)",
                     f"{us(after['total'])} ({after['ctas']}, {after['waves']}w)",
                     f"{after['mma'] * 1e6:.0f} / {after['smem'] * 1e6:.0f} / {after['l2'] * 1e6:.0f} / "
                     f"{after['combine'] * 1e6:.0f}",
                     f"{us(fa2['total'])} ({fa2['ctas']}, {fa2['waves']}w)",
                     f"{fa2['total'] / after['total']:.2f}"])
    emit_table("window_attention, predicted us (CTAs, waves); model, not measured",
               ["model", "B", "q_len", "kv", "FLOP floor", "mma before", "mma after",
                "after: MMA / smem / L2 / combine", "FA2 (SDPA)", "FA2 / after"], body, args.markdown)

    # Issue 28: the split count per request (batch invariance) against the batch-wide rule, 128-row mma.
    mma = "mma after (128 rows, 32 / warp)"
    body = []
    for model, B, Lq, kv, Hq, Hkv, D in shapes + [("Dream-7B", B, Lq, 4096, 28, 4, 128) for B in (4, 16, 64)
                                                   for Lq in (16, 100)]:
        old, new = predict(mma, B, Lq, kv, Hq, Hkv, D), predict(mma, B, Lq, kv, Hq, Hkv, D, per_request=True)
        body.append([model, str(B), str(Lq), str(kv),
                     f"{us(old['total'])} ({old['splits']}, {old['ctas']}, {old['waves']}w)",
                     f"{us(new['total'])} ({new['splits']}, {new['ctas']}, {new['waves']}w)",
                     f"{new['mma'] * 1e6:.0f} / {new['smem'] * 1e6:.0f} / {new['l2'] * 1e6:.0f} / "
                     f"{new['combine'] * 1e6:.0f}",
                     f"{new['total'] / old['total']:.2f}"])
    emit_table("window_attention split rule, predicted us (splits, CTAs, waves); model, not measured",
               ["model", "B", "q_len", "kv", "batch-wide rule", "per request (issue 28)",
                "per request: MMA / smem / L2 / combine", "per request / batch-wide"], body, args.markdown)


if __name__ == "__main__":
    main()
