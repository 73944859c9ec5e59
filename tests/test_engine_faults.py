"""Failure containment in the Engine (issue 25 item 5) on the shipped tiny
pair (CPU, fp32): a marked request whose dLLM logits are non-finite, whose
step raises, or whose join raises fails alone with finish_reason "error";
every other request, live beside it, stays token-identical to running alone;
nothing stays reserved. A fatal device error is not contained. Faults come
from test-only model wrappers (tests/faults.py)."""
import json
import random

import pytest
import torch

import apd_ext
from apd_ext import generate, tiny
from apd_ext.config import APDConfig
from apd_ext import Engine
from apd_ext.errors import FatalDeviceError, is_fatal

from faults import BatchFault, FaultyModel, PrefillFault, attention_propagates_nan, nan_embedding

MARKER = 77  # a marked request's first prompt token (no unmarked prompt starts with it)


@pytest.fixture(scope="module")
def pair(tiny_pair_fp32):
    return tiny_pair_fp32


@pytest.fixture(scope="module")
def prompts():
    tok = tiny.tokenizer()
    with open(tiny.test_file()) as f:
        rows = [json.loads(line) for _, line in zip(range(12), f)]
    out = [tok(r["question"] + " Answer:")["input_ids"] for r in rows]
    assert all(p[0] != MARKER for p in out)
    return out


def _params(rng, i):
    return dict(R=rng.choice([0.5, 0.9]), W=rng.choice([None, 3, 16]), M=rng.choice([5, 16]),
                temperature=rng.choice([0.0, 0.7]), top_p=0.95, seed=1000 + i, max_new_tokens=rng.randrange(9, 30),
                stop_token_ids=[])


def _alone(pair, prompt, params):
    p = dict(params)
    stop = p.pop("stop_token_ids", None)
    out = generate(pair[0], pair[1], [prompt], APDConfig(**p), eos_token_ids=stop)
    return out.generated(0).tolist()


def _run(engine, reqs, arrivals, max_steps=500):
    """reqs: [(prompt, params, id)] added at the steps `arrivals` gives; returns
    {id: (tokens, finish_reason, error)} once drained."""
    got = {}
    for step in range(max_steps):
        for j, (prompt, params, rid) in enumerate(reqs):
            if arrivals[j] == step:
                engine.add_request(prompt, params, rid)
        if step > max(arrivals) and not engine.has_unfinished():
            return got
        for o in engine.step():
            toks = got.setdefault(o.request_id, ([], None, None))[0]
            toks += o.new_tokens
            if o.finished:
                got[o.request_id] = (toks, o.finish_reason, o.error)
    raise AssertionError("the engine did not drain")


