"""The continuous-batching Engine on the shipped tiny pair (CPU, fp32): a
request's tokens and per-step acceptance are those `generate` gives it alone,
whatever joins or leaves around it and whenever it arrives; abort frees the
slot; admission queues what does not fit and refuses what never can."""
import json
import random

import pytest
import torch

import apd_ext
from apd_ext import generate, tiny
from apd_ext.config import APDConfig
from apd_ext import Engine


@pytest.fixture(scope="module")
def pair(tiny_pair_fp32):
    return tiny_pair_fp32


@pytest.fixture(scope="module")
def prompts():
    tok = tiny.tokenizer()
    with open(tiny.test_file()) as f:
        rows = [json.loads(line) for _, line in zip(range(40), f)]
    out = [tok(r["question"] + " Answer:")["input_ids"] for r in rows]
    return out + [[5], [7, 9]]  # one- and two-token prompts: nothing / one token to prefill


def _alone(pair, prompt, params):
    p = dict(params)
    stop = p.pop("stop_token_ids", None)
    out = generate(pair[0], pair[1], [prompt], APDConfig(**p), eos_token_ids=stop)
    return out.generated(0).tolist(), out.accepted_per_step[0]


def _collect(got, outs):
    """Fold step outputs into got {id: (tokens, accepted per step, reason)}."""
    for o in outs:
        toks, acc, _ = got.setdefault(o.request_id, ([], [], None))
        toks += o.new_tokens
        acc.append(len(o.new_tokens))
        assert o.step == len(acc)  # the request's own step counter
        if o.finished:
            got[o.request_id] = (toks, acc, o.finish_reason)
    return outs


def _drain(engine, arrivals=None, got=None, max_steps=2000):
    """Step until every request finished; arrivals: {step: [(prompt, params, id)]}
    added before that step. Returns {id: (tokens, accepted per step, reason)}."""
    got, arrivals = ({} if got is None else got), dict(arrivals or {})
    for step in range(max_steps):
        for prompt, params, rid in arrivals.pop(step, []):
            engine.add_request(prompt, params, rid)
        if not engine.has_unfinished() and not arrivals:
            return got
        _collect(got, engine.step())
    raise AssertionError("the engine did not drain")


def _random_params(rng, eos_pool):
    p = dict(R=rng.choice([0.3, 0.7, 0.95]), W=rng.choice([None, 1, 3, 16]), M=rng.choice([2, 5, 16]),
             temperature=rng.choice([0.0, 0.2, 0.9]), top_p=rng.choice([0.8, 1.0]), top_k=rng.choice([0, 7]),
             acceptance=rng.choice(["coupled", "argmax"]), seed=rng.randrange(2**64),
             max_new_tokens=rng.randrange(3, 25))
    if rng.random() < 0.5:
        p["stop_token_ids"] = rng.sample(eos_pool, 2)  # ends some requests early
    else:
        p["stop_token_ids"] = []
    if rng.random() < 0.2:  # the released code's arithmetic, in the same per-row call as the rest
        p["compat"] = "official"
    return p


def test_fifty_random_arrivals_equal_generate_alone(pair, prompts):
    rng = random.Random(1234)
    # Stop ids drawn from what the pair itself emits on these prompts (greedy,
    # alone), so that some requests end on a stop id whatever the weights are.
    emitted = generate(pair[0], pair[1], prompts[:6], APDConfig(M=16, temperature=0.0, max_new_tokens=24),
                       eos_token_ids=[])
    counts = {}
    for b in range(6):
        for t in emitted.generated(b).tolist():
            counts[t] = counts.get(t, 0) + 1
    eos_pool = sorted(counts, key=lambda t: (-counts[t], t))[:12]
    assert len(eos_pool) >= 4, counts
    reqs = []
    for i in range(50):
        reqs.append((rng.choice(prompts), _random_params(rng, eos_pool), f"r{i}"))
    arrivals = {}
    for r in reqs:
        arrivals.setdefault(rng.randrange(0, 40), []).append(r)
    engine = Engine(*pair, APDConfig(M=16), max_batch=8, max_len=200, kv_budget=900)
    got = _drain(engine, arrivals)
    assert sorted(got) == sorted(r[2] for r in reqs)
    reasons = set()
    for prompt, params, rid in reqs:
        toks, acc, reason = got[rid]
        assert (toks, acc) == _alone(pair, prompt, params), rid
        reasons.add(reason)
    assert reasons == {"stop", "length"}  # both ends happened in the mix
    assert engine.reserved == 0 and engine.num_live == 0


