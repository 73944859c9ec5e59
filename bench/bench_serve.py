"""Load test of APD serving on the tiny pair (CPU), bounded in count and time.

1. HTTP: `apd serve` on 127.0.0.1 (one replica), closed-loop clients at
   concurrency 1, 4, 16, each request streamed (SSE) so that the time to the
   first accepted block is measured; every response is checked against the
   request's solo output (lost = no answer, wrong = different text).
2. In process, the same closed loop on the Engine (continuous batching) and on
   a static-batch baseline (one batched `generate` per group of waiting
   requests, each with its own budget through max_new_tokens_per_row: a
   request that arrives mid-batch waits for the whole group, whose finished
   rows leave it as they end); then open-loop Poisson arrivals (--rate) on
   both, batch up to 16. Equal sampling knobs for all requests here (a
   `generate` call takes one config); seeds differ, and so do the budgets
   (max_tokens drawn per request from 16 / 32 / 64 / 96, fixed seed) and the
   EOS times. --reps runs each (level, mode) that many times, engine and
   static interleaved in alternating order (the machine is shared: noisy);
   the table gives medians, req/s with its range.
3. --step-cost: the Engine's step time against the number of live rows.

    python bench/bench_serve.py [--requests 32] [--levels 1,4,16] [--reps 1] [--time-limit 600] [--skip-http]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import deque

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import serve_common as sc  # noqa: E402


def row(name, c, n, wall, tokens, lat, ttfb, lost, wrong, cpu=None):
    """cpu: this process's CPU seconds for the run (in-process modes, --threads): the
    work per request, much less sensitive than wall time to other load on the machine."""
    out = dict(mode=name, concurrency=c, requests=n, req_per_s=round(n / wall, 2), tok_per_s=round(tokens / wall, 1),
               p50_s=round(sc.pct(lat, 50), 3), p99_s=round(sc.pct(lat, 99), 3),
               ttfb_p50_s=round(sc.pct(ttfb, 50), 3), lost=lost, wrong=wrong)
    if cpu is not None:
        out["cpu_ms_per_req"] = round(cpu / max(n, 1) * 1e3, 2)
    return out


async def http_level(base, bodies, want, c, deadline):
    import httpx

    todo = deque(range(len(bodies)))
    lat, ttfb, got = [], [], {}
    tokens = 0

    async def client(http):
        nonlocal tokens
        while todo and time.monotonic() < deadline:
            i = todo.popleft()
            t0 = time.perf_counter()
            first, text = None, []
            try:
                async with http.stream("POST", base + "/v1/completions", json=dict(bodies[i], stream=True)) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        ch = json.loads(line[6:])
                        if first is None:
                            first = time.perf_counter() - t0
                        text.append(ch["choices"][0]["text"])
                        if "usage" in ch:
                            tokens += ch["usage"]["completion_tokens"]
            except Exception as e:  # noqa: BLE001  (counted as lost)
                print(f"request {i}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            lat.append(time.perf_counter() - t0)
            ttfb.append(first if first is not None else float("nan"))
            got[i] = "".join(text)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(c)))
    wall = time.perf_counter() - t0
    lost = len(bodies) - len(got)
    wrong = sum(got[i] != want[i][0] for i in got)
    return row("http continuous", c, len(got), wall, tokens, lat, ttfb, lost, wrong)


def engine_level(solo, bodies, want, c):
    from apd_ext.config import APDConfig
    from apd_ext import Engine

    engine = Engine(solo.dllm, solo.ver, APDConfig(M=32), max_batch=c, max_len=256)
    todo = deque(range(len(bodies)))
    start, first, toks, lat, ttfb = {}, {}, {}, [], []
    t0, cpu0 = time.perf_counter(), time.process_time()

    def submit():
        i = todo.popleft()
        engine.add_request(solo.ids(bodies[i]), solo.config(bodies[i]), i)
        start[i] = time.perf_counter()
        toks[i] = []

    for _ in range(min(c, len(todo))):
        submit()
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            first.setdefault(o.request_id, now - start[o.request_id])
            toks[o.request_id] += o.new_tokens
            if o.finished:
                lat.append(now - start[o.request_id])
                ttfb.append(first[o.request_id])
                if todo:
                    submit()  # the client's next request arrives now
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    wrong = sum(solo.text(toks[i]) != want[i][0] for i in toks)
    return row("engine continuous", c, len(toks), wall, sum(map(len, toks.values())), lat, ttfb,
               len(bodies) - len(toks), wrong, cpu)


def static_generate(solo, bodies, group, cb):
    """The baseline's one batched call: the group's shared knobs, each request's own seed and budget."""
    import apd_ext

    budgets = [bodies[i]["max_tokens"] for i in group]
    cfg = solo.config(bodies[group[0]]).replace(max_new_tokens=max(budgets))
    return apd_ext.generate(solo.dllm, solo.ver, [solo.ids(bodies[i]) for i in group], cfg,
                            seeds=[bodies[i]["seed"] for i in group], max_new_tokens_per_row=budgets, callback=cb)


