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
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from apd_ext import tiny
from apd_ext.cli import main as apd_main
from qwen_vocab import write_real_vocab_pair
from serve_utils import apd_serve

httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve")

QUESTIONS = ["Rosa has 13 apples. Zoe gives her 7 apples. How many apples does Rosa have now?",
             "Sam has 9 pencils. He loses 4 pencils. How many pencils does Sam have now?"]


@pytest.fixture(scope="module", params=["tiny", "qwen"])
def dirs(request, tmp_path_factory):
    """(dllm_dir, ar_dir): the embedded tiny pair as shipped (its own chat
    template), or the random tiny pair at the real Qwen vocabulary (Qwen2.5's
    chat template)."""
    root = tmp_path_factory.mktemp("serve")
    if request.param == "qwen":
        return write_real_vocab_pair(root)
    d, a = tiny.paths()
    shutil.copytree(d, root / "dllm")
    return str(root / "dllm"), str(a)


@pytest.fixture(scope="module")
def server(dirs):
    log = os.path.join(os.path.dirname(dirs[0]), "serve.log")
    with apd_serve(dirs[0], dirs[1], log, "--max-batch", "8", "--max-len", "256", "--M", "32") as (base, _, _):
        yield base


@pytest.fixture(scope="module", autouse=True)
def _shared_loads():
    """`apd generate` (run in this process by _apd_generate, ~16 times per pair)
    loads the tokenizer and both models on every call: 3.3 s of a 16 s call on
    the real vocabulary (its 18 MB tokenizer.json). Share them per folder for
    the module; generation only reads them."""
    import functools

    import apd_ext
    from apd_ext import cli

    mp = pytest.MonkeyPatch()
    mp.setattr(cli, "_load_tokenizer", functools.lru_cache(maxsize=None)(cli._load_tokenizer))
    mp.setattr(apd_ext, "load_model", functools.lru_cache(maxsize=None)(apd_ext.load_model))
    yield
    mp.undo()


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
    # streamed block by block: several chunks whenever the answer took several steps
    assert len(chunks) >= min(2, len(want["accepted_per_step"])), (len(chunks), want["accepted_per_step"])
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
    ("R above 1", dict(prompt="x", R=1.5), "R"),
    ("R wrong type", dict(prompt="x", R="high"), "R"),
    ("W zero", dict(prompt="x", W=0), "W"),
    ("M zero", dict(prompt="x", M=0), "M"),
    ("M beyond the server's", dict(prompt="x", M=33), "M"),
    ("negative temperature", dict(prompt="x", temperature=-0.1), "temperature"),
    ("top_p zero", dict(prompt="x", top_p=0.0), "top_p"),
    ("top_p above 1", dict(prompt="x", top_p=1.5), "top_p"),
    ("max_tokens zero", dict(prompt="x", max_tokens=0), "max_tokens"),
    ("max_tokens past the context", dict(prompt="Question: hi\nAnswer:\n", max_tokens=255), "max_tokens"),
    ("max_tokens far past the context", dict(prompt="x", max_tokens=10_000_000), "max_tokens"),
    ("max_completion_tokens past the context", dict(prompt="x", max_completion_tokens=300), "max_completion_tokens"),
    ("max_completion_tokens zero", dict(prompt="x", max_completion_tokens=0), "max_completion_tokens"),
    ("presence_penalty", dict(prompt="x", presence_penalty=0.5), "presence_penalty"),
    ("frequency_penalty", dict(prompt="x", frequency_penalty=-1), "frequency_penalty"),
    ("logit_bias", dict(prompt="x", logit_bias={"5": 10}), "logit_bias"),
    ("echo", dict(prompt="x", echo=True), "echo"),
    ("bad stream_options", dict(prompt="x", stream=True, stream_options={"include_usage": "yes"}), "stream_options"),
    ("empty prompt", dict(prompt=""), "prompt"),
    ("missing prompt", dict(max_tokens=4), "prompt"),
    ("prompt too long", dict(prompt=LONG, max_tokens=4), "prompt"),
    ("negative seed", dict(prompt="x", seed=-1), "seed"),
    ("n above 16", dict(prompt="x", n=17), "n"),
    ("n zero", dict(prompt="x", n=0), "n"),
    ("another method", dict(prompt="x", method="ar"), "method"),
    ("empty stop", dict(prompt="x", stop=["\n", ""]), "stop"),
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
    from apd_ext import Engine
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


