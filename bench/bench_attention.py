"""Benchmark apd window_attention against torch SDPA at the APD shapes (issue 3).

Each shape is one decoding step's attention: every sequence has a cache of
exactly kv_len positions whose last Lq hold the window (q_start = kv_len - Lq).
The SDPA baseline gets the same cache slices in its [B, H, L, D] view (no
copy), enable_gqa, and a bottom-right causal mask for the verifier (an
explicit boolean mask on the CPU; torch's causal_lower_right bias, or a
boolean mask, on CUDA). On CUDA the flash and efficient backends are both
tried and the best one is reported. The floor is the time to read K and V
once at the copy bandwidth measured in the same run.

    python bench/bench_attention.py --device cpu            # a small subset
    python bench/bench_attention.py --device cuda --markdown out.md
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from apd_ext import ops  # noqa: E402
from bench_common import copy_bandwidth, emit_table, fmt, timer  # noqa: E402

DREAM = dict(model="Dream-7B", Hq=28, Hkv=4, D=128, causal=False)
QWEN = dict(model="Qwen2.5-0.5B", Hq=14, Hkv=2, D=64, causal=True)


def all_shapes():
    shapes = []
    for B in (1, 8):
        for Lq in (16, 116, 216):
            for kv in (256, 1024, 4096, 16384):
                shapes.append(dict(DREAM, B=B, Lq=Lq, kv=kv))
    for Lq in (16, 100):
        for kv in (256, 1024, 4096):
            shapes.append(dict(QWEN, B=1, Lq=Lq, kv=kv))
    return shapes


def small_shapes():
    """CPU default: a few minutes at most on two cores."""
    return [
        dict(DREAM, B=1, Lq=16, kv=256),
        dict(DREAM, B=1, Lq=16, kv=4096),
        dict(DREAM, B=1, Lq=116, kv=1024),
        dict(DREAM, B=8, Lq=16, kv=1024),
        dict(QWEN, B=1, Lq=16, kv=1024),
        dict(QWEN, B=1, Lq=100, kv=4096),
    ]


def sdpa_candidates(device, q, k, v, mask_bool, causal):
    """(name, fn) pairs of SDPA calls to time; on CUDA one per backend/mask form."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D] views
    Hq, Hkv = q.shape[2], k.shape[2]
    if device.type != "cuda":
        m = mask_bool if causal else None
        return [("default", lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=m, enable_gqa=Hq != Hkv))]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    masks = [("", None)] if not causal else [
        ("+lower_right", causal_lower_right(q.shape[1], k.shape[1])),
        ("+bool mask", mask_bool),
    ]
    # GQA through enable_gqa, or (for backends that refuse it) K/V expanded once, outside the timing.
    kx, vx = kt.repeat_interleave(Hq // Hkv, dim=1), vt.repeat_interleave(Hq // Hkv, dim=1)
    out = []
    for backend, name in ((SDPBackend.FLASH_ATTENTION, "flash"), (SDPBackend.EFFICIENT_ATTENTION, "efficient")):
        for mname, m in masks:
            for gname, kk, vv, gqa in (("", kt, vt, Hq != Hkv), ("+expanded kv", kx, vx, False)):

                def fn(backend=backend, m=m, kk=kk, vv=vv, gqa=gqa):
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(qt, kk, vv, attn_mask=m, enable_gqa=gqa)

                out.append((name + mname + gname, fn))
    return out


def bench_shape(s, device, dtype, time_fn, bw_gbs):
    B, Lq, kv, Hq, Hkv, D, causal = s["B"], s["Lq"], s["kv"], s["Hq"], s["Hkv"], s["D"], s["causal"]
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Lq, Hq, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, kv, Hkv, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, kv, Hkv, D, device=device, dtype=dtype, generator=g)
    q_start = torch.full((B,), kv - Lq, dtype=torch.int32, device=device)
    q_len = torch.full((B,), Lq, dtype=torch.int32, device=device)
    kv_len = torch.full((B,), kv, dtype=torch.int32, device=device)
    # Bottom-right causal: query row j (absolute position kv - Lq + j) sees keys <= its position.
    mask = torch.ones(Lq, kv, dtype=torch.bool, device=device).tril(diagonal=kv - Lq)

    row = dict(s)
    try:
        ops.window_attention(q, k, v, q_start, q_len, kv_len, causal=causal)  # checked once
        row["op_us"] = time_fn(
            lambda: ops.window_attention(q, k, v, q_start, q_len, kv_len, causal=causal, check_lengths=False)
        )
    except Exception as e:  # e.g. no CUDA kernel in this build
        row["op_us"], row["op_err"] = None, (str(e).splitlines() or [type(e).__name__])[0][:80]
    best = None
    for name, fn in sdpa_candidates(device, q, k, v, mask, causal):
        try:
            with warnings.catch_warnings():  # torch explains every refused backend
                warnings.simplefilter("ignore")
                fn()
        except Exception:
            continue  # this backend does not support this combination
        us = time_fn(fn)
        if best is None or us < best[1]:
            best = (name, us)
    row["sdpa"], row["sdpa_us"] = best if best else ("none", None)
    kv_bytes = 2 * B * kv * Hkv * D * torch.finfo(dtype).bits // 8
    row["floor_us"] = kv_bytes / (bw_gbs * 1e9) * 1e6
    row["gbs"] = kv_bytes / (row["op_us"] * 1e-6) / 1e9 if row["op_us"] else None
    return row


