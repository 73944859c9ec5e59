"""Memory of a serving replica over many requests: `apd serve` (one replica)
answers N sequential completions (20 distinct bodies in turn, each checked
against its solo output); the replica's RSS (from /health) is read after a
warm-up and every 100 requests. Flat memory = no per-request leak (streams,
engine rows, caches are all released).

    python bench/bench_serve_memory.py [--requests 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import serve_common as sc  # noqa: E402


def main(argv=None):
    import httpx

    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--time-limit", type=float, default=900)
    args = ap.parse_args(argv)
    solo = sc.Solo()
    bodies = [dict(b, max_tokens=16) for b in sc.workload(20, seed=4)]
    want = [solo(b)[0] for b in bodies]
    rss, wrong, lost = [], 0, 0
    with sc.server(max_batch=8, log_path="/tmp/apd_serve_memory.log") as (base, _), httpx.Client(timeout=60) as http:
        for i in range(40):  # warm-up: allocator and caches reach their steady state
            http.post(base + "/v1/completions", json=bodies[i % 20])
        rss.append((0, http.get(base + "/health").json()["rss_mb"]))
        t0 = time.monotonic()
        done = 0
        for i in range(args.requests):
            if time.monotonic() - t0 > args.time_limit:
                break
            try:
                r = http.post(base + "/v1/completions", json=bodies[i % 20])
                wrong += r.json()["choices"][0]["text"] != want[i % 20]
            except (httpx.HTTPError, KeyError, ValueError):
                lost += 1
            done += 1
            if done % 100 == 0:
                rss.append((done, http.get(base + "/health").json()["rss_mb"]))
        wall = time.monotonic() - t0
    out = dict(requests=done, wall_s=round(wall, 1), wrong=wrong, lost=lost, rss_mb=rss,
               rss_start_mb=rss[0][1], rss_end_mb=rss[-1][1], growth_mb=round(rss[-1][1] - rss[0][1], 1))
    print(json.dumps(out, indent=1))
    return 0 if not wrong and not lost else 1


if __name__ == "__main__":
    sys.exit(main())