def _client(server):
    openai = pytest.importorskip("openai")
    return openai, openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_stream_options_n_and_max_completion_tokens(server, dirs):
    """What stock SDKs send: stream_options.include_usage gives a last chunk
    with empty choices and the usage; n = 3 gives 3 choices, choice i being
    the request with seed + i; max_completion_tokens is max_tokens."""
    openai, client = _client(server)
    k = KNOBS[0]
    prompt = f"Question: {QUESTIONS[1]}\nAnswer:\n"
    extra = dict(R=k["R"], W=k["W"], M=k["M"])
    want = [_apd_generate(dirs, prompt, **_cli_kw(dict(k, seed=k["seed"] + i, max_tokens=12))) for i in range(3)]
    c = client.completions.create(model="apd", prompt=prompt, max_tokens=12, temperature=k["temperature"],
                                  top_p=k["top_p"], seed=k["seed"], n=3, presence_penalty=0, frequency_penalty=0,
                                  user="u1", extra_body=extra)
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    assert [ch.text for ch in c.choices] == [w["text"] for w in want]
    assert c.usage.completion_tokens == sum(w["num_generated"] for w in want)
    chat = client.chat.completions.create(model="apd", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                          max_completion_tokens=12, temperature=k["temperature"], top_p=k["top_p"],
                                          seed=k["seed"], extra_body=extra)
    want_chat = _apd_generate(dirs, QUESTIONS[1], chat=True, **_cli_kw(dict(k, max_tokens=12)))
    assert chat.choices[0].message.content == want_chat["text"]
    assert chat.usage.completion_tokens == want_chat["num_generated"]
    stream = client.chat.completions.create(
        model="apd", messages=[{"role": "user", "content": QUESTIONS[1]}], max_completion_tokens=12,
        temperature=k["temperature"], top_p=k["top_p"], seed=k["seed"], n=2, stream=True,
        stream_options={"include_usage": True}, extra_body=extra)
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    texts = ["", ""]
    for ch in chunks[:-1]:
        for cc in ch.choices:
            texts[cc.index] += cc.delta.content or ""
    assert texts[0] == want_chat["text"]
    assert chunks[-1].usage.completion_tokens == want_chat["num_generated"] + \
        _apd_generate(dirs, QUESTIONS[1], chat=True, **_cli_kw(dict(k, seed=k["seed"] + 1, max_tokens=12)))["num_generated"]
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model="apd", prompt=prompt, max_tokens=4, presence_penalty=0.5)


