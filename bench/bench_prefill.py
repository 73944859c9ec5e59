"""Chunked prefill (issue 28 item 4): how long the live requests wait between
their blocks while a long prompt joins, without and with Engine(prefill_chunk).

A random tiny pair with a 4096-position context is built in a temporary
folder (tests/model_utils.py; the shipped tiny pair has 512 positions):
Dream-style dLLM and Qwen2 verifier, --hidden / --layers / heads 6 / kv 2,
vocab 509. Each run: --live requests with 32-token prompts decode (greedy,
W 16, M 16, no stop ids, budgets long enough to outlast the run); after
--warm steps one --prompt-token request joins; the run then steps until
--steps steps in all. Recorded per run, over the steps from the join on:
every gap between two consecutive blocks (StepOutputs with tokens) of a live
request (its p50 / p99 / max), the joiner's time from add_request to its
first block, and the steps' wall time. Runs of the modes (off, each --chunks
value) are interleaved in alternating order, after one warm-up run of each;
the table gives the median over --reps and the range (min-max) of each
statistic. One intra-op thread (the machine is shared).

    python bench/bench_prefill.py [--reps 5] [--live 6] [--prompt 2048] [--chunks 256,512] [--markdown FILE]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402

from bench_common import emit_table  # noqa: E402

MASK = 508


def build_pair(root, hidden, layers):
    import apd_ext
    from tests.model_utils import make_tiny_dream, make_tiny_qwen2

    kw = dict(hidden=hidden, layers=layers, heads=6, kv_heads=2, intermediate=3 * hidden, context=4096)
    make_tiny_dream(os.path.join(root, "dream"), seed=0, mask_token_id=MASK, **kw)
    make_tiny_qwen2(os.path.join(root, "qwen"), seed=1, **kw)
    return apd_ext.load_model(os.path.join(root, "dream")), apd_ext.load_model(os.path.join(root, "qwen"))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def one_run(pair, chunk, args, rep):
    from apd_ext.config import APDConfig
    from apd_ext import Engine

    g = torch.Generator().manual_seed(rep)
    engine = Engine(*pair, APDConfig(M=16), max_batch=args.live + 1, max_len=args.prompt + 512,
                    prefill_chunk=chunk)
    params = dict(R=0.7, W=16, M=16, temperature=0.0, stop_token_ids=[])
    for i in range(args.live):
        prompt = torch.randint(3, 500, (32,), generator=g)
        engine.add_request(prompt, dict(params, seed=i, max_new_tokens=16 * args.steps), f"live{i}")
    last, gaps, first_block = {}, [], None
    joined_at = None
    t_steps = 0.0
    for s in range(args.steps):
        if s == args.warm:
            long_prompt = torch.randint(3, 500, (args.prompt,), generator=g)
            engine.add_request(long_prompt, dict(params, seed=99, max_new_tokens=64), "joiner")
            joined_at = time.perf_counter()
        t0 = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        if s >= args.warm:
            t_steps += now - t0
        for o in outs:
            if not o.new_tokens:
                continue
            if o.request_id == "joiner":
                if first_block is None:
                    first_block = now - joined_at
                continue
            if s >= args.warm and o.request_id in last:
                gaps.append(now - last[o.request_id])
            last[o.request_id] = now
    assert first_block is not None, "the joiner drafted nothing within --steps steps"
    assert engine.num_live == args.live + 1, "a live request finished early: raise its budget"
    return dict(p50=pct(gaps, 50), p99=pct(gaps, 99), max=max(gaps), ttfb=first_block,
                step_s=t_steps / (args.steps - args.warm), n=len(gaps))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--live", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--chunks", default="256,512")
    ap.add_argument("--steps", type=int, default=24, help="steps per run (the joiner joins after --warm)")
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    modes = [None] + [int(c) for c in args.chunks.split(",")]
    with tempfile.TemporaryDirectory() as root:
        pair = build_pair(root, args.hidden, args.layers)
        for m in modes:  # warm-up: one discarded run of each mode
            one_run(pair, m, args, 0)
        res = {m: [] for m in modes}
        for rep in range(args.reps):
            order = modes if rep % 2 == 0 else modes[::-1]
            for m in order:
                r = one_run(pair, m, args, rep + 1)
                res[m].append(r)
                print(f"rep {rep} chunk {m}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in r.items()), flush=True)

    def cell(m, key):
        xs = [r[key] * 1e3 for r in res[m]]
        return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"

    body = [["off" if m is None else str(m)] + [cell(m, k) for k in ("p50", "p99", "max", "step_s", "ttfb")]
            for m in modes]
    emit_table(f"Live requests' time between blocks while a {args.prompt}-token prompt joins ({args.live} live, "
               f"tiny random pair hidden {args.hidden} x {args.layers} layers, CPU 1 thread, {args.reps} reps, "
               "ms: median (min-max))",
               ["prefill_chunk", "gap p50", "gap p99", "gap max", "mean step", "joiner first block"], body,
               args.markdown)


if __name__ == "__main__":
    main()
