"""Benchmark the fused sampling ops (sample_draft, mixture_accept) against the
sampling path of the authors' released code, written in torch, in the same run.

Baseline (what the released code does per step): logits / tau, a full sort for
top-p, softmax + cumsum, masked_fill, float64 Gumbel noise from torch.rand,
argmax; for the target it first forms R log_softmax(dLLM) + (1 - R)
log_softmax(AR) and then samples the same way, then scans the accepted prefix
in torch. The apd ops do the same work without sorting the vocabulary
(radix select) and regenerate the noise from Philox.

Settings are the paper's: tau = 0.2, top_p = 0.95, R = 0.7; V_D = 152064
(Dream), V_A = 151936 (Qwen2.5); logits are N(0, 3^2) in bf16 (--dtype).
GB/s counts the logit bytes each op must read once; on CUDA "x floor" is the
apd time over that read at --floor-gbs (default 4300: the H200's measured
device-to-device copy rate, ../.library/device/KINDS.md), the ratio that the
issue-15 goals (<= 3x at B·M = 100, <= 1.5x at B·M >= 800) are stated in.

    python bench/bench_sampling.py --device cpu
    python bench/bench_sampling.py --device cuda --markdown out.md
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from apd_ext import ops  # noqa: E402
from bench_common import emit_table, fmt, timer  # noqa: E402

V_D, V_A = 152064, 151936
TAU, TOP_P, R = 0.2, 0.95, 0.7


# ---------------------------------------------------------------------------
# The released code's sampling path, in torch
# ---------------------------------------------------------------------------


def baseline_sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[B, M, V] -> ids [B, M]: sort-based top-p, float64 Gumbel, argmax."""
    z = logits.float() / temperature
    sorted_z, sorted_idx = torch.sort(z, dim=-1, descending=True)
    cum = torch.softmax(sorted_z, dim=-1).cumsum(-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    z = z.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    u = torch.rand(z.shape, dtype=torch.float64, device=z.device)
    g = -torch.log(-torch.log(u))
    return torch.argmax(z.double() + g, dim=-1)


def baseline_mixture_accept(dl, al, draft, valid_len, temperature, top_p, R):
    V = min(dl.shape[-1], al.shape[-1])
    m = R * torch.log_softmax(dl.float(), -1)[..., :V] + (1 - R) * torch.log_softmax(al.float(), -1)[..., :V]
    target = baseline_sample(m, temperature, top_p)
    match = draft == target
    match[:, 0] = True
    match &= torch.arange(draft.shape[1], device=draft.device)[None, :] < valid_len[:, None]
    return target, torch.cumprod(match.long(), -1).sum(-1)


# ---------------------------------------------------------------------------


def bench_shape(B, M, device, dtype, time_fn):
    g = torch.Generator(device=device).manual_seed(0)
    dl = (torch.randn(B, M, V_D, device=device, generator=g) * 3).to(dtype)
    al = (dl.float()[..., :V_A] + torch.randn(B, M, V_A, device=device, generator=g)).to(dtype)
    pos = torch.arange(B, device=device) * 7 + 100
    valid_len = torch.full((B,), M, device=device)
    seeds = torch.arange(B, device=device, dtype=torch.int64) + 12345
    steps = torch.zeros(B, device=device, dtype=torch.int64)
    sk = dict(temperature=TAU, top_p=TOP_P, check_lengths=False)
    try:
        draft = ops.sample_draft(dl, pos, valid_len, seeds, steps, **sk)
    except (NotImplementedError, RuntimeError):  # no kernel for this device in this build
        draft = baseline_sample(dl, TAU, TOP_P)
    el = dl.element_size()
    rows = []
    cases = (
        ("sample_draft", B * M * V_D * el,
         lambda: ops.sample_draft(dl, pos, valid_len, seeds, steps, **sk),
         lambda: baseline_sample(dl, TAU, TOP_P)),
        ("mixture_accept", B * M * (V_D + V_A) * el,
         lambda: ops.mixture_accept(dl, al, draft, pos, valid_len, seeds, steps, R=R, **sk),
         lambda: baseline_mixture_accept(dl, al, draft, valid_len, TAU, TOP_P, R)),
    )
    for name, nbytes, fused, base in cases:
        try:
            fused_ms = time_fn(fused)
        except (NotImplementedError, RuntimeError) as e:  # e.g. no CUDA kernel in this build
            print(f"  {name} B={B} M={M}: apd op failed: {str(e).splitlines()[0][:100]}", flush=True)
            fused_ms = None
        base_ms = time_fn(base)
        rows.append(dict(op=name, B=B, M=M, fused=fused_ms, base=base_ms,
                         gbs=nbytes / (fused_ms * 1e-3) / 1e9 if fused_ms else None))
        r = rows[-1]
        print(f"  {name} B={B} M={M}: apd {fmt(fused_ms, '.2f')} ms, baseline {base_ms:.2f} ms, "
              f"{fmt(base_ms / fused_ms if fused_ms else None, '.1f')}x, {fmt(r['gbs'], '.1f')} GB/s", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--iters", type=int, default=10, help="timed runs per measurement (>= 10)")
    ap.add_argument("--markdown", default=None, help="append the table as markdown to this file")
    ap.add_argument("--floor-gbs", type=float, default=4300.0,
                    help="bandwidth of the one-read floor in GB/s (CUDA only; default: H200 copy rate)")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    time_fn = timer(device, warmup=3 if cuda else 1, iters=max(10, args.iters))
    shapes = [(1, M) for M in (16, 100, 256)] + ([(8, M) for M in (16, 100, 256)] if cuda else [])
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"sampling on {where}, {args.dtype} logits, tau={TAU} top_p={TOP_P} R={R}", flush=True)
    rows = []
    for B, M in shapes:
        rows += bench_shape(B, M, device, dtype, time_fn)

    title = (f"sampling ops vs the released code's torch path on {args.device} ({where}), {args.dtype}, "
             f"V_D={V_D}, V_A={V_A}, tau={TAU}, top_p={TOP_P}, R={R}; median of {max(10, args.iters)} runs; "
             "speedup > 1 means apd is faster; GB/s = logit bytes read once / apd time")
    head = ["op", "B", "M", "apd ms", "baseline ms", "speedup", "apd GB/s"] + (["x floor"] if cuda else [])
    lines = [[r["op"], str(r["B"]), str(r["M"]), fmt(r["fused"], ".2f"), fmt(r["base"], ".2f"),
              fmt(r["base"] / r["fused"] if r["fused"] else None, ".1f") + "x", fmt(r["gbs"], ".1f")]
             + ([fmt(args.floor_gbs / r["gbs"] if r["gbs"] else None, ".2f")] if cuda else []) for r in rows]
    emit_table(title, head, lines, args.markdown)


if __name__ == "__main__":
    main()
