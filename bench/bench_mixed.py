"""Mixed against uniform sampling parameters on the Engine (issue 28 item 2).

16 live requests of the shipped tiny pair (apd_ext.tiny, fp32, CPU, one thread)
run the same steps twice: "uniform", every request with the same settings (T
0.2, top-p 0.95, R 0.7, no stop ids), and "mixed", eight distinct settings two
rows each (temperatures 0.1 .. 0.3, top-p 0.9 / 0.95, R 0.5 / 0.7 / 0.9,
coupled / argmax acceptance, two stop-id lists). Every setting keeps the
sampler on the same path (T > 0 with a top-p filter) and the temperatures stay
near 0.2 (mean 0.2): the filter's work per row grows with the temperature
(sample_draft on [16, 56, 568] random logits, one thread: 4.96 ms at T 0.2,
9.25 ms at T 1.0, CPU time), a cost of the settings that both paths pay alike.
So the ratio measures how the Engine dispatches the mix: one call per op per
step with per-row tensors ("after", this tree) or one call per group of equal
settings, each on its gathered rows ("before": the tree given by --before, e.g.
a build of main).

A fixed acceptance schedule (the Engine's benchmarking hook, --accept tokens
per request per step) keeps the windows, and so both forwards, identical
between the modes. Throughput = committed tokens / wall time of --steps steps
after --warmup steps, and the same per second of this process's CPU time (one
thread: on a loaded machine the CPU time is the steadier measure). The sampling
columns are the Engine's own "sampling" phase timer per step. Runs are
interleaved: per repeat, one process per tree (alternating which goes first),
each running both modes once untimed, then timing uniform and mixed back to
back (alternating order). The table, last, gives the median and the spread
(min .. max) over the repeats; each ratio is mixed / uniform within one process.

    python bench/bench_mixed.py                                   # this tree only
    python bench/bench_mixed.py --before /path/to/main-worktree   # and the group path

"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

UNIFORM = dict(temperature=0.2, top_p=0.95, R=0.7)
# (temperature, top_p, R, acceptance, stop ids: 0 = none, 1 / 2 = one / two of
# the last vocabulary ids, which the pair never emits, so no request ends early)
MIXED = [
    (0.2, 0.95, 0.7, "coupled", 0),
    (0.15, 0.95, 0.7, "coupled", 0),
    (0.25, 0.9, 0.5, "coupled", 0),
    (0.3, 0.9, 0.7, "coupled", 1),
    (0.1, 0.95, 0.9, "coupled", 2),
    (0.2, 0.95, 0.5, "argmax", 0),
    (0.25, 0.95, 0.7, "coupled", 1),
    (0.15, 0.9, 0.7, "argmax", 2),
]


def _child(args) -> None:
    """Time uniform and mixed in this process (apd_ext from PYTHONPATH); print JSON."""
    import torch

    import apd_ext
    from apd_ext import tiny
    from apd_ext.decoding.engine import Engine

    torch.set_num_threads(1)
    d, a = tiny.paths()
    dllm, ver = apd_ext.load_model(d, dtype=torch.float32), apd_ext.load_model(a, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    B = args.rows
    prompts = [torch.randint(3, 200, (args.prompt_len + i % 5,), generator=g).tolist() for i in range(B)]
    budget = args.accept * (args.warmup + args.steps) + 8

    V = min(int(dllm.config.vocab_size), int(ver.config.vocab_size))

    def params(mode: str, i: int) -> dict:
        p = dict(tiny.DEFAULTS, max_new_tokens=budget, seed=i, M=args.M, stop_token_ids=[])
        if mode == "uniform":
            return dict(p, **UNIFORM)
        t, tp, R, acc, n_stop = MIXED[i % len(MIXED)]
        p.update(temperature=t, top_p=tp, R=R, acceptance=acc, stop_token_ids=[V - 1 - j for j in range(n_stop)])
        return p

    def run(mode: str, steps: int) -> dict:
        eng = Engine(dllm, ver, tiny.apd_config(M=args.M), max_batch=B)
        eng._n_accept_override = args.accept  # benchmarking hook: identical windows in both modes
        for i, pr in enumerate(prompts):
            eng.add_request(pr, params(mode, i))
        for _ in range(args.warmup):
            eng.step()
        assert eng.num_live == B, "a request finished during warm-up: raise the budget"
        s0 = eng.timer.totals["sampling"]
        tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
        for _ in range(steps):
            tokens += sum(len(o.new_tokens) for o in eng.step())
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert eng.num_live == B, "a request finished while timed: raise the budget"
        return dict(tok_s=tokens / sec, tok_cpu_s=tokens / cpu, ms_step=sec / steps * 1e3,
                    sampling_ms_step=(eng.timer.totals["sampling"] - s0) / steps * 1e3)

    order = ("uniform", "mixed") if args.first == 0 else ("mixed", "uniform")
    for m in order:  # warm-up runs: the process's first engine pays one-time costs
        run(m, 1)
    out = {m: run(m, args.steps) for m in order}
    print("RESULT " + json.dumps(out))


def _spawn(tree: str, args, first: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(tree, "python"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--first", str(first), "--rows", str(args.rows),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--accept", str(args.accept),
           "--M", str(args.M), "--prompt-len", str(args.prompt_len)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"child on {tree} failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=None, help="a checkout with a built apd_ext (the group path) to compare")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per tree")
    ap.add_argument("--rows", type=int, default=16, help="live requests")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per run (the first one joins)")
    ap.add_argument("--accept", type=int, default=2, help="tokens committed per request per step (fixed)")
    ap.add_argument("--M", type=int, default=56, help="lookahead (drafted rows per request per step)")
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per child process")
    ap.add_argument("--markdown", default=None, help="append the table as markdown to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    trees = [("after (one call, per-row tensors)", ROOT)]
    if args.before:
        trees.append(("before (one call per group)", os.path.abspath(args.before)))
    results = {name: [] for name, _ in trees}
    for r in range(args.repeats):
        for name, tree in (trees if r % 2 == 0 else trees[::-1]):
            res = _spawn(tree, args, first=r % 2)
            results[name].append(res)
            print(f"repeat {r} {name}: uniform {res['uniform']['tok_s']:.1f} tok/s, "
                  f"mixed {res['mixed']['tok_s']:.1f} tok/s", flush=True)

    def stat(xs):
        return statistics.median(xs), min(xs), max(xs)

    sys.path.insert(0, HERE)
    from bench_common import emit_table

    head = ["path", "uniform tok/s", "mixed tok/s", "ratio (wall)", "uniform tok/CPU-s", "mixed tok/CPU-s",
            "ratio (CPU time)", "sampling ms/step uniform", "sampling ms/step mixed"]
    body = []
    for name, runs in results.items():
        def col(mode, key):
            return stat([x[mode][key] for x in runs])

        def ratio(key):  # paired within a process
            return stat([x["mixed"][key] / x["uniform"][key] for x in runs])

        def f(t, spec=".1f"):
            return f"{t[0]:{spec}} ({t[1]:{spec}}..{t[2]:{spec}})"
        body.append([name, f(col("uniform", "tok_s")), f(col("mixed", "tok_s")), f(ratio("tok_s"), ".3f"),
                     f(col("uniform", "tok_cpu_s")), f(col("mixed", "tok_cpu_s")), f(ratio("tok_cpu_s"), ".3f"),
                     f(col("uniform", "sampling_ms_step"), ".2f"), f(col("mixed", "sampling_ms_step"), ".2f")])
    emit_table(f"Engine, {args.rows} live rows, tiny pair fp32 CPU 1 thread, M={args.M}, "
               f"accept {args.accept}/step, {args.steps} steps x {args.repeats} interleaved repeats "
               "(median (min..max))", head, body, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
