"""Load test of APD serving on the tiny pair (CPU), bounded in count and time.

1. HTTP: `apd serve` on 127.0.0.1 (one replica), closed-loop clients at
   concurrency 1, 4, 16, each request streamed (SSE) so that the time to the
   first accepted block is measured; every response is checked against the
   request's solo output (lost = no answer, wrong = different text).
2. In process, the same closed loop on the Engine (continuous batching) and on
   a static-batch baseline (one batched `generate` per group of waiting
   requests: a request that arrives mid-batch waits for the whole batch);
   then open-loop Poisson arrivals (--rate) on both, batch up to 16.
   Same knobs for all requests here (the baseline takes one config per call);
   seeds differ, lengths differ through EOS.

    python bench/bench_serve.py [--requests 32] [--levels 1,4,16] [--time-limit 600] [--skip-http]
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


def row(name, c, n, wall, tokens, lat, ttfb, lost, wrong):
    return dict(mode=name, concurrency=c, requests=n, req_per_s=round(n / wall, 2), tok_per_s=round(tokens / wall, 1),
                p50_s=round(sc.pct(lat, 50), 3), p99_s=round(sc.pct(lat, 99), 3),
                ttfb_p50_s=round(sc.pct(ttfb, 50), 3), lost=lost, wrong=wrong)


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
    from apd_ext.engine import Engine

    engine = Engine(solo.dllm, solo.ver, APDConfig(M=32), max_batch=c, max_len=256)
    todo = deque(range(len(bodies)))
    start, first, toks, lat, ttfb = {}, {}, {}, [], []
    t0 = time.perf_counter()

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
    wall = time.perf_counter() - t0
    wrong = sum(solo.text(toks[i]) != want[i][0] for i in toks)
    return row("engine continuous", c, len(toks), wall, sum(map(len, toks.values())), lat, ttfb,
               len(bodies) - len(toks), wrong)


def static_level(solo, bodies, want, c):
    import apd_ext

    todo = deque(range(len(bodies)))
    lat, ttfb, tokens, wrong, done = [], [], 0, 0, 0
    t0 = time.perf_counter()
    while todo:
        group = [todo.popleft() for _ in range(min(c, len(todo)))]  # closed loop: all c wait at a boundary
        start = time.perf_counter()
        firsts = {}

        def cb(step, blocks):
            now = time.perf_counter()
            for b, blk in enumerate(blocks):
                if blk:
                    firsts.setdefault(b, now - start)

        cfg = solo.config(bodies[group[0]])
        out = apd_ext.generate(solo.dllm, solo.ver, [solo.ids(bodies[i]) for i in group], cfg,
                               seeds=[bodies[i]["seed"] for i in group], callback=cb)
        end = time.perf_counter() - start
        for b, i in enumerate(group):
            lat.append(end)  # the batch returns as a whole
            ttfb.append(firsts.get(b, end))
            tokens += int(out.num_generated[b])
            wrong += solo.text(out.generated(b).tolist()) != want[i][0]
            done += 1
    wall = time.perf_counter() - t0
    return row("static batch", c, done, wall, tokens, lat, ttfb, len(bodies) - done, wrong)


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
    from apd_ext.engine import Engine

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
    import apd_ext

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

        out = apd_ext.generate(solo.dllm, solo.ver, [solo.ids(bodies[i]) for i in group], solo.config(bodies[group[0]]),
                               seeds=[bodies[i]["seed"] for i in group], callback=cb)
        end = time.perf_counter() - t0
        for b, i in enumerate(group):
            lat.append(end - times[i])
            ttfb.append(firsts.get(b, end) - times[i])
            tokens += int(out.num_generated[b])
            wrong += solo.text(out.generated(b).tolist()) != want[i][0]
            done += 1
    wall = time.perf_counter() - t0
    return row("static open-loop", c, done, wall, tokens, lat, ttfb, len(bodies) - done, wrong)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--time-limit", type=float, default=600, help="seconds for the HTTP part (all levels)")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--rate", type=float, default=8.0, help="open-loop arrivals per second (in process)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    solo = sc.Solo()
    rows = []

    # In process: Engine vs static batches, uniform knobs (one config per static call).
    uni = [dict(b, R=0.7, W=16, M=32, temperature=0.2, max_tokens=64) for b in sc.workload(args.requests, seed=1)]
    want_uni = [solo(b) for b in uni]
    for c in levels:
        rows.append(engine_level(solo, uni, want_uni, c))
        rows.append(static_level(solo, uni, want_uni, c))
        print(json.dumps(rows[-2]), json.dumps(rows[-1]), sep="\n", flush=True)
    times = arrivals(len(uni), args.rate)
    for c in (max(levels),):
        rows.append(engine_open(solo, uni, want_uni, c, times))
        rows.append(static_open(solo, uni, want_uni, c, times))
        print(json.dumps(rows[-2]), json.dumps(rows[-1]), sep="\n", flush=True)

    if not args.skip_http:
        mixed = sc.workload(args.requests, seed=2)
        want = [solo(b) for b in mixed]
        with sc.server(max_batch=max(levels)) as (base, _):
            deadline = time.monotonic() + args.time_limit
            for c in levels:
                rows.append(asyncio.run(http_level(base, mixed, want, c, deadline)))
                print(json.dumps(rows[-1]), flush=True)

    print("\n| mode | conc | req | req/s | tok/s | p50 s | p99 s | first block p50 s | lost | wrong |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['req_per_s']} | {r['tok_per_s']} | "
              f"{r['p50_s']} | {r['p99_s']} | {r['ttfb_p50_s']} | {r['lost']} | {r['wrong']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = sum(r["lost"] + r["wrong"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