def static_level(solo, bodies, want, c):
    todo = deque(range(len(bodies)))
    lat, ttfb, tokens, wrong, done = [], [], 0, 0, 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    while todo:
        group = [todo.popleft() for _ in range(min(c, len(todo)))]  # closed loop: all c wait at a boundary
        start = time.perf_counter()
        firsts = {}

        def cb(step, blocks):
            now = time.perf_counter()
            for b, blk in enumerate(blocks):
                if blk:
                    firsts.setdefault(b, now - start)

        out = static_generate(solo, bodies, group, cb)
        end = time.perf_counter() - start
        for b, i in enumerate(group):
            lat.append(end)  # the batch returns as a whole
            ttfb.append(firsts.get(b, end))
            tokens += int(out.num_generated[b])
            wrong += solo.text(out.generated(b).tolist()) != want[i][0]
            done += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return row("static batch", c, done, wall, tokens, lat, ttfb, len(bodies) - done, wrong, cpu)


def arrivals(n, rate, seed=5):
    """Open loop: n arrival times (seconds from the start), Poisson at `rate` req/s."""
    import random

    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def engine_open(solo, bodies, want, c, times):
    """Requests join the Engine's live batch at the first step boundary after they arrive."""
    from apd_ext.config import APDConfig
    from apd_ext import Engine

    engine = Engine(solo.dllm, solo.ver, APDConfig(M=32), max_batch=c, max_len=256)
    nxt, toks, first, lat, ttfb = 0, {}, {}, [], []
    t0 = time.perf_counter()
    while nxt < len(bodies) or engine.has_unfinished():
        now = time.perf_counter() - t0
        while nxt < len(bodies) and times[nxt] <= now:
            engine.add_request(solo.ids(bodies[nxt]), solo.config(bodies[nxt]), nxt)
            toks[nxt] = []
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, times[nxt] - now))
            continue
        outs = engine.step()
        now = time.perf_counter() - t0
        for o in outs:
            first.setdefault(o.request_id, now - times[o.request_id])
            toks[o.request_id] += o.new_tokens
            if o.finished:
                lat.append(now - times[o.request_id])
                ttfb.append(first[o.request_id])
    wall = time.perf_counter() - t0
    wrong = sum(solo.text(toks[i]) != want[i][0] for i in toks)
    return row("engine open-loop", c, len(toks), wall, sum(map(len, toks.values())), lat, ttfb,
               len(bodies) - len(toks), wrong)


def static_open(solo, bodies, want, c, times):
    """When idle, one batched generate over every arrived request (up to c); later arrivals wait for it."""
    nxt, lat, ttfb, tokens, wrong, done = 0, [], [], 0, 0, 0
    t0 = time.perf_counter()
    while nxt < len(bodies):
        now = time.perf_counter() - t0
        if times[nxt] > now:
            time.sleep(times[nxt] - now)
            now = time.perf_counter() - t0
        group = []
        while nxt < len(bodies) and times[nxt] <= now and len(group) < c:
            group.append(nxt)
            nxt += 1
        firsts = {}

        def cb(step, blocks):
            t = time.perf_counter() - t0
            for b, blk in enumerate(blocks):
                if blk:
                    firsts.setdefault(b, t)

        out = static_generate(solo, bodies, group, cb)
        end = time.perf_counter() - t0
        for b, i in enumerate(group):
            lat.append(end - times[i])
            ttfb.append(firsts.get(b, end) - times[i])
            tokens += int(out.num_generated[b])
            wrong += solo.text(out.generated(b).tolist()) != want[i][0]
            done += 1
    wall = time.perf_counter() - t0
    return row("static open-loop", c, done, wall, tokens, lat, ttfb, len(bodies) - done, wrong)


def step_cost(solo, sizes=(1, 2, 4, 8, 16), steps=8, reps=3):
    """Median ms per Engine step with n rows live (equal knobs, budgets long
    enough and no stop id, so all n stay live), measured after the joining step."""
    import statistics

    from apd_ext.config import APDConfig
    from apd_ext import Engine

    bodies = sc.workload(max(sizes), seed=1)
    times = {n: [] for n in sizes}
    for _ in range(reps):
        for n in sizes:
            engine = Engine(solo.dllm, solo.ver, APDConfig(M=32), max_batch=max(sizes), max_len=256)
            for i in range(n):
                engine.add_request(solo.ids(bodies[i]), dict(R=0.7, W=16, M=32, temperature=0.2, seed=bodies[i]["seed"],
                                                             max_new_tokens=160, stop_token_ids=[]), i)
            engine.step()  # the joining step (first windows from position 0, the verifier's prefill)
            for _ in range(steps):
                t0 = time.perf_counter()
                engine.step()
                times[n].append(time.perf_counter() - t0)
                assert engine.num_live == n
    out = []
    for n in sizes:
        ms = statistics.median(times[n]) * 1e3
        out.append(dict(rows=n, step_ms=round(ms, 2), ms_per_row=round(ms / n, 2),
                        min_ms=round(min(times[n]) * 1e3, 2), max_ms=round(max(times[n]) * 1e3, 2)))
    return out