def table(rows, device, dtype, bw_gbs):
    head = ["model", "B", "Lq", "kv_len", "causal", "apd us", "SDPA us", "SDPA backend", "SDPA/apd",
            "K/V GB/s", "floor us", "apd/floor"]
    lines = []
    for r in rows:
        ratio = r["sdpa_us"] / r["op_us"] if r["op_us"] and r["sdpa_us"] else None
        of = r["op_us"] / r["floor_us"] if r["op_us"] else None
        lines.append([r["model"], r["B"], r["Lq"], r["kv"], "yes" if r["causal"] else "no", fmt(r["op_us"], ".1f"),
                      fmt(r["sdpa_us"], ".1f"), r["sdpa"], fmt(ratio, ".2f") + ("x" if ratio else ""),
                      fmt(r["gbs"], ".1f"), fmt(r["floor_us"], ".1f"), fmt(of, ".1f") + ("x" if of else "")])
    title = (f"window_attention vs SDPA on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
             f"{str(dtype).replace('torch.', '')}, copy bandwidth {bw_gbs:.0f} GB/s (floor = K/V bytes / that); "
             "SDPA/apd > 1 means apd is faster")
    return title, head, [[str(c) for c in l] for l in lines]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--shapes", default=None, choices=["small", "all"], help="default: small on cpu, all on cuda")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 30 cuda, 10 cpu)")
    ap.add_argument("--markdown", default=None, help="append the table as markdown to this file")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = {"small": small_shapes, "all": all_shapes}[args.shapes or ("all" if device.type == "cuda" else "small")]()
    cuda = device.type == "cuda"
    time_fn = timer(device, warmup=5 if cuda else 1, iters=args.iters or (30 if cuda else 10), budget_s=2.0,
                    unit="us")
    # 256 MiB on CUDA, 32 MiB on CPU
    bw = copy_bandwidth(device, time_fn, 1 << 28 if cuda else 1 << 25, unit_s=1e-6)

    rows = []
    for s in shapes:
        r = bench_shape(s, device, dtype, time_fn, bw)
        rows.append(r)
        print(f"  {s['model']} B={s['B']} Lq={s['Lq']} kv={s['kv']}: apd {fmt(r['op_us'], '.1f')} us, "
              f"SDPA {fmt(r['sdpa_us'], '.1f')} us ({r['sdpa']})" + (f"  [{r['op_err']}]" if "op_err" in r else ""),
              flush=True)
        if cuda:
            torch.cuda.empty_cache()

    title, head, body = table(rows, device, dtype, bw)
    emit_table(title, head, body, args.markdown)


if __name__ == "__main__":
    main()
