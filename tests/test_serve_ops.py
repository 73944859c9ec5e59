"""Operations of one serving replica, in process (no Ray; the Ray side is
tests/test_serve_ray_ops.py): APDServer's routes mounted on a FastAPI app and
driven through httpx's ASGI transport, on the shipped tiny pair (CPU).

- a request whose dLLM row is bad (non-finite logits, or a forward that
  raises for it) fails alone: a 500 or an error chunk with finish_reason
  "error"; the others, live beside it, get their solo text;
- a fatal device error fails every in-flight request at once (no hang),
  /health is 503 and check_health raises (Ray Serve replaces the replica),
  new requests are 503;
- a full queue answers 429 with Retry-After, and every admitted request
  completes (none lost);
- a request past --request-timeout is a 504 (an error chunk when streamed)
  and its row is freed;
- drain: new requests 503, in-flight ones finish (or fail at the deadline);
- /metrics is the Prometheus text format with the serving figures.
Faults come from test-only model wrappers (tests/faults.py)."""
import asyncio
import json

import pytest
import torch

import apd_ext
from apd_ext import tiny
from apd_ext.config import APDConfig

httpx = pytest.importorskip("httpx")
fastapi = pytest.importorskip("fastapi")
prom_parser = pytest.importorskip("prometheus_client.parser")

from faults import FaultyModel, SlowModel  # noqa: E402

BUDGET = 60  # seconds any one scenario may take (bounded waits everywhere)


@pytest.fixture(scope="module")
def pair(tiny_pair_fp32):
    return tiny_pair_fp32


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


@pytest.fixture(scope="module")
def questions():
    with open(tiny.test_file()) as f:
        return [json.loads(line)["question"] + " Answer:" for _, line in zip(range(16), f)]


def make_server(pair, wrap=None, **kw):
    """An APDServer on the tiny pair; wrap(dllm) -> the dLLM its Engine runs
    (a fault wrapper), and the FastAPI app with its routes."""
    from apd_ext import Engine
    from apd_ext.serve.app import APDServer
    from apd_ext.serve.loop import StepLoop

    d, a = tiny.paths()
    opts = dict(max_batch=kw.pop("max_batch", 4), max_len=256, M=32)
    srv = APDServer(d, a, threads=1, **opts, **kw)
    if wrap is not None:  # the same Engine over a faulty dLLM (test-only injection)
        srv.engine = Engine(wrap(srv.dllm), srv.verifier, srv.engine.config, max_batch=opts["max_batch"],
                            max_len=256, tokenizer=srv.tok)  # as the server builds it
        srv.loop = StepLoop(srv.engine, max_queue=kw.get("max_queue", 0), metrics=srv.metrics)
    app = fastapi.FastAPI()
    app.post("/v1/completions")(srv.completions)
    app.get("/health")(srv.health)
    app.get("/metrics")(srv.metrics_text)
    return srv, app


def body(q, i, **kw):
    return dict(dict(prompt=q, max_tokens=24 + 4 * (i % 5), temperature=0.0 if i % 2 else 0.7, top_p=0.95,
                     seed=100 + i, R=0.7, W=[4, 16, None][i % 3], M=[8, 16][i % 2]), **kw)


def solo_text(pair, tok, b):
    ids = tok(b["prompt"], add_special_tokens=False)["input_ids"]
    cfg = APDConfig(R=b["R"], W=b["W"], M=b["M"], temperature=b["temperature"], top_p=b["top_p"], seed=b["seed"],
                    max_new_tokens=b["max_tokens"])
    out = apd_ext.generate(pair[0], pair[1], [ids], cfg).generated(0).tolist()
    eos = set(pair[0].config.eos_token_ids)
    return tok.decode([t for t in out if t not in eos], skip_special_tokens=True)


