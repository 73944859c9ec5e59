"""The output path (apd_ext.output): the incremental detokenizer and stop
strings, alone and inside the Engine, on the real Qwen vocabulary (CJK and
emoji split across byte tokens) and on the embedded tiny pair.

Must show: the deltas joined equal the one-shot decode (or the text cut
before the stop string) over 200 sampled requests with CJK / emoji prompts."""
from __future__ import annotations

import random

import pytest
import torch

import apd_ext
from apd_ext import tiny
from apd_ext.config import APDConfig
from apd_ext import Engine
from apd_ext.output.detokenizer import IncrementalDetokenizer
from apd_ext.output.stops import RequestText, check_stop_strings
from qwen_vocab import dream_tokenizer, write_real_vocab_pair

PROMPTS = ["你好，世界。今天天气很好。", "emoji 🙂👍🏽 and ZWJ 👨‍👩‍👧 sequences", "日本語のテキストと한국어 텍스트",
           "Question: Ben has 20 cards. 🃏\nAnswer:\n", "Ünïcödé — “quotes” … ½ ∑ 😀😃😄"]


@pytest.fixture(scope="module", params=["qwen", "tiny"])
def pair(request, tmp_path_factory):
    """(dllm, verifier, tokenizer): the random real-vocabulary pair or the embedded tiny pair."""
    if request.param == "qwen":
        d, a = write_real_vocab_pair(tmp_path_factory.mktemp("qv"))
        tok = dream_tokenizer()
    else:
        d, a = tiny.paths()
        tok = tiny.tokenizer()
    return apd_ext.load_model(d), apd_ext.load_model(a), tok


def _split(rng, ids):
    """ids cut into random blocks of 1..6 (as APD accepts them)."""
    out, i = [], 0
    while i < len(ids):
        k = rng.randint(1, 6)
        out.append(ids[i:i + k])
        i += k
    return out


def test_detokenizer_joins_to_the_full_decode_on_split_characters():
    tok = dream_tokenizer()
    rng = random.Random(0)
    held = 0
    for trial in range(300):
        text = "".join(rng.choice(PROMPTS) for _ in range(2))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        # Mix in random ids (random byte tokens, specials) as a sampled stream would.
        ids = [rng.randrange(151667) if rng.random() < 0.2 else t for t in ids]
        det = IncrementalDetokenizer(tok)
        deltas = []
        for block in _split(rng, ids):
            d = det.update(block)
            assert "\ufffd" not in d[-1:], "an incomplete character was handed out"
            held += d == "" and bool(block)
            deltas.append(d)
        deltas.append(det.finish())
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True), (trial, ids)
    assert held > 0  # some blocks really ended mid-character and were held back


def test_detokenizer_cost_does_not_grow_with_the_text():
    """O(new ids) per update: each decode call sees at most two steps' ids."""
    tok = dream_tokenizer()
    seen = []

    class Spy:
        all_special_ids = tok.all_special_ids

        def decode(self, ids, **kw):
            seen.append(len(ids))
            return tok.decode(ids, **kw)

    ids = tok("你好，世界。" * 200, add_special_tokens=False)["input_ids"]
    det = IncrementalDetokenizer(Spy())
    for i in range(0, len(ids), 3):
        det.update(ids[i:i + 3])
    det.finish()
    assert det.text == "你好，世界。" * 200 and len(ids) > 600
    assert max(seen) <= 12, max(seen)


@pytest.mark.parametrize("stops", [["\n\n"], ["世界", "天气很"], ["Question:", "🙂👍"], ["x" * 40]])
def test_request_text_cuts_before_the_earliest_stop_and_never_retracts(stops):
    tok = dream_tokenizer()
    rng = random.Random(1)
    for trial in range(60):
        text = "".join(rng.choice(PROMPTS + ["\n\n", "x" * 50]) for _ in range(4))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        rt = RequestText(tok, stops)
        deltas, hit = [], False
        blocks = _split(rng, ids)
        for j, block in enumerate(blocks):
            d, hit = rt.update(block, j == len(blocks) - 1)
            deltas.append(d)
            if hit:
                break
        full = tok.decode(ids)
        cuts = [full.find(s) for s in stops if s in full]
        want = full[:min(cuts)] if cuts else full
        assert "".join(deltas) == rt.text == want, (trial, stops)
        assert hit == bool(cuts)


def test_stop_strings_checked():
    assert check_stop_strings(None) == ()
    assert check_stop_strings(["a", "a", "bc"]) == ("a", "bc")
    for bad in ["", [""], [1], 3]:
        with pytest.raises(ValueError, match="^stop:"):
            check_stop_strings(bad)


def _engine(pair, max_batch=8, M=8):
    dllm, ver, tok = pair
    return Engine(dllm, ver, APDConfig(M=M), max_batch=max_batch, max_len=96, tokenizer=tok)