def test_abort_frees_the_slot(pair, prompts):
    params = dict(R=0.5, W=4, M=4, temperature=0.7, max_new_tokens=20, stop_token_ids=[])
    engine = Engine(*pair, APDConfig(M=16), max_batch=2, max_len=200)
    got = {}
    for i in range(3):
        engine.add_request(prompts[i], dict(params, seed=i), f"r{i}")
    _collect(got, engine.step())
    assert engine.num_live == 2 and engine.num_queued == 1 and engine.reserved > 0
    assert engine.abort("r0") and engine.num_live == 1
    assert not engine.abort("r0")  # gone
    outs = _collect(got, engine.step())  # r2 takes r0's slot at this step boundary
    assert {o.request_id for o in outs} == {"r1", "r2"}
    _drain(engine, got=got)
    assert len(got["r0"][1]) == 1 and got["r0"][2] is None  # one step, then nothing more
    for i in (1, 2):
        assert got[f"r{i}"][:2] == _alone(pair, prompts[i], dict(params, seed=i))
    assert engine.reserved == 0
    # Aborting a queued request drops it before it runs.
    for i in range(3):
        engine.add_request(prompts[i], params, f"q{i}")
    got = {}
    _collect(got, engine.step())
    assert engine.abort("q2") and engine.num_queued == 0
    assert set(_drain(engine, got=got)) == {"q0", "q1"}


def test_requests_queue_when_full(pair, prompts):
    params = [dict(R=0.7, W=2, M=8, temperature=0.2, seed=s, max_new_tokens=12, stop_token_ids=[])
              for s in range(5)]
    engine = Engine(*pair, APDConfig(M=16), max_batch=2, max_len=120)
    got = {}
    for i, p in enumerate(params):
        engine.add_request(prompts[i], p, i)
    _collect(got, engine.step())
    assert engine.num_live == 2 and engine.num_queued == 3
    _drain(engine, got=got)
    for i, p in enumerate(params):
        assert got[i][:2] == _alone(pair, prompts[i], p)
    # The KV budget queues too: room for one request at a time, whatever max_batch.
    one = Engine(*pair, APDConfig(M=16), max_batch=4, max_len=120, kv_budget=len(prompts[0]) + 12)
    got = {}
    one.add_request(prompts[0], params[0], "a")
    one.add_request(prompts[0], params[1], "b")
    _collect(got, one.step())
    assert one.num_live == 1 and one.num_queued == 1
    _drain(one, got=got)
    assert got["a"][:2] == _alone(pair, prompts[0], params[0])
    assert got["b"][:2] == _alone(pair, prompts[0], params[1])


def test_admission_refuses_what_can_never_fit(pair, prompts):
    engine = Engine(*pair, APDConfig(M=16), max_batch=2, max_len=64, kv_budget=50)
    with pytest.raises(ValueError, match="prompt_ids"):
        engine.add_request(list(range(3, 70)))  # 67 tokens > max_len
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add_request([5, 6], dict(max_new_tokens=63))  # past max_len
    with pytest.raises(ValueError, match="KV budget"):
        engine.add_request([5, 6], dict(max_new_tokens=60))  # 62 <= max_len but > kv_budget
    with pytest.raises(ValueError, match="prompt_ids"):
        engine.add_request([])
    with pytest.raises(ValueError, match=r"prompt_ids: expected token ids in \[0, 568\)"):
        engine.add_request([5, 10_000])
    with pytest.raises(ValueError, match=r"params\['bogus'\]"):
        engine.add_request([5], dict(bogus=1))
    with pytest.raises(ValueError, match="^M: "):
        engine.add_request([5], dict(M=17))  # beyond the engine's M
    with pytest.raises(ValueError, match="^R: "):
        engine.add_request([5], dict(R=1.5))
    engine.add_request([5], dict(max_new_tokens=4), "x")
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request([5], dict(max_new_tokens=4), "x")
    assert engine.num_queued == 1  # the refused ones left no trace
    with pytest.raises(ValueError, match="max_batch"):
        Engine(*pair, max_batch=0)
    with pytest.raises(ValueError, match="max_len"):
        Engine(*pair, max_len=10**6)
    with pytest.raises(ValueError, match="K"):
        Engine(pair[0], None)
