"""Fault tests of APD serving (issue 25: failure containment, operations).

1. bad row (in process: one APDServer, its routes on FastAPI over httpx's ASGI
   transport, the dLLM wrapped by the test-only tests/faults.py FaultyModel):
   16 requests live at once (8 streamed), one of them marked so that its
   dLLM logits are NaN (or its forward raises). Expected: 15 ok (text ==
   solo), 1 error (500 / an error chunk with finish_reason "error").
2. kill (below): `apd serve --replicas 2 --max-queue Q`; a replica is SIGKILLed.
4. fatal (its own Ray instance, 1 replica whose dLLM raises a sticky CUDA
   error's message for a marked request, tests/faults.py): the marked
   request and the streams in flight beside it get an error at once (no
   hang), /health turns 503, check_health raises, Ray Serve replaces the
   replica (a new pid answers /health) and a request after that completes.
3. queue: on the same server, a burst of twice the replicas' capacity
   (replicas x (max_batch + max_queue)) at once. Expected: the excess gets
   429 with Retry-After, every admitted request completes with its solo text
   (0 lost); /metrics scraped during the burst and after it.

Kill: `apd serve --replicas 2` on 127.0.0.1; closed-loop streaming clients; once
enough requests are in flight on both replicas, one replica's process (known
from the system_fingerprint of the streams it serves) is killed. Each request
ends as: ok (text == its solo output), error (an HTTP error, an error event
or a stream cut before [DONE]; never retried here), or hang (no end within
the client timeout). Expected: errors only on the killed replica's in-flight
requests, every other request ok, no hang; Ray Serve brings a replacement
replica up (checked with /health over a bounded wait).

    python bench/bench_serve_faults.py [--part all|badrow|server] [--requests 40] [--concurrency 8]
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
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # faults.py

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


async def _post(http, body):
    """(status, text or None, error or None, headers, replica pid or None) of one completion."""
    if not body.get("stream"):
        r = await http.post("/v1/completions", json=body)
        j = r.json()
        if r.status_code != 200:
            return r.status_code, None, j["error"]["message"], r.headers, None
        pid = int(j["system_fingerprint"].rsplit("-", 1)[1])
        return 200, j["choices"][0]["text"], None, r.headers, pid
    text, err, pid = [], None, None
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, None, json.loads(await r.aread())["error"]["message"], r.headers, None
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ch = json.loads(line[6:])
                pid = pid or int(ch["system_fingerprint"].rsplit("-", 1)[1])
                text.append(ch["choices"][0]["text"])
                if "error" in ch:
                    err = ch["error"]["message"]
    return 200, None if err else "".join(text), err, r.headers, pid


def bad_row(solo, n=16, mode="nan_logits", bad=9):
    """16 live requests in one replica (in process), request `bad` marked."""
    import fastapi
    import httpx

    from apd_ext import tiny
    from apd_ext.config import APDConfig
    from apd_ext import Engine
    from apd_ext.serve.app import APDServer
    from apd_ext.serve.loop import StepLoop
    from faults import FaultyModel

    bodies = [dict(b, max_tokens=64, stream=bool(i % 2)) for i, b in enumerate(sc.workload(n, seed=11))]
    bodies[bad]["prompt"] = "# " + bodies[bad]["prompt"]
    marker = solo.ids(bodies[bad])[0]
    assert all(solo.ids(b)[0] != marker for i, b in enumerate(bodies) if i != bad)
    want = [solo(b)[0] for b in bodies]
    d, a = tiny.paths()
    srv = APDServer(d, a, threads=1, max_batch=n, max_len=256, M=32)
    srv.engine = Engine(FaultyModel(srv.dllm, marker, mode), srv.verifier, APDConfig(M=32), max_batch=n,
                        max_len=256)
    srv.loop = StepLoop(srv.engine, metrics=srv.metrics)
    app = fastapi.FastAPI()
    app.post("/v1/completions")(srv.completions)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x", timeout=300) as h:
            first = [asyncio.create_task(_post(h, b)) for i, b in enumerate(bodies) if i != bad]
            while srv.engine.num_live < n - 1:  # the bad one joins a full, running batch
                await asyncio.sleep(0.01)
            live_at_join = srv.engine.num_live
            res = await _post(h, bodies[bad])
            rest = await asyncio.gather(*first)
            return live_at_join, rest[:bad] + [res] + rest[bad:]

    live_at_join, res = asyncio.run(asyncio.wait_for(go(), 600))
    ok = [i for i, r in enumerate(res) if r[0] == 200 and r[2] is None and r[1] == want[i]]
    err = [i for i, r in enumerate(res) if r[2] is not None]
    out = dict(mode=mode, requests=n, live_when_bad_joined=live_at_join, ok_equal_to_solo=len(ok),
               errors=err, error_message=res[bad][2], other=sorted(set(range(n)) - set(ok) - set(err)),
               engine_live_after=srv.engine.num_live, engine_reserved_after=srv.engine.reserved)
    out["pass"] = len(ok) == n - 1 and err == [bad] and not out["other"] and srv.engine.reserved == 0
    return out


def _scrape(base, tries=12):
    """/metrics of each replica reached (the proxy routes each scrape to one):
    {replica pid: {sample name (+ status label): value}}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    per = {}
    for _ in range(tries):
        text = httpx.get(base + "/metrics", timeout=30).text
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                key = smp.name + ("{%s}" % smp.labels["status"] if "status" in smp.labels else "") + \
                    ("{le=%s}" % smp.labels["le"] if "le" in smp.labels else "")
                per.setdefault(smp.labels["replica"], {})[key] = smp.value
    return per