def long_bodies(pair, tok, questions, min_steps, k, **kw):
    """k bodies whose solo run takes at least min_steps steps (so that with a
    slowed model they surely outlast a timeout or a drain deadline)."""
    out = []
    for i, q in enumerate(questions):
        b = body(q, i, **dict(dict(max_tokens=200), **kw))
        ids = tok(b["prompt"], add_special_tokens=False)["input_ids"]
        cfg = APDConfig(R=b["R"], W=b["W"], M=b["M"], temperature=b["temperature"], top_p=b["top_p"],
                        seed=b["seed"], max_new_tokens=b["max_tokens"])
        if len(apd_ext.generate(pair[0], pair[1], [ids], cfg).accepted_per_step[0]) >= min_steps:
            out.append(b)
        if len(out) == k:
            return out
    raise AssertionError(f"no {k} prompts of {min_steps}+ steps among {len(questions)}")


async def post(http, b):
    """(status, text or None, error message or None, finish_reason, headers) of one request."""
    if not b.get("stream"):
        r = await http.post("/v1/completions", json=b)
        j = r.json()
        if r.status_code != 200:
            return r.status_code, None, j["error"]["message"], None, r.headers
        return 200, j["choices"][0]["text"], None, j["choices"][0]["finish_reason"], r.headers
    text, err, reason, done = [], None, None, False
    async with http.stream("POST", "/v1/completions", json=b) as r:
        if r.status_code != 200:
            return r.status_code, None, json.loads(await r.aread())["error"]["message"], None, r.headers
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                ch = json.loads(line[6:])
                text.append(ch["choices"][0]["text"])
                reason = ch["choices"][0]["finish_reason"] or reason
                if "error" in ch:
                    err = ch["error"]["message"]
    assert done, "stream ended without [DONE]"
    return 200, None if err else "".join(text), err, reason, r.headers


def run(app, coro_fn):
    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=BUDGET) as http:
            return await asyncio.wait_for(coro_fn(http), BUDGET)
    return asyncio.run(main())


def marked_prompt(tok, q):
    """A prompt whose first token is the fault wrappers' marker (see tests/faults.py)."""
    text = "# " + q
    return text, tok(text, add_special_tokens=False)["input_ids"][0]


@pytest.mark.parametrize("mode", ["nan_logits", "raise"])
def test_a_bad_row_fails_alone_among_live_requests(pair, tok, questions, mode):
    """8 concurrent requests (half streamed), one marked: it fails (500, or an
    error chunk with finish_reason "error"); the 7 others get their solo text.
    nan_logits checks the non-finite row check; raise checks the bisection."""
    bad_text, marker = marked_prompt(tok, questions[0])
    assert all(tok(q, add_special_tokens=False)["input_ids"][0] != marker for q in questions)
    srv, app = make_server(pair, wrap=lambda m: FaultyModel(m, marker, mode), max_batch=8)
    bodies = [body(questions[i], i, stream=bool(i % 2)) for i in range(8)]
    bodies[3] = dict(bodies[3], prompt=bad_text)

    async def go(http):
        return await asyncio.gather(*(post(http, b) for b in bodies))

    res = run(app, go)
    for i, (status, text, err, reason, _) in enumerate(res):
        if i == 3:
            assert (status, reason) == (200, "error") and err, res[i]  # streamed: error chunk
        else:
            assert status == 200 and err is None and text == solo_text(pair, tok, bodies[i]), (i, res[i])
    assert srv.loop.fatal is None and srv.engine.num_live == 0 and srv.engine.reserved == 0
    bad = dict(bodies[3], stream=False)
    status, _, err, _, _ = run(app, lambda http: post(http, bad))
    assert status == 500 and ("not finite" in err if mode == "nan_logits" else "injected fault" in err)