def test_unknown_fields_are_ignored_with_a_warning_header(server):
    r = httpx.post(server + "/v1/completions", json=dict(prompt="Question: hi\nAnswer:\n", max_tokens=4, seed=1,
                                                         frobnicate=1, another_one=None), timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-apd-ignored-fields"] == "another_one,frobnicate"


def test_seed_drawn_per_request_and_returned_for_replay(server):
    # An off-task prompt: on its own task the fine-tuned tiny pair is near-certain
    # even at temperature 1 (two seeds gave the same 16 tokens).
    body = dict(prompt="Question: zebra\nAnswer:\n", max_tokens=16, temperature=1.0, top_p=1.0)
    a, b = (httpx.post(server + "/v1/completions", json=body, timeout=60).json() for _ in range(2))
    assert a["seed"] != b["seed"]
    assert a["choices"][0]["text"] != b["choices"][0]["text"]  # 16 tokens at temperature 1: a tie is ~impossible
    r = httpx.post(server + "/v1/completions", json=dict(body, seed=a["seed"]), timeout=60)
    assert r.json()["choices"][0]["text"] == a["choices"][0]["text"] and r.headers["x-apd-seed"] == str(a["seed"])


def test_multi_token_stop_string(server, dirs):
    """A stop string of several tokens ends the request at the step that
    produces it, the text cut before it (finish_reason "stop"), streamed or not."""
    prompt = f"Question: {QUESTIONS[0]}\nAnswer:\n"
    body = dict(prompt=prompt, **dict(KNOBS[1], max_tokens=40))
    from transformers import AutoTokenizer

    free_out = httpx.post(server + "/v1/completions", json=body, timeout=60).json()
    free = free_out["choices"][0]["text"]
    tok = AutoTokenizer.from_pretrained(dirs[0], local_files_only=True)
    stop = next(free[i:i + 4] for i in range(len(free) // 4, len(free) - 4)
                if len(tok(free[i:i + 4], add_special_tokens=False)["input_ids"]) >= 2 and "\ufffd" not in free[i:i + 4])
    out = httpx.post(server + "/v1/completions", json=dict(body, stop=["never there", stop]), timeout=60).json()
    assert out["choices"][0]["text"] == free[: free.find(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["steps"] <= free_out["usage"]["steps"]
    assert out["usage"]["accepted_per_step"] == free_out["usage"]["accepted_per_step"][: out["usage"]["steps"]]
    with httpx.stream("POST", server + "/v1/completions", json=dict(body, stop=[stop], stream=True),
                      timeout=60) as resp:
        chunks = _sse(resp)
    assert "".join(c["choices"][0]["text"] for c in chunks) == free[: free.find(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


CJK = ["你好，世界。今天天气很好。", "emoji 🙂👍🏽 and ZWJ 👨‍👩‍👧", "日本語のテキストと한국어 텍스트"]


def test_streamed_deltas_join_to_the_text_with_cjk_and_emoji(server):
    """Sampled requests with CJK / emoji prompts, streamed and not, same seed:
    the deltas joined equal the non-streamed text and no delta repeats text
    (the old stream re-sent everything after a U+FFFD tail)."""
    for i in range(9):
        body = dict(prompt=CJK[i % 3], max_tokens=24, temperature=1.0, top_p=1.0, seed=100 + i)
        text = httpx.post(server + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        with httpx.stream("POST", server + "/v1/completions", json=dict(body, stream=True), timeout=60) as resp:
            deltas = [c["choices"][0]["text"] for c in _sse(resp)]
        assert "".join(deltas) == text, (i, deltas, text)
        assert all(not d.endswith("\ufffd") for d in deltas[:-1])


def test_openai_client_logprobs(server):
    """logprobs (completions: top-k count; chat: logprobs + top_logprobs): one
    entry per generated token with its log-probability under the target
    distribution it was checked against and the top alternatives, the token's
    own value among them when it is the most likely."""
    openai, client = _client(server)
    prompt = f"Question: {QUESTIONS[0]}\nAnswer:\n"
    c = client.completions.create(model="apd", prompt=prompt, max_tokens=10, temperature=0.0, seed=1, logprobs=2)
    lp = c.choices[0].logprobs
    n = c.usage.completion_tokens - (c.choices[0].finish_reason == "stop")  # the EOS id has no entry
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n > 0
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)
    assert all(max(t.values()) >= v - 1e-6 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model="apd", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                          max_completion_tokens=10, temperature=0.0, seed=1, logprobs=True,
                                          top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens - (chat.choices[0].finish_reason == "stop")
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in content)
    stream = client.completions.create(model="apd", prompt=prompt, max_tokens=10, temperature=0.0, seed=1,
                                       logprobs=2, stream=True)
    streamed = [v for ch in stream for v in (ch.choices[0].logprobs.token_logprobs if ch.choices and
                                             ch.choices[0].logprobs else [])]
    assert streamed == lp.token_logprobs
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="apd", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       logprobs=True, top_logprobs=21)