def _figures(per):
    """The figures of a scrape, summed over replicas."""
    tot = {}
    for m in per.values():
        for k, v in m.items():
            tot[k] = tot.get(k, 0) + v
    def mean(name):
        c = tot.get(name + "_count", 0)
        return round(tot.get(name + "_sum", 0) / c, 4) if c else None
    reqs = {k.split("{")[1][:-1]: int(v) for k, v in tot.items() if k.startswith("apd_requests_total{") and v}
    return dict(replicas=sorted(per), requests=reqs, queue_length=tot.get("apd_queue_length"),
                live_rows=tot.get("apd_live_rows"), steps=tot.get("apd_steps_total"),
                step_seconds_mean=mean("apd_step_seconds"), tokens_per_dllm_forward_mean=mean(
                    "apd_tokens_per_dllm_forward"), accepted_block_length_mean=mean("apd_accepted_block_length"),
                time_to_first_block_s_mean=mean("apd_time_to_first_block_seconds"))


def queue_burst(base, solo, replicas, max_batch, max_queue):
    import httpx

    n = 2 * replicas * (max_batch + max_queue)
    bodies = [dict(b, max_tokens=96, temperature=0.2) for b in sc.workload(n, seed=5)]
    want = [solo(b)[0] for b in bodies]
    during = {}

    async def go():
        async with httpx.AsyncClient(base_url=base, timeout=300) as h:
            tasks = [asyncio.create_task(_post(h, b)) for b in bodies]
            best = -1
            while not all(t.done() for t in tasks):  # scrape during the burst; keep the busiest scrape
                per = await asyncio.to_thread(_scrape, base, 4)
                f = _figures(per)
                load = (f["live_rows"] or 0) + (f["queue_length"] or 0)
                if load > best:
                    best = load
                    during.clear()
                    during.update(per)
                await asyncio.sleep(0.05)
            return await asyncio.gather(*tasks)

    res = asyncio.run(asyncio.wait_for(go(), 900))
    ok = [i for i, r in enumerate(res) if r[0] == 200]
    busy = [i for i, r in enumerate(res) if r[0] == 429]
    lost = [i for i in ok if res[i][1] != want[i]]
    out = dict(burst=n, capacity=replicas * (max_batch + max_queue), admitted=len(ok), rejected_429=len(busy),
               retry_after=sorted({res[i][3].get("retry-after") for i in busy}),
               other_status=sorted({r[0] for r in res} - {200, 429}), admitted_lost_or_wrong=lost,
               metrics_during=_figures(during), metrics_after=_figures(_scrape(base)))
    out["pass"] = bool(busy) and not lost and not out["other_status"] and len(ok) + len(busy) == n
    return out


def main(argv=None):
    import httpx

    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=("all", "badrow", "server", "fatal"))
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=90)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=4)
    args = ap.parse_args(argv)
    solo = sc.Solo()
    report, ok = {}, True
    if args.part in ("all", "badrow"):
        for mode in ("nan_logits", "raise"):
            report[f"bad_row_{mode}"] = r = bad_row(solo, mode=mode)
            print(json.dumps(r, indent=1), flush=True)
            ok &= r["pass"]
    if args.part in ("all", "server"):
        k = kill(args, solo)
        report["kill"] = k
        ok &= k["pass"]
        report["queue"] = q = k.pop("queue")
        print(json.dumps(q, indent=1), flush=True)
        ok &= q["pass"]
    if args.part in ("all", "fatal"):
        report["fatal"] = f = fatal(solo)
        print(json.dumps(f, indent=1), flush=True)
        ok &= f["pass"]
    return 0 if ok else 1