def summarize(runs):
    """runs: the rows of one (mode, concurrency) over the repetitions -> one row of medians."""
    import statistics

    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    out = dict(runs[0], reps=len(runs), req_per_s=round(med("req_per_s"), 2), tok_per_s=round(med("tok_per_s"), 1),
               p50_s=round(med("p50_s"), 3), p99_s=round(med("p99_s"), 3), ttfb_p50_s=round(med("ttfb_p50_s"), 3),
               req_per_s_min=min(r["req_per_s"] for r in runs), req_per_s_max=max(r["req_per_s"] for r in runs),
               lost=sum(r["lost"] for r in runs), wrong=sum(r["wrong"] for r in runs))
    if "cpu_ms_per_req" in runs[0]:
        out["cpu_ms_per_req"] = round(med("cpu_ms_per_req"), 2)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--reps", type=int, default=1, help="repetitions of each in-process (level, mode), interleaved")
    ap.add_argument("--time-limit", type=float, default=600, help="seconds for the HTTP part (all levels)")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--step-cost", action="store_true", help="also time Engine steps against the live rows")
    ap.add_argument("--rate", type=float, default=8.0, help="open-loop arrivals per second (in process)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of the in-process part")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    solo = sc.Solo(threads=args.threads)
    rows = []
    print(f"load average at start: {os.getloadavg()}", flush=True)
    if args.step_cost:
        for r in step_cost(solo):
            print(json.dumps(r), flush=True)

    # In process: Engine vs static batches; equal knobs, per-request seeds and budgets.
    uni = [dict(b, R=0.7, W=16, M=32, temperature=0.2) for b in sc.workload(args.requests, seed=1)]
    want_uni = [solo(b) for b in uni]
    times = arrivals(len(uni), args.rate)
    cases = [(f"{m} c={c}", lambda m=m, c=c: (engine_level if m == "engine" else static_level)(solo, uni, want_uni, c))
             for c in levels for m in ("engine", "static")]
    c_open = max(levels)
    cases += [(f"{m} open c={c_open}", lambda m=m: (engine_open if m == "engine" else static_open)(
        solo, uni, want_uni, c_open, times)) for m in ("engine", "static")]
    runs = {}
    for rep in range(args.reps):
        for j in range(0, len(cases), 2):  # each engine / static pair back to back, order alternating
            pair = cases[j:j + 2] if rep % 2 == 0 else cases[j:j + 2][::-1]
            for key, run in pair:
                r = run()
                runs.setdefault(key, []).append(r)
                print(json.dumps(r), flush=True)
    rows += [summarize(v) for v in runs.values()]
    print(f"load average after the in-process part: {os.getloadavg()}", flush=True)

    if not args.skip_http:
        mixed = sc.workload(args.requests, seed=2)
        want = [solo(b) for b in mixed]
        with sc.server(max_batch=max(levels)) as (base, _):
            deadline = time.monotonic() + args.time_limit
            for c in levels:
                rows.append(asyncio.run(http_level(base, mixed, want, c, deadline)))
                print(json.dumps(rows[-1]), flush=True)

    print("\n| mode | conc | req | req/s (range) | tok/s | p50 s | p99 s | first block p50 s | CPU ms/req | lost | wrong |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rng = f" ({r['req_per_s_min']}-{r['req_per_s_max']})" if r.get("reps", 1) > 1 else ""
        n = f"{r['reps']} x {r['requests']}" if r.get("reps", 1) > 1 else r["requests"]
        print(f"| {r['mode']} | {r['concurrency']} | {n} | {r['req_per_s']}{rng} | {r['tok_per_s']} | "
              f"{r['p50_s']} | {r['p99_s']} | {r['ttfb_p50_s']} | {r.get('cpu_ms_per_req', '-')} | "
              f"{r['lost']} | {r['wrong']} |")
    import statistics

    for c in levels:  # each engine run against the static run of its own pair (adjacent in time)
        pairs = list(zip(runs[f"engine c={c}"], runs[f"static c={c}"]))
        rq = [e["req_per_s"] / st["req_per_s"] for e, st in pairs]
        cpu = [e["cpu_ms_per_req"] / st["cpu_ms_per_req"] for e, st in pairs]
        print(f"c={c}: engine / static per pair, median (range) over {len(pairs)}: req/s {statistics.median(rq):.2f} "
              f"({min(rq):.2f}-{max(rq):.2f}), CPU per request {statistics.median(cpu):.2f} "
              f"({min(cpu):.2f}-{max(cpu):.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = sum(r["lost"] + r["wrong"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