def test_fatal_error_fails_in_flight_and_marks_unhealthy(pair, tok, questions):
    bad_text, marker = marked_prompt(tok, questions[0])
    srv, app = make_server(pair, wrap=lambda m: SlowModel(FaultyModel(m, marker, "fatal"), 0.1))
    slow = long_bodies(pair, tok, questions[1:], 12, 2)  # >= 1.2 s each: still live when the fault hits

    async def go(http):
        first = [asyncio.create_task(post(http, dict(b, stream=bool(i % 2)))) for i, b in enumerate(slow, 1)]
        await asyncio.sleep(0.3)  # both live
        res = await asyncio.gather(post(http, body(bad_text, 3)), *first)
        health = await http.get("/health")
        after = await post(http, body(questions[4], 4))
        return res, health, after

    res, health, after = run(app, go)
    assert [r[0] for r in res] == [500, 200, 500] and res[1][3] == "error"  # the streamed one: an error chunk
    assert all("device failed" in r[2] for r in res)
    assert health.status_code == 503 and health.json()["status"] == "unhealthy"
    assert after[0] == 503 and "unhealthy" in after[2]
    with pytest.raises(RuntimeError, match="unhealthy"):
        srv.check_health()


def test_full_queue_is_429_and_no_admitted_request_is_lost(pair, tok, questions):
    """max_batch 2 + max_queue 3; 10 requests at once (twice the limit): the
    excess gets 429 with Retry-After, every admitted one its solo text."""
    srv, app = make_server(pair, max_batch=2, max_queue=3)
    bodies = [body(questions[i], i, max_tokens=48) for i in range(10)]

    async def go(http):
        return await asyncio.gather(*(post(http, b) for b in bodies))

    res = run(app, go)
    ok = [i for i, r in enumerate(res) if r[0] == 200]
    busy = [i for i, r in enumerate(res) if r[0] == 429]
    assert len(ok) + len(busy) == 10 and len(ok) >= 5 and busy, [r[:3] for r in res]
    assert all(int(res[i][4]["retry-after"]) >= 1 for i in busy)
    for i in ok:
        assert res[i][1] == solo_text(pair, tok, bodies[i]), i
    metrics = _scrape(app)
    assert metrics[("apd_requests_total", "rejected_queue_full")] == len(busy)
    assert metrics[("apd_requests_total", "length")] + metrics[("apd_requests_total", "stop")] == len(ok)


def test_request_timeout_frees_the_row(pair, tok, questions):
    srv, app = make_server(pair, wrap=lambda m: SlowModel(m, 0.1), request_timeout=0.6)
    slow = long_bodies(pair, tok, questions, 12, 2)  # >= 1.2 s each with 0.1 s per step

    async def go(http):
        res = await asyncio.gather(post(http, slow[0]), post(http, dict(slow[1], stream=True)))
        for _ in range(100):  # the rows are freed at the next step boundary
            if srv.engine.num_live == 0:
                break
            await asyncio.sleep(0.05)
        return res

    res = run(app, go)
    assert res[0][0] == 504 and "timeout" in res[0][2]
    assert res[1][0] == 200 and res[1][3] == "error" and "timeout" in res[1][2]
    assert srv.engine.num_live == 0 and srv.engine.reserved == 0
    assert _scrape(app)[("apd_requests_total", "timeout")] == 2


def test_drain_finishes_in_flight_and_refuses_new(pair, tok, questions):
    srv, app = make_server(pair, wrap=lambda m: SlowModel(m, 0.05))
    # >= 8 steps of >= 0.05 s: all three are still in flight when the drain starts
    bodies = [dict(b, stream=bool(i % 2)) for i, b in enumerate(long_bodies(pair, tok, questions, 8, 3))]

    async def go(http):
        flight = [asyncio.create_task(post(http, b)) for b in bodies]
        await asyncio.sleep(0.2)
        drain = asyncio.create_task(srv.drain(30))
        await asyncio.sleep(0)
        refused = await post(http, body(questions[5], 5))
        health = await http.get("/health")
        return await asyncio.gather(*flight), await drain, refused, health

    res, drained, refused, health = run(app, go)
    for b, r in zip(bodies, res):
        assert r[0] == 200 and r[1] == solo_text(pair, tok, b)
    assert drained["finished"] == 3 and drained["failed"] == 0
    assert refused[0] == 503 and "draining" in refused[2] and int(refused[4]["retry-after"]) >= 1
    assert health.status_code == 503 and health.json()["status"] == "draining"
    srv.check_health()  # draining is not unhealthy: Serve must not replace a draining replica

    # The deadline: what is still running then fails (an error, not a hang).
    srv2, app2 = make_server(pair, wrap=lambda m: SlowModel(m, 0.1))
    slow = long_bodies(pair, tok, questions, 12, 1)[0]  # >= 1.2 s with 0.1 s per step

    async def go2(http):
        flight = asyncio.create_task(post(http, slow))
        await asyncio.sleep(0.3)
        return await srv2.drain(0.3), await flight

    drained, r = run(app2, go2)
    assert drained == {"finished": 0, "failed": 1, "replica_pid": drained["replica_pid"]}
    assert r[0] == 500 and "shut down" in r[2]


