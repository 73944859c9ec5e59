"""Fault test of APD serving: kill one replica process (SIGKILL) mid-load.

`apd serve --replicas 2` on 127.0.0.1; closed-loop streaming clients; once
enough requests are in flight on both replicas, one replica's process (known
from the system_fingerprint of the streams it serves) is killed. Each request
ends as: ok (text == its solo output), error (an HTTP error, an error event
or a stream cut before [DONE]; never retried here), or hang (no end within
the client timeout). Expected: errors only on the killed replica's in-flight
requests, every other request ok, no hang; Ray Serve brings a replacement
replica up (checked with /health over a bounded wait).

    python bench/bench_serve_faults.py [--requests 40] [--concurrency 8]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import serve_common as sc  # noqa: E402


async def run(base, bodies, want, conc, timeout):
    import httpx

    todo = list(range(len(bodies)))
    inflight = {}  # request -> replica pid, while streaming
    results = {}  # request -> (status, replica pid or None, detail)
    killed = {}

    async def one(http, i):
        pid = None
        text, done = [], False
        try:
            async with http.stream("POST", base + "/v1/completions", json=dict(bodies[i], stream=True)) as r:
                if r.status_code != 200:
                    return "error", None, f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                        continue
                    if not line.startswith("data: "):
                        continue
                    ch = json.loads(line[6:])
                    if "error" in ch:
                        return "error", pid, f"error event: {ch['error']['message']}"
                    if pid is None:
                        pid = int(ch["system_fingerprint"].rsplit("-", 1)[1])
                        inflight[i] = pid
                    text.append(ch["choices"][0]["text"])
        except (httpx.TimeoutException, asyncio.TimeoutError):
            return "hang", pid, "no end within the client timeout"
        except httpx.HTTPError as e:
            return "error", pid, f"{type(e).__name__}: {e}"
        finally:
            inflight.pop(i, None)
        if not done:
            return "error", pid, "stream ended without [DONE]"
        return ("ok" if "".join(text) == want[i][0] else "wrong"), pid, ""

    async def client(http):
        while todo:
            i = todo.pop(0)
            try:
                results[i] = await asyncio.wait_for(one(http, i), timeout)
            except asyncio.TimeoutError:
                results[i] = ("hang", inflight.pop(i, None), "no end within the client timeout")

    async def killer():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pids = set(inflight.values())
            if len(pids) >= 2 and len(results) >= 4:
                victim = min(pids)
                killed["pid"] = victim
                killed["inflight"] = sorted(i for i, p in inflight.items() if p == victim)
                killed["at"] = len(results)
                os.kill(victim, signal.SIGKILL)
                return
            await asyncio.sleep(0.02)

    async with httpx.AsyncClient(timeout=timeout) as http:
        await asyncio.gather(killer(), *(client(http) for _ in range(conc)))
    return results, killed


def main(argv=None):
    import httpx

    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=90)
    args = ap.parse_args(argv)
    solo = sc.Solo()
    bodies = [dict(b, max_tokens=96, temperature=0.2) for b in sc.workload(args.requests, seed=3)]
    want = [solo(b) for b in bodies]
    with sc.server(replicas=2, max_batch=8, log_path="/tmp/apd_serve_faults.log") as (base, _):
        t0 = time.monotonic()
        results, killed = asyncio.run(run(base, bodies, want, args.concurrency, args.timeout))
        wall = time.monotonic() - t0
        # Recovery: a fresh replica answers (bounded wait).
        recovered, pids = None, set()
        t1 = time.monotonic()
        while time.monotonic() - t1 < 120:
            try:
                r = httpx.get(base + "/health", timeout=5)
                if r.status_code == 200:
                    pids.add(r.json()["replica_pid"])
                    if killed.get("pid") not in pids and len(pids) >= 2:
                        recovered = round(time.monotonic() - t1, 1)
                        break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        after = httpx.post(base + "/v1/completions", json=bodies[0], timeout=60)
    by = {}
    for i, (status, pid, detail) in sorted(results.items()):
        by.setdefault(status, []).append(i)
    victim = killed.get("pid")
    errors_elsewhere = [i for i in by.get("error", []) if results[i][1] not in (victim, None)]
    summary = dict(requests=args.requests, concurrency=args.concurrency, wall_s=round(wall, 1),
                   killed_pid=victim, inflight_on_killed=killed.get("inflight"),
                   ok=len(by.get("ok", [])), errors=by.get("error", []), wrong=by.get("wrong", []),
                   hangs=by.get("hang", []), errors_not_on_killed=errors_elsewhere,
                   replicas_seen_after=sorted(pids), recovered_after_s=recovered,
                   request_after_recovery_ok=after.status_code == 200
                   and after.json()["choices"][0]["text"] == want[0][0])
    for i in by.get("error", []):
        print(f"request {i} (replica {results[i][1]}): {results[i][2]}")
    print(json.dumps(summary, indent=1))
    ok = (victim is not None and not summary["wrong"] and not summary["hangs"] and not errors_elsewhere
          and set(summary["errors"]) <= set(killed.get("inflight") or []) | {i for i in by.get("error", [])
                                                                             if results[i][1] is None}
          and summary["request_after_recovery_ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