def _run(engine, reqs):
    """reqs: [(prompt_ids, params)] -> {rid: (deltas, per-step token blocks, finish_reason)}."""
    got = {}
    for i, (ids, p) in enumerate(reqs):
        got[engine.add_request(ids, p, request_id=i)] = ([], [], None)
    while engine.has_unfinished():
        for o in engine.step():
            deltas, toks, _ = got[o.request_id]
            deltas.append(o.text)
            toks.append(o.new_tokens)
            got[o.request_id] = (deltas, toks, o.finish_reason if o.finished else None)
    return got


def test_engine_deltas_join_to_the_text_over_200_sampled_requests(pair):
    """200 sampled requests (CJK / emoji prompts, temperature 1, random seeds)
    through the Engine's output path: per request the deltas joined equal
    decode(generated ids without the stop id), the one non-streamed text."""
    dllm, ver, tok = pair
    rng = random.Random(2)
    eos = set(Engine(dllm, ver, APDConfig(M=8), max_batch=1, max_len=8).default_stop)
    checked = split = 0
    for batch in range(10):  # 10 batches of 20: fewer steps than 200 alone, same tokens (batch invariance)
        reqs = []
        for _ in range(20):
            ids = tok(rng.choice(PROMPTS), add_special_tokens=False)["input_ids"][:40]
            reqs.append((ids, dict(temperature=1.0, top_p=1.0, seed=rng.randrange(2**31), R=rng.random(),
                                   max_new_tokens=rng.randint(3, 16))))
        for rid, (deltas, blocks, reason) in _run(_engine(pair, 20, M=4), reqs).items():
            toks = sum(blocks, [])
            body = toks[:next((k for k, t in enumerate(toks) if t in eos), len(toks))]
            assert reason in ("stop", "length")
            assert "".join(deltas) == tok.decode(body, skip_special_tokens=True), (batch, rid, toks)
            split += any(d.endswith("\ufffd") for d in [tok.decode(body[:k]) for k in range(1, len(body))])
            checked += 1
    assert checked == 200
    if len(tok) > 100_000:  # the real vocabulary: some texts really had a character split across tokens
        assert split > 0


