"""Packed vs padded windows in the Engine: a long prompt joins 8 short decoding rows.

Eight requests (short prompts) are decoding; a ninth with a long prompt
joins. On its join step the dLLM's first window covers its whole prompt, so
padded, every live row runs a prompt-length window (B x max window rows);
packed (models/packing.py), each runs its own (sum of windows). The verifier's
join prefill is packed likewise. Rows are counted in every model forward of
the step (Qwen2Runtime.forward wrapped); time is the step's wall time and
the part of it in the two models' forwards (the Engine's phase timer; on the
CPU the sampling ops, the same in both layouts, take most of a step).

A/B: qwen2._PACK (False: every forward padded, plans ignored), interleaved
runs (the order rotates each round), each on a fresh Engine warmed up with
the same steps; median and spread (min .. max) of the join step and of the
decode step before it. Random tiny weights on the CPU (fp32, one thread), a
fixed acceptance schedule (the benchmarking hook), no EOS. The row counts
depend only on the lengths, so the GEMM FLOPs column is what the same step
costs at Dream-7B / Qwen2.5-0.5B shapes (2 x non-embedding params x rows +
the LM head on the logit rows is left out; attention is left out).

    python bench/bench_packing.py                       # CPU, 1024-token prompt
    python bench/bench_packing.py --long 2048 --repeats 5 --markdown out.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from bench_common import emit_table  # noqa: E402

import apd_ext  # noqa: E402
from apd_ext.config import APDConfig  # noqa: E402
from apd_ext.decoding import bench  # noqa: E402
from apd_ext.decoding.engine import Engine  # noqa: E402
from apd_ext.models import qwen2  # noqa: E402


def _gemm_params(s: dict) -> int:
    """Non-embedding weights of one layer stack (q/k/v/o + MLP), per row: 2x this many FLOPs."""
    H, I, L = s["hidden"], s["inter"], s["layers"]
    kv = H // s["heads"] * s["kv_heads"]
    return L * (H * (H + 2 * kv) + H * H + 3 * H * I)


class _Rows:
    """Wraps Qwen2Runtime.forward: per model kind, rows computed (N) and padded (B x Lw)."""

    def __init__(self):
        self.calls = []  # (kind, B * Lw, sum(q_len))
        self.orig = qwen2.Qwen2Runtime.forward

    def __enter__(self):
        rec, orig = self.calls, self.orig

        def forward(model, input_ids, cache, q_start, q_len, logit_rows=None, packing=None):
            rec.append((model.kind, input_ids.numel(), int(q_len.sum())))
            return orig(model, input_ids, cache, q_start, q_len, logit_rows, packing=packing)

        qwen2.Qwen2Runtime.forward = forward
        return self

    def __exit__(self, *exc):
        qwen2.Qwen2Runtime.forward = self.orig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--short", type=int, default=32, help="prompt tokens of the 8 decoding requests")
    ap.add_argument("--long", type=int, default=1024, help="prompt tokens of the joining request")
    ap.add_argument("--rows", type=int, default=8, help="decoding requests before the join")
    ap.add_argument("--W", type=int, default=16)
    ap.add_argument("--M", type=int, default=100)
    ap.add_argument("--accept", type=int, default=8, help="tokens accepted per step per sequence (fixed)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    sd, sa = (bench.TINY_DLLM, bench.TINY_AR) if device.type == "cpu" else (bench.DREAM_7B, bench.QWEN_05B)
    dllm = apd_ext.load_model(bench.build_hf(sd, dtype, device, seed=0), kind="dllm", mask_token_id=sd["vocab"] - 1)
    ver = apd_ext.load_model(bench.build_hf(sa, dtype, device, seed=1), kind="ar")
    g = torch.Generator().manual_seed(0)
    vocab = min(sd["vocab"], sa["vocab"]) - 1
    shorts = [torch.randint(3, vocab, (args.short + i,), generator=g) for i in range(args.rows)]  # ragged by 1
    long_prompt = torch.randint(3, vocab, (args.long,), generator=g)
    max_len = args.long + 4 * args.M
    params = dict(max_new_tokens=3 * args.M, stop_token_ids=[], seed=0)

    def timed_step(engine):
        """-> (step ms, ms in the two models' forwards: the join prefill included)."""
        tm = engine.timer
        before = tm.totals["dllm"] + tm.totals["verifier"]
        tm.start()
        engine.step()
        sec = tm.stop()  # synchronises; folds the CUDA events into the totals
        return sec * 1e3, (tm.totals["dllm"] + tm.totals["verifier"] - before) * 1e3

    def run(pack: bool) -> dict:
        qwen2._PACK = pack
        try:
            engine = Engine(dllm, ver, APDConfig(R=0.7, W=args.W, M=args.M), max_batch=args.rows + 1,
                            max_len=max_len)
            engine._n_accept_override = args.accept
            for i, p in enumerate(shorts):
                engine.add_request(p, params, f"s{i}")
            engine.step()  # the short rows join (their first step)
            engine.step()
            decode, decode_fwd = timed_step(engine)
            engine.add_request(long_prompt, params, "long")
            with _Rows() as rows:
                join, join_fwd = timed_step(engine)
            assert engine.num_live == args.rows + 1
            engine.finish_all()
            return dict(decode=decode, decode_fwd=decode_fwd, join=join, join_fwd=join_fwd, calls=rows.calls)
        finally:
            qwen2._PACK = True

    out = bench.interleaved({"packed": lambda: run(True), "padded": lambda: run(False)}, args.repeats)

    def stat(name, key):
        xs = [s[key] for s in out[name]]
        return statistics.median(xs), min(xs), max(xs)

    def fmt(m):
        return f"{m[0]:.1f} ({m[1]:.1f} .. {m[2]:.1f})"

    calls = out["packed"][0]["calls"]  # the same lengths in every run and mode
    d_pad = sum(p for k, p, n in calls if k == "dllm")
    d_row = sum(n for k, p, n in calls if k == "dllm")
    a_pad = sum(p for k, p, n in calls if k == "ar")
    a_row = sum(n for k, p, n in calls if k == "ar")
    fd, fa = 2 * _gemm_params(bench.DREAM_7B), 2 * _gemm_params(bench.QWEN_05B)
    ratio = [b / a for a, b in zip((s["join_fwd"] for s in out["packed"]), (s["join_fwd"] for s in out["padded"]))]
    print(f"join step forwards ({args.rows} decoding rows + one {args.long}-token prompt, W={args.W} M={args.M}): "
          + ", ".join(f"{k} {n}/{p} rows" for k, p, n in calls))
    print(f"padded/packed join-step forward time, paired per round: median {statistics.median(ratio):.2f}x "
          f"({min(ratio):.2f} .. {max(ratio):.2f}), {args.repeats} rounds, {device}, {args.threads} thread(s)")
    head = ["layout", "join: dLLM rows", "verifier rows", "Dream-7B+0.5B GEMM TFLOP", "join fwd ms",
            "join step ms", "decode fwd ms", "decode step ms"]
    body = []
    for name, dr, ar_ in (("packed", d_row, a_row), ("padded", d_pad, a_pad)):
        body.append([name, str(dr), str(ar_), f"{(dr * fd + ar_ * fa) / 1e12:.1f}",
                     fmt(stat(name, "join_fwd")), fmt(stat(name, "join")), fmt(stat(name, "decode_fwd")),
                     fmt(stat(name, "decode"))])
    emit_table("Engine join step, packed vs padded windows (median (min .. max))", head, body, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