def _scenario(pair, prompts, dllm, ver, marked, seed=5, n=7, max_batch=8):
    """n requests arriving over the first steps, those in `marked` carrying the
    marker; checks the unmarked against alone and returns (got, engine)."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        p = prompts[i % len(prompts)]
        reqs.append(([MARKER] + p if i in marked else p, _params(rng, i), f"r{i}"))
    arrivals = [rng.randrange(0, 4) for _ in reqs]
    engine = Engine(dllm, ver, APDConfig(M=16), max_batch=max_batch, max_len=160)
    got = _run(engine, reqs, arrivals)
    assert sorted(got) == sorted(r[2] for r in reqs)
    for i, (prompt, params, rid) in enumerate(reqs):
        toks, reason, err = got[rid]
        if i in marked:
            assert reason == "error" and toks == [] and err, rid
        else:
            assert reason in ("stop", "length") and err is None, (rid, err)
            assert toks == _alone(pair, prompt, params), rid
    assert engine.reserved == 0 and engine.num_live == 0 and engine.num_queued == 0
    return got, engine


def test_non_finite_logits_fail_only_their_request(pair, prompts):
    """Checks the Engine's per-row check of the drafts (the sampler's -1 for a
    non-finite logits row): the marked rows' logits are NaN, whatever the
    attention kernel does with NaN."""
    dllm = FaultyModel(pair[0], MARKER, "nan_logits")
    got, _ = _scenario(pair, prompts, dllm, pair[1], marked={2, 5})
    assert dllm.hits >= 2
    assert "not finite" in got["r2"][2] and "not finite" in got["r5"][2]


def test_a_step_that_raises_is_bisected_to_its_culprits(pair, prompts):
    """Checks the bisection: the whole dLLM forward raises whenever a marked
    row is in it; only the marked requests fail."""
    dllm = FaultyModel(pair[0], MARKER, "raise")
    got, _ = _scenario(pair, prompts, dllm, pair[1], marked={1, 6})
    assert "injected fault" in got["r1"][2] and "injected fault" in got["r6"][2]


def test_a_join_that_raises_reserves_nothing(pair, prompts):
    """Checks admission: the verifier prefill of a marked request raises; it
    fails alone, joined together with others or not, and frees nothing it
    never reserved (the engine's reservation ends at 0)."""
    ver = PrefillFault(pair[1], MARKER)
    got, engine = _scenario(pair, prompts, pair[0], ver, marked={0, 3})
    assert ver.hits >= 2 and "join failed" in got["r0"][2]


def test_a_transient_fault_is_retried_once(pair, prompts):
    """The first windowed forward raises and no subset reproduces it: the
    step is retried and every request completes as alone."""
    dllm = BatchFault(pair[0], times=1)
    got, _ = _scenario(pair, prompts, dllm, pair[1], marked=set(), n=4)
    assert all(r[1] in ("stop", "length") for r in got.values())


def test_a_fault_no_single_request_causes_fails_that_step_only(pair, prompts):
    """The forward raises whenever 3+ rows run together: bisection finds no
    single culprit, the retry raises too, so the rows of that step fail; the
    engine stays usable (a request after them completes as alone)."""
    dllm = BatchFault(pair[0], min_rows=3)
    engine = Engine(dllm, pair[1], APDConfig(M=16), max_batch=4, max_len=160)
    params = dict(max_new_tokens=10, stop_token_ids=[])
    for i in range(3):
        engine.add_request(prompts[i], dict(params, seed=i), f"r{i}")
    outs = engine.step()
    assert sorted(o.request_id for o in outs) == ["r0", "r1", "r2"]
    assert all(o.finish_reason == "error" and "injected batch fault" in o.error for o in outs)
    assert engine.num_live == 0 and engine.reserved == 0
    got = _run(engine, [(prompts[3], dict(params, seed=3), "after")], [0])
    assert got["after"][0] == _alone(pair, prompts[3], dict(params, seed=3))


def test_a_fatal_device_error_is_not_contained(pair, prompts):
    dllm = FaultyModel(pair[0], MARKER, "fatal")
    engine = Engine(dllm, pair[1], APDConfig(M=16), max_batch=4, max_len=160)
    engine.add_request(prompts[0], dict(max_new_tokens=8), "a")
    engine.add_request([MARKER] + prompts[1], dict(max_new_tokens=8), "b")
    with pytest.raises(RuntimeError, match="CUDA error") as info:
        engine.step()
    assert is_fatal(info.value) and dllm.hits == 1  # raised at once: no bisection on a broken device
    assert is_fatal(FatalDeviceError("x")) and not is_fatal(RuntimeError("CUDA out of memory. CUDA error"))


def test_generate_raises_for_a_non_finite_sequence(pair, prompts):
    dllm = FaultyModel(pair[0], MARKER, "nan_logits")
    with pytest.raises(RuntimeError, match="sequence 1: .*not finite"):
        generate(dllm, pair[1], [prompts[0], [MARKER] + prompts[1]], APDConfig(max_new_tokens=8))


@pytest.mark.skipif(not attention_propagates_nan(),
                    reason="window_attention does not yet make a row NaN when a key it sees is NaN (plan24)")
def test_nan_input_embedding_fails_only_its_request(pair, prompts):
    """Checks the kernel path end to end: the marker's dLLM input embedding is
    NaN, so only attention carries the poison to the rows whose logits are
    drafted; with NaN-propagating attention those rows are non-finite and the
    request fails alone."""
    dllm = nan_embedding(pair[0], MARKER)
    _scenario(pair, prompts, dllm, pair[1], marked={4}, n=5)
