"""`apd serve` on 127.0.0.1 with the shipped tiny pair (CPU): completions and
chat completions, streamed and not, give `apd generate`'s text for the same
seed and knobs; so does the openai client; concurrent requests do not disturb
each other; every bad request is a 400 naming the field. One server (module
fixture) serves every test; it starts with a bounded wait and is torn down
with its whole process group."""
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from apd_ext import tiny
from apd_ext.cli import main as apd_main

httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve")

CHAT_TEMPLATE = ("{% for m in messages %}Question: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}Answer:\n{% endif %}")
QUESTIONS = ["Rosa has 13 apples. Zoe gives her 7 apples. How many apples does Rosa have now?",
             "Sam has 9 pencils. He loses 4 pencils. How many pencils does Sam have now?"]
START_TIMEOUT = 150  # seconds: Ray's start on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(dllm_dir, ar_dir): the tiny pair, the dLLM's tokenizer given a chat template."""
    d, a = tiny.paths()
    root = tmp_path_factory.mktemp("serve") / "dllm"
    shutil.copytree(d, root)
    cfg_path = root / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return str(root), str(a)


@pytest.fixture(scope="module")
def server(dirs):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    log = open(os.path.join(os.path.dirname(dirs[0]), "serve.log"), "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "apd_ext.cli", "serve", "--dllm", dirs[0], "--verifier", dirs[1], "--port", str(port),
         "--host", "127.0.0.1", "--threads", "1", "--max-batch", "8", "--max-len", "256", "--M", "32",
         "--num-cpus", "2"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"apd serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"apd serve not healthy after {START_TIMEOUT} s")
            time.sleep(1)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's workers share the group
        proc.wait(timeout=10)
        log.close()


def _apd_generate(dirs, text, chat=False, **kw):
    """`apd generate --json` in this process (one thread, as the server)."""
    argv = ["generate", "--dllm", dirs[0], "--verifier", dirs[1], "--prompt", text, "--json"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    if chat:
        argv.append("--chat")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            assert apd_main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(buf.getvalue())


KNOBS = [dict(R=0.7, W=4, M=16, temperature=0.2, top_p=0.95, seed=3, max_tokens=48),
         dict(R=0.9, W=16, M=32, temperature=0.9, top_p=1.0, seed=11, max_tokens=40)]


def _cli_kw(k):
    k = dict(k)
    k["max_new_tokens"] = k.pop("max_tokens")
    return k


def _sse(resp):
    chunks = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            chunks.append(line[len("data: "):])
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1]]