def fatal(solo, n_inflight=3):
    """A fatal device error in a Ray Serve replica (own Ray instance, loopback)."""
    import httpx

    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join([os.path.join(here, "..", "tests"), os.path.join(here, "..", "python"),
                                                os.environ.get("PYTHONPATH", "")])  # the workers import faults
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray import serve

    from apd_ext import tiny
    from apd_ext.serve.app import make_ingress

    bodies = [dict(b, max_tokens=200, stream=True) for b in sc.workload(n_inflight + 2, seed=21)]
    bad = dict(bodies[-1], prompt="# " + bodies[-1]["prompt"], stream=False)
    marker = solo.ids(bad)[0]
    app, cls = make_ingress()

    class FaultyReplica(cls):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            from faults import FaultyModel, SlowModel

            from apd_ext.config import APDConfig
            from apd_ext import Engine
            from apd_ext.serve.loop import StepLoop

            # slowed (0.25 s per forward) so that the other streams are still in flight when the fault hits
            self.engine = Engine(SlowModel(FaultyModel(self.dllm, marker, "fatal"), 0.25), self.verifier, APDConfig(M=32),
                                 max_batch=8, max_len=256)
            self.loop = StepLoop(self.engine, metrics=self.metrics)

    port = sc.free_port()
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        dep = serve.deployment(name="APDServer", num_replicas=1, max_ongoing_requests=64,
                               health_check_period_s=2, health_check_timeout_s=30)(serve.ingress(app)(FaultyReplica))
        d, a = tiny.paths()
        serve.run(dep.bind(d, a, threads=1, max_batch=8, max_len=256, M=32), name="apd", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        first_pid = httpx.get(base + "/health", timeout=30).json()["replica_pid"]

        async def go():
            async with httpx.AsyncClient(base_url=base, timeout=120) as h:
                flight = [asyncio.create_task(_post(h, b)) for b in bodies[:n_inflight]]
                await asyncio.sleep(0.6)
                assert not any(t.done() for t in flight), "the streams ended before the fault"
                t0 = time.monotonic()
                res = await _post(h, bad)
                rest = await asyncio.gather(*flight)
                health = await h.get("/health")
                return res, rest, time.monotonic() - t0, health

        res, rest, secs, health = asyncio.run(asyncio.wait_for(go(), 300))
        t1, new_pid = time.monotonic(), None
        while time.monotonic() - t1 < 180:
            try:
                r = httpx.get(base + "/health", timeout=5)
                if r.status_code == 200 and r.json()["replica_pid"] != first_pid:
                    new_pid = r.json()["replica_pid"]
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        replaced_s = round(time.monotonic() - t1, 1)
        after = asyncio.run(_run_one(base, dict(bodies[-2], stream=False)))
        want_after = solo(dict(bodies[-2], stream=False))[0]
    finally:
        serve.shutdown()
        ray.shutdown()
    out = dict(first_pid=first_pid, marked=dict(status=res[0], error=res[2]),
               in_flight=[dict(status=r[0], error=r[2]) for r in rest], all_ended_s=round(secs, 2),
               health_after=dict(status=health.status_code, body=health.text[:300]), replacement_pid=new_pid,
               replaced_after_s=replaced_s, request_after_replacement_ok=after[0] == 200 and after[1] == want_after)
    out["pass"] = (res[0] == 500 and all(r[2] is not None for r in rest) and health.status_code == 503
                   and new_pid is not None and out["request_after_replacement_ok"])
    return out


async def _run_one(base, body):
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=120) as h:
        return await _post(h, body)


def kill(args, solo):
    import httpx


    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=90)
    bodies = [dict(b, max_tokens=96, temperature=0.2) for b in sc.workload(args.requests, seed=3)]
    want = [solo(b) for b in bodies]
    with sc.server(replicas=2, max_batch=args.max_batch, log_path="/tmp/apd_serve_faults.log",
                   extra=("--max-queue", str(args.max_queue))) as (base, _):
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
        queue = queue_burst(base, solo, 2, args.max_batch, args.max_queue)
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
    return dict(summary, queue=queue, **{"pass": bool(ok)})


if __name__ == "__main__":
    sys.exit(main())