def test_engine_stop_string_finishes_the_request_at_its_step(pair):
    """A multi-token stop string ends the request at the step that produces
    it (finish_reason "stop"), the text cut before it; the tokens up to there
    are the run without the stop (batch invariance), and nothing later runs."""
    dllm, ver, tok = pair
    ids = tok(PROMPTS[3], add_special_tokens=False)["input_ids"]
    p = dict(temperature=1.0, seed=5, R=0.5, max_new_tokens=48, stop_token_ids=[])
    free = _run(_engine(pair), [(ids, p)])[0]
    text, free_toks = "".join(free[0]), sum(free[1], [])
    # A stop string taken from the middle of the free run's text: >= 2 tokens long.
    stop = next(text[i:i + 3] for i in range(len(text) // 3, len(text) - 3)
                if len(tok(text[i:i + 3], add_special_tokens=False)["input_ids"]) >= 2 and "\ufffd" not in text[i:i + 3])
    got = _run(_engine(pair), [(ids, dict(p, stop=["never-there", stop]))])[0]
    assert got[2] == "stop" and "".join(got[0]) == text[: text.find(stop)]
    toks = sum(got[1], [])
    assert toks == free_toks[: len(toks)] and len(toks) < len(free_toks)
    # It finished at the step that completed the stop: the steps before it did not hold it.
    assert stop in tok.decode(toks) and stop not in tok.decode(toks[: len(toks) - len(got[1][-1])])


def test_engine_stop_needs_a_tokenizer(pair):
    dllm, ver, _ = pair
    e = Engine(dllm, ver, APDConfig(M=8), max_batch=1, max_len=32)
    with pytest.raises(ValueError, match="^stop:"):
        e.add_request([1, 2], dict(stop=["\n"]))
    with pytest.raises(ValueError, match="^stop:"):
        _engine(pair).add_request([1, 2], dict(stop=[""]))


@pytest.mark.parametrize("method", ["apd", "leftright"])
def test_generate_text_callback_joins_to_the_text(pair, method):
    """generate / generate_leftright with tokenizer= and text_callback: a
    sampled batch of CJK / emoji prompts (ragged, one seed each); per
    sequence the text deltas joined equal decode(its ids before EOS,
    skip_special_tokens=True), no delta ends mid-character, the id callback
    beside it still gets the ids, and the tokens are those of the run
    without any callback. With stop_strings the deltas join to the text cut
    before the stop string."""
    dllm, ver, tok = pair
    prompts = [torch.tensor(tok(p, add_special_tokens=False)["input_ids"][:40]) for p in PROMPTS]
    seeds = [11, 12, 13, 14, 15]
    kw = dict(temperature=1.0, top_p=1.0, max_new_tokens=24, seeds=seeds)

    def run(**extra):
        if method == "apd":
            return apd_ext.generate(dllm, ver, prompts, APDConfig(R=0.6, W=4, M=8), **kw, **extra)
        return apd_ext.generate_leftright(dllm, prompts, K=2, W=4, M=8, **kw, **extra)

    plain = run()
    texts, ids_seen, steps = [[] for _ in prompts], [[] for _ in prompts], []

    def on_text(step, deltas):
        assert len(deltas) == len(prompts) and all(isinstance(d, str) for d in deltas)
        steps.append(step)
        for b, d in enumerate(deltas):
            texts[b].append(d)

    def on_ids(step, blocks):
        for b, blk in enumerate(blocks):
            ids_seen[b] += blk

    out = run(tokenizer=tok, text_callback=on_text, callback=on_ids)
    assert steps == list(range(1, out.stats.steps + 1))
    eos = set(dllm.config.eos_token_ids)
    split = 0
    for b in range(len(prompts)):
        gen = out.generated(b).tolist()
        assert gen == plain.generated(b).tolist() == ids_seen[b]
        body = gen[: next((k for k, t in enumerate(gen) if t in eos), len(gen))]
        assert "".join(texts[b]) == tok.decode(body, skip_special_tokens=True), (b, texts[b])
        assert not any(d.endswith("\ufffd") for d in texts[b][:-1])
        split += any(tok.decode(body[:k]).endswith("\ufffd") for k in range(1, len(body)))
    if len(tok) > 100_000:  # the real vocabulary: a character really was split across tokens (held back)
        assert split > 0
    # Stop strings: the text of two tokens from the middle of the longest answer ends it there, its
    # deltas cut before the stop string's first occurrence (the tiny pair answers CJK briefly).
    r = max(range(len(prompts)), key=lambda b: int(out.num_generated[b]))
    full, body = "".join(texts[r]), out.generated(r).tolist()
    stop = next(p for k in range(len(body) // 3, len(body) - 1) for p in (tok.decode(body[k:k + 2]),)
                if len(p) >= 2 and "\ufffd" not in p and p in full)
    texts = [[] for _ in prompts]
    run(tokenizer=tok, text_callback=on_text, stop_strings=[stop])
    assert "".join(texts[r]) == full[: full.find(stop)]


def test_generate_text_callback_needs_a_tokenizer(pair):
    dllm, ver, tok = pair
    with pytest.raises(ValueError, match="^text_callback: need tokenizer="):
        apd_ext.generate(dllm, ver, [[1, 2, 3]], max_new_tokens=4, text_callback=lambda *a: None)
    with pytest.raises(TypeError, match="^text_callback: expected a callable"):
        apd_ext.generate_leftright(dllm, [[1, 2, 3]], max_new_tokens=4, tokenizer=tok, text_callback="print")


def test_engine_logprobs_are_the_target_distribution(tmp_path):
    """params["logprobs"] = k: per accepted token its log-probability under the
    target distribution it was checked against, with the k most likely ids.
    At R = 0 that target is the verifier's own next-token distribution, so the
    values equal transformers' Qwen2 log_softmax over prompt + generated ids;
    a request beside it without logprobs gets none and the same tokens as alone."""
    from transformers import Qwen2ForCausalLM

    d, a = write_real_vocab_pair(tmp_path)
    tok = dream_tokenizer()
    dllm, ver = apd_ext.load_model(d), apd_ext.load_model(a)
    ids = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    p = dict(R=0.0, temperature=0.0, seed=1, max_new_tokens=12, stop_token_ids=[])
    engine = Engine(dllm, ver, APDConfig(M=8), max_batch=2, max_len=64, tokenizer=tok)
    got = {0: ([], []), 1: ([], [])}
    engine.add_request(ids, dict(p, logprobs=2), request_id=0)
    engine.add_request(ids, dict(p, seed=2), request_id=1)
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id][0].extend(o.new_tokens)
            if o.request_id == 1:
                assert o.logprobs is None
            else:
                assert len(o.logprobs) == len(o.new_tokens)
                got[0][1].extend(o.logprobs)
    toks, lps = got[0]
    hf = Qwen2ForCausalLM.from_pretrained(a).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids + toks])).logits[0].double(), -1)  # [P + n, V_A]
    P = len(ids)
    for j, (t, (lp, top)) in enumerate(zip(toks, lps)):
        row = ref[P - 1 + j]
        assert abs(lp - float(row[t])) < 1e-4, (j, lp, float(row[t]))
        assert [i for i, _ in top] == row.topk(2).indices.tolist()
        assert all(abs(v - float(row[i])) < 1e-4 for i, v in top)
    alone = Engine(dllm, ver, APDConfig(M=8), max_batch=1, max_len=64)
    alone.add_request(ids, dict(p, seed=2), request_id=1)
    seq = []
    while alone.has_unfinished():
        seq += sum((o.new_tokens for o in alone.step()), [])
    assert seq == got[1][0]
    with pytest.raises(ValueError, match="^logprobs:"):
        engine.add_request(ids, dict(p, logprobs=21))