@pytest.mark.parametrize("i", [0, 1])
def test_completions_equal_apd_generate(server, dirs, i):
    prompt = f"Question: {QUESTIONS[i]}\nAnswer:\n"
    want = _apd_generate(dirs, prompt, **_cli_kw(KNOBS[i]))
    assert want["num_generated"] > 4 and want["text"]  # a real answer to compare, not an empty one
    r = httpx.post(server + "/v1/completions", json=dict(prompt=prompt, **KNOBS[i]), timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == want["text"]
    u = out["usage"]
    assert u["accepted_per_step"] == want["accepted_per_step"] and u["steps"] == len(want["accepted_per_step"])
    assert u["completion_tokens"] == want["num_generated"] and u["prompt_tokens"] == want["prompt_tokens"]
    assert out["choices"][0]["finish_reason"] == ("stop" if want["stopped_at_eos"] else "length")
    with httpx.stream("POST", server + "/v1/completions", json=dict(prompt=prompt, stream=True, **KNOBS[i]),
                      timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(resp)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want["text"]
    assert len(chunks) > 1  # streamed block by block
    assert chunks[-1]["usage"]["accepted_per_step"] == want["accepted_per_step"]


def test_chat_completions_equal_apd_generate_chat(server, dirs):
    want = _apd_generate(dirs, QUESTIONS[1], chat=True, **_cli_kw(KNOBS[0]))
    body = dict(messages=[{"role": "user", "content": QUESTIONS[1]}], **KNOBS[0])
    out = httpx.post(server + "/v1/chat/completions", json=body, timeout=60).json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": want["text"]}
    with httpx.stream("POST", server + "/v1/chat/completions", json=dict(body, stream=True), timeout=60) as resp:
        chunks = _sse(resp)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want["text"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_openai_client(server, dirs):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["apd"]
    k = KNOBS[1]
    prompt = f"Question: {QUESTIONS[0]}\nAnswer:\n"
    want = _apd_generate(dirs, prompt, **_cli_kw(k))
    extra = dict(R=k["R"], W=k["W"], M=k["M"])
    c = client.completions.create(model="apd", prompt=prompt, max_tokens=k["max_tokens"], temperature=k["temperature"],
                                  top_p=k["top_p"], seed=k["seed"], extra_body=extra)
    assert c.choices[0].text == want["text"] and c.usage.completion_tokens == want["num_generated"]
    stream = client.completions.create(model="apd", prompt=prompt, max_tokens=k["max_tokens"],
                                       temperature=k["temperature"], top_p=k["top_p"], seed=k["seed"],
                                       extra_body=extra, stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == want["text"]
    want_chat = _apd_generate(dirs, QUESTIONS[0], chat=True, **_cli_kw(k))
    chat = client.chat.completions.create(model="apd", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                          max_tokens=k["max_tokens"], temperature=k["temperature"],
                                          top_p=k["top_p"], seed=k["seed"], extra_body=extra)
    assert chat.choices[0].message.content == want_chat["text"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="apd", prompt=prompt, max_tokens=8, extra_body=dict(R=2.0))


LONG = "Question: " + "one two three " * 200 + "\nAnswer:\n"
BAD = [
    ("unknown field", dict(prompt="x", frobnicate=1), "frobnicate"),
    ("R above 1", dict(prompt="x", R=1.5), "R"),
    ("R wrong type", dict(prompt="x", R="high"), "R"),
    ("W zero", dict(prompt="x", W=0), "W"),
    ("M zero", dict(prompt="x", M=0), "M"),
    ("M beyond the server's", dict(prompt="x", M=33), "M"),
    ("negative temperature", dict(prompt="x", temperature=-0.1), "temperature"),
    ("top_p zero", dict(prompt="x", top_p=0.0), "top_p"),
    ("top_p above 1", dict(prompt="x", top_p=1.5), "top_p"),
    ("max_tokens zero", dict(prompt="x", max_tokens=0), "max_tokens"),
    ("max_tokens past the context", dict(prompt="Question: hi\nAnswer:\n", max_tokens=250), "max_tokens"),
    ("empty prompt", dict(prompt=""), "prompt"),
    ("missing prompt", dict(max_tokens=4), "prompt"),
    ("prompt too long", dict(prompt=LONG, max_tokens=4), "prompt"),
    ("negative seed", dict(prompt="x", seed=-1), "seed"),
    ("n above 1", dict(prompt="x", n=2), "n"),
    ("another method", dict(prompt="x", method="ar"), "method"),
    ("multi-token stop", dict(prompt="x", stop=["apples and"]), "stop"),
    ("wrong model", dict(prompt="x", model="gpt-4"), "model"),
]


def test_bad_requests_get_400_naming_the_field(server):
    def post(item):
        name, body, field = item
        return name, field, httpx.post(server + "/v1/completions", json=body, timeout=30)

    for name, field, r in map(post, BAD):
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        assert err["param"] == field and err["message"].startswith(field + ":"), (name, err)
    raw = [(b'{"prompt": "\xff\xfe"}', "body"), (b'{"prompt": ', "body"), (b'[1, 2]', "body")]
    for data, field in raw:
        r = httpx.post(server + "/v1/completions", content=data, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    chat_bad = [dict(messages=[]), dict(messages=[{"role": "robot", "content": "x"}]), dict(messages="hi")]
    for body in chat_bad:
        r = httpx.post(server + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages"), r.text


def test_concurrent_requests_and_bad_ones_do_not_disturb_each_other(server, dirs):
    prompt = f"Question: {QUESTIONS[0]}\nAnswer:\n"
    good = [dict(KNOBS[0], seed=s, max_tokens=24) for s in range(6)]
    want = [_apd_generate(dirs, prompt, **_cli_kw(k))["text"] for k in good]
    jobs = [("good", dict(prompt=prompt, **k)) for k in good] + [("bad", b) for _, b, _ in BAD[:6]]

    def post(job):
        return job[0], httpx.post(server + "/v1/completions", json=job[1], timeout=60)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(post, jobs))
    texts = [r.json()["choices"][0]["text"] for kind, r in results if kind == "good"]
    assert texts == want
    assert all(r.status_code == 400 for kind, r in results if kind == "bad")
    health = httpx.get(server + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["live"] == 0 and health["queued"] == 0


def test_step_loop_cancel_frees_the_row_and_spares_the_others():
    """The replica's step loop in process: a client that goes away (cancel)
    leaves the Engine at the next step boundary; the others are unaffected."""
    import asyncio

    import apd_ext
    from apd_ext import generate
    from apd_ext.config import APDConfig
    from apd_ext.engine import Engine
    from apd_ext.serve.loop import StepLoop

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d, a = tiny.paths()
        dllm, ver = apd_ext.load_model(d, dtype=torch.float32), apd_ext.load_model(a, dtype=torch.float32)
        tok = tiny.tokenizer()
        ids = tok(f"Question: {QUESTIONS[0]}\nAnswer:\n", add_special_tokens=False)["input_ids"]
        params = [dict(R=0.3, W=4, M=4, temperature=0.9, seed=s, max_new_tokens=60, stop_token_ids=[])
                  for s in range(3)]

        async def scenario():
            engine = Engine(dllm, ver, APDConfig(M=8), max_batch=4, max_len=128)
            loop = StepLoop(engine)
            subs = [loop.submit(ids, p) for p in params]
            got = {rid: [] for rid, _ in subs}
            first = await asyncio.wait_for(subs[0][1].get(), 30)
            got[subs[0][0]] += first.new_tokens
            loop.cancel(subs[0][0])
            for rid, q in subs[1:]:
                while True:
                    o = await asyncio.wait_for(q.get(), 30)
                    got[rid] += o.new_tokens
                    if o.finished:
                        break
            return engine, loop, subs, got

        engine, loop, subs, got = asyncio.run(scenario())
        assert engine.num_live == 0 and engine.num_queued == 0 and engine.reserved == 0
        assert subs[0][1].empty() and not loop.streams  # nothing more for the cancelled one
        assert len(got[subs[0][0]]) < 60
        for (rid, _), p in zip(subs[1:], params[1:]):
            p = dict(p)
            p.pop("stop_token_ids")
            assert got[rid] == generate(dllm, ver, [ids], APDConfig(**p), eos_token_ids=[]).generated(0).tolist()
    finally:
        torch.set_num_threads(threads)