def _scrape(app) -> dict:
    """{(metric sample name, status or ''): value} from GET /metrics."""
    async def go(http):
        r = await http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return r.text
    out = {}
    for fam in prom_parser.text_string_to_metric_families(run(app, go)):
        for s in fam.samples:
            out[(s.name, s.labels.get("status", s.labels.get("le", "")))] = s.value
    return out


def test_metrics_after_a_load(pair, tok, questions):
    srv, app = make_server(pair, max_batch=4)
    bodies = [body(questions[i], i, stream=bool(i % 2)) for i in range(6)]

    async def go(http):
        return await asyncio.gather(*(post(http, b) for b in bodies))

    res = run(app, go)
    assert all(r[0] == 200 for r in res)
    m = _scrape(app)
    done = m[("apd_requests_total", "length")] + m[("apd_requests_total", "stop")]
    assert done == 6 and m[("apd_requests_total", "error")] == 0
    assert m[("apd_time_to_first_block_seconds_count", "")] == 6
    steps = m[("apd_steps_total", "")]
    assert steps == srv.loop.steps and m[("apd_step_seconds_count", "")] == steps
    assert m[("apd_tokens_per_dllm_forward_count", "")] == steps
    # every committed token is counted once, in one block of its request
    assert m[("apd_accepted_block_length_sum", "")] == m[("apd_tokens_per_dllm_forward_sum", "")] > 0
    assert m[("apd_live_rows", "")] == 0 and m[("apd_queue_length", "")] == 0 and m[("apd_healthy", "")] == 1


def test_step_loop_survives_an_exception_escaping_the_engine(pair, tok, questions):
    """An exception out of Engine.step itself (past its per-request
    containment: a bug) fails the requests live in that step; the loop goes
    on and serves the next request (test-only Engine subclass)."""
    from apd_ext import Engine
    from apd_ext.errors import RequestFailed
    from apd_ext.serve.loop import StepLoop

    class BrokenOnce(Engine):
        broken = True

        def step(self):
            if self.broken and self.num_live:
                BrokenOnce.broken = False
                raise KeyError("injected bug in step")
            return super().step()

    engine = BrokenOnce(*pair, APDConfig(M=16), max_batch=4, max_len=256)
    ids = [tok(q, add_special_tokens=False)["input_ids"] for q in questions[:3]]
    params = dict(max_new_tokens=12, seed=1, stop_token_ids=[])

    async def drain_one(q):
        toks = []
        while True:
            o = await asyncio.wait_for(q.get(), BUDGET)
            if isinstance(o, Exception):
                return o
            toks += o.new_tokens
            if o.finished:
                return toks

    async def go():
        loop = StepLoop(engine)
        first = [loop.submit(i, params) for i in ids[:2]]
        failed = [await drain_one(q) for _, q in first]
        rid, q = loop.submit(ids[2], params)
        return failed, await drain_one(q), loop

    failed, after, loop = asyncio.run(go())
    assert all(isinstance(f, RequestFailed) and "injected bug" in str(f) for f in failed)
    p = dict(params)
    p.pop("stop_token_ids")
    assert after == apd_ext.generate(*pair, [ids[2]], APDConfig(**p), eos_token_ids=[]).generated(0).tolist()
    assert loop.fatal is None and engine.num_live == 0 and engine.reserved == 0
