"""Chunked prefill in the Engine (issue 28 item 4, docs/SEMANTICS.md "Chunked
prefill"), on tiny random checkpoints (CPU, fp32) and on the shipped tiny pair:
(a) a chunk >= the prompt is today's Engine and the reference loop, token for
token; (b) shorter chunks give exactly the tokens of an independent
transcription of the semantics (tests/chunked_reference.py); (c) a chunked
request's tokens do not depend on its batch-mates or its arrival step, and the
live rows keep producing a block every step while it prefills; (d) a fault or
an abort during prefill stays with that request; (e) accuracy on the shipped
pair's arithmetic slice with and without chunks (a loose bound)."""
import random
from types import SimpleNamespace

import pytest
import torch

import apd_ext
from apd_ext.config import APDConfig
from apd_ext import Engine
from apd_ext.reference_loop import reference_generate

from chunked_reference import chunked_reference
from faults import FaultyModel, PrefillFault
from tests.model_utils import make_tiny_dream, make_tiny_qwen2

MASK = 508
P = 40  # prompt tokens: several chunks for N in (1, 7, 16)
PROMPT = [(7 * i + 11) % 500 + 3 for i in range(P)]
MARKER = 77


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("apd_chunked")
    hf_dllm = make_tiny_dream(root / "dream", seed=0, mask_token_id=MASK)
    hf_ver = make_tiny_qwen2(root / "qwen", seed=1)
    yield SimpleNamespace(dllm=apd_ext.load_model(root / "dream"), verifier=apd_ext.load_model(root / "qwen"),
                          hf_dllm=hf_dllm, hf_verifier=hf_ver)
    torch.set_num_threads(threads)


def _engine(pair, chunk, max_batch=1, dllm=None, verifier=None, **kw):
    return Engine(pair.dllm if dllm is None else dllm, pair.verifier if verifier is None else verifier,
                  APDConfig(M=32), max_batch=max_batch, max_len=160, prefill_chunk=chunk, **kw)


def _drain(engine, arrivals, max_steps=500):
    """arrivals: {step: [(prompt, params, id)]}; returns ({id: (tokens, accepted
    per step, reason)}, {id: [engine steps at which it emitted]})."""
    got, when, arrivals = {}, {}, dict(arrivals)
    for step in range(max_steps):
        for prompt, params, rid in arrivals.pop(step, []):
            engine.add_request(prompt, params, rid)
        if not engine.has_unfinished() and not arrivals:
            return got, when
        for o in engine.step():
            toks, acc, _ = got.setdefault(o.request_id, ([], [], None))
            toks += o.new_tokens
            acc.append(len(o.new_tokens))
            when.setdefault(o.request_id, []).append(step)
            assert o.step == len(acc)  # prefill steps are not the request's steps
            assert o.new_tokens or o.finished  # no empty block while prefilling
            if o.finished:
                got[o.request_id] = (toks, acc, o.finish_reason)
    raise AssertionError("the engine did not drain")


def _alone(pair, chunk, prompt, params):
    engine = _engine(pair, chunk)
    engine._trace = []
    got, _ = _drain(engine, {0: [(prompt, params, "x")]})
    return got["x"], [step[0][1] for step in engine._trace if step]  # (tokens, accepted, reason), left per step


def _ref(pair, chunk, prompt, params):
    p = dict(params)
    stop = p.pop("stop_token_ids")
    return chunked_reference(pair.hf_dllm, pair.hf_verifier, prompt, chunk=chunk, mask_token_id=MASK,
                             eos_token_ids=stop, **p)


MODES = {"coupled": dict(acceptance="coupled"), "argmax": dict(acceptance="argmax"),
         "official": dict(compat="official")}


def _params(R, W, M, tau, mode, seed=3, new=20):
    return dict(R=R, W=W, M=M, temperature=tau, top_p=0.95, max_new_tokens=new, seed=seed,
                stop_token_ids=[2], **MODES[mode])


# ------------------------------------------------------------ the model level


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunk_forwards_are_one_block_causal_forward(pair, chunk):
    """The runtime's chunk forwards (q_start a, q_len N, cache [0, a)) give the
    logits of ONE transformers forward over the whole prompt under the
    block-causal mask the semantics describe (position i sees j iff j's chunk
    is not after i's); the verifier's chunks give its plain causal forward."""
    ids = torch.tensor([PROMPT])
    chunk_of = torch.arange(P) // chunk
    block = torch.where(chunk_of[None, :] <= chunk_of[:, None], 0.0, float("-inf"))[None, None]  # [1, 1, P, P]
    want_d = pair.hf_dllm(input_ids=ids, position_ids=torch.arange(P)[None],
                          attention_mask={"full_attention": block}).logits[0]  # [P, V]
    want_a = pair.hf_verifier(input_ids=ids, position_ids=torch.arange(P)[None]).logits[0]  # [P, V]
    for model, want in ((pair.dllm, want_d), (pair.verifier, want_a)):
        cache = model.new_cache(1, 64)
        got = []
        for a in range(0, P, chunk):
            n = min(chunk, P - a)
            got.append(model.forward(ids[:, a : a + n], cache, torch.tensor([a]), torch.tensor([n]))[0])
        torch.testing.assert_close(torch.cat(got), want, atol=2e-5, rtol=2e-5)  # fp32 vs fp32, other GEMM shapes


# ------------------------------------------------------------------ (a) N >= P


@pytest.mark.parametrize("chunk", [P, P + 7, 1000])
@pytest.mark.parametrize("R,W,M,tau,mode", [(0.7, 16, 32, 0.0, "coupled"), (0.5, 1, 8, 0.7, "argmax"),
                                            (0.9, 4, 12, 0.7, "official")])
def test_one_chunk_is_the_unchunked_engine_and_the_reference_loop(pair, chunk, R, W, M, tau, mode):
    params = _params(R, W, M, tau, mode)
    (toks, acc, _), lefts = _alone(pair, chunk, PROMPT, params)
    (toks0, acc0, _), lefts0 = _alone(pair, None, PROMPT, params)
    assert (toks, acc, lefts) == (toks0, acc0, lefts0) and lefts[0] == 0
    p = dict(params)
    stop = p.pop("stop_token_ids")
    ref = reference_generate(pair.hf_dllm, pair.hf_verifier, PROMPT, mask_token_id=MASK, eos_token_ids=stop, **p)
    assert PROMPT + toks == ref.tokens and acc == ref.accepted_per_step


# ------------------------------------------------------------------ (b) N < P


@pytest.mark.parametrize("chunk", [1, 7, 16, P - 1])
@pytest.mark.parametrize("R,W,M,tau,mode", [(0.7, 16, 32, 0.0, "coupled"), (0.5, 1, 8, 0.7, "argmax"),
                                            (0.9, 4, 12, 0.7, "official"), (0.7, 3, 5, 0.9, "coupled")])
def test_chunks_match_the_transcribed_semantics(pair, chunk, R, W, M, tau, mode):
    params = _params(R, W, M, tau, mode)
    (toks, acc, _), lefts = _alone(pair, chunk, PROMPT, params)
    ref_toks, ref_acc, ref_lefts = _ref(pair, chunk, PROMPT, params)
    assert (toks, acc, lefts) == (ref_toks, ref_acc, ref_lefts)
    assert lefts[0] == chunk * ((P - 1) // chunk) > 0  # the first drafting step recomputes the last chunk only


def test_chunking_is_observable(pair):
    """The semantics differ from the whole prompt (so (b) is not (a) again): on
    these random weights some configuration drafts differently with chunks."""
    differ = 0
    for seed in range(4):
        params = _params(0.5, 16, 32, 0.7, "coupled", seed=seed)
        differ += _ref(pair, 7, PROMPT, params)[0] != _ref(pair, None, PROMPT, params)[0]
    assert differ >= 1


def test_w_none_is_never_chunked(pair):
    params = _params(0.9, None, 16, 0.7, "coupled")
    assert _alone(pair, 7, PROMPT, params) == _alone(pair, None, PROMPT, params)


# ------------------------------------------------------- (c) batch invariance


def _mixed_requests(rng, n):
    reqs = []
    for i in range(n):
        plen = rng.choice([1, 2, 6, 15, 33, 70])
        prompt = [rng.randrange(3, 500) for _ in range(plen)]
        params = dict(R=rng.choice([0.5, 0.9]), W=rng.choice([None, 1, 4, 16]), M=rng.choice([3, 8, 32]),
                      temperature=rng.choice([0.0, 0.8]), top_p=0.95, seed=rng.randrange(2**64),
                      max_new_tokens=rng.randrange(4, 30), stop_token_ids=rng.choice([[], [2, 5]]))
        reqs.append((prompt, params, f"r{i}"))
    return reqs


def test_chunked_tokens_do_not_depend_on_batch_or_arrival(pair):
    rng = random.Random(7)
    chunk = 8
    reqs = _mixed_requests(rng, 18)
    arrivals = {}
    for r in reqs:
        arrivals.setdefault(rng.randrange(0, 25), []).append(r)
    engine = _engine(pair, chunk, max_batch=5, kv_budget=500)
    got, _ = _drain(engine, arrivals)
    assert sorted(got) == sorted(r[2] for r in reqs)
    for prompt, params, rid in reqs:
        assert got[rid] == _alone(pair, chunk, prompt, params)[0], rid
    assert engine.reserved == 0 and engine.num_live == 0
    # Spot checks against the transcription (each one is a full reference run).
    for prompt, params, rid in reqs[:4]:
        assert got[rid][0] == _ref(pair, chunk, prompt, params)[0], rid


def test_live_rows_emit_every_step_while_a_long_prompt_prefills(pair):
    chunk, M = 8, 6
    engine = _engine(pair, chunk, max_batch=3)
    engine._trace = []
    live = dict(R=0.9, W=4, M=M, temperature=0.0, max_new_tokens=60, seed=1, stop_token_ids=[])
    long_prompt = [(5 * i + 3) % 500 + 3 for i in range(100)]
    joiner = dict(live, max_new_tokens=10, seed=2)
    got, when = _drain(engine, {0: [(PROMPT, live, "a"), (PROMPT[:9], live, "b")], 3: [(long_prompt, joiner, "j")]})
    first = when["j"][0]
    prefill_steps = (len(long_prompt) - 1) // chunk
    assert first == 3 + prefill_steps  # it joined at step 3 and prefilled 12 chunks
    for rid in ("a", "b"):
        steps = when[rid]
        assert steps == list(range(steps[0], steps[-1] + 1))  # a block at every step, prefill or not
    # Its first drafting window is the last chunk plus M masks, not the prompt.
    windows = [(lo, hi) for step in engine._trace for r, lo, hi, _ in step if r == "j"]
    assert windows[0] == (prefill_steps * chunk, len(long_prompt) + M)
    assert got["j"] == _alone(pair, chunk, long_prompt, joiner)[0]


# ------------------------------------------------------- (d) faults and abort


def test_a_fault_during_prefill_fails_only_that_request(pair):
    """The dLLM raises on the marked request's first chunk (q_start 0): the
    step's bisection blames it alone, before it emitted anything."""
    chunk = 8
    dllm = FaultyModel(pair.dllm, MARKER, "raise")
    engine = _engine(pair, chunk, max_batch=4, dllm=dllm)
    params = dict(R=0.7, W=4, M=8, temperature=0.7, max_new_tokens=15, seed=4, stop_token_ids=[])
    others = [(PROMPT, dict(params, seed=i), f"ok{i}") for i in range(2)]
    bad = ([MARKER] + PROMPT, params, "bad")
    got, _ = _drain(engine, {0: others[:1], 2: [bad] + others[1:]})
    assert got["bad"][0] == [] and got["bad"][2] == "error" and dllm.hits >= 1
    for prompt, p, rid in others:
        assert got[rid] == _alone(pair, chunk, prompt, p)[0], rid
    assert engine.reserved == 0 and engine.num_live == 0


def test_a_verifier_fault_in_a_prefill_chunk_fails_only_that_request(pair):
    """The verifier's chunk forward (logit_rows given, q_start 0) raises for the
    marked request: contained by the step's bisection, not by admission."""
    chunk = 8
    ver = PrefillFault(pair.verifier, MARKER)
    engine = _engine(pair, chunk, max_batch=4, verifier=ver)
    params = dict(R=0.7, W=16, M=8, temperature=0.0, max_new_tokens=12, seed=5, stop_token_ids=[])
    engine.add_request(PROMPT, params, "ok")
    engine.add_request([MARKER] + PROMPT, params, "bad")
    toks, errors = [], {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == "ok":
                toks += o.new_tokens
            if o.finish_reason == "error":
                errors[o.request_id] = o.error
    assert list(errors) == ["bad"] and "injected fault" in errors["bad"] and ver.hits >= 1
    assert toks == _alone(pair, chunk, PROMPT, params)[0][0]
    assert engine.reserved == 0


def test_abort_during_prefill_frees_the_slot(pair):
    chunk = 4
    engine = _engine(pair, chunk, max_batch=2)
    params = dict(R=0.7, W=4, M=8, temperature=0.7, max_new_tokens=20, seed=6, stop_token_ids=[])
    engine.add_request(PROMPT[:10], params, "live")
    engine.add_request(PROMPT, dict(params, seed=7), "long")  # 9 prefill steps
    outs = []
    for _ in range(3):
        outs += engine.step()
    assert {o.request_id for o in outs} == {"live"}  # the long one is still prefilling
    assert engine.abort("long") and engine.num_live == 1
    assert engine.reserved == PROMPT[:10].__len__() + 20
    engine.add_request(PROMPT, dict(params, seed=8), "next")
    got = {}
    for o in outs:
        got.setdefault(o.request_id, []).extend(o.new_tokens)
    while engine.has_unfinished():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_tokens)
    assert got["live"] == _alone(pair, chunk, PROMPT[:10], params)[0][0]
    assert got["next"] == _alone(pair, chunk, PROMPT, dict(params, seed=8))[0][0]
    assert engine.reserved == 0


def test_prefill_chunk_is_checked(pair):
    for bad in (0, -3, 2.5, True):
        with pytest.raises((ValueError, TypeError), match="prefill_chunk"):
            _engine(pair, bad)


# ------------------------------------------------------- (e) quality, tiny pair


def test_accuracy_on_the_arith_slice_with_chunks(tiny_pair_fp32):
    from apd_ext import tiny
    from apd_ext.tasks import arith
    from apd_ext.tiny.demo import encode_prompt

    dllm, ar = tiny_pair_fp32
    tok = tiny.tokenizer()
    probs = arith.load_jsonl(tiny.test_file())[:40]
    prompts = [encode_prompt(tok, p.question)[0] for p in probs]
    plen = sorted(len(p) for p in prompts)
    chunk = max(1, plen[0] // 3)  # shorter than every prompt: each is chunked

    def accuracy(chunk):
        engine = Engine(dllm, ar, tiny.apd_config(), max_batch=8, prefill_chunk=chunk)
        for i, p in enumerate(prompts):
            engine.add_request(p, None, i)
        ids = {i: [] for i in range(len(prompts))}
        while engine.has_unfinished():
            for o in engine.step():
                ids[o.request_id] += o.new_tokens
        ok = 0
        for i, p in enumerate(probs):
            row = ids[i][: ids[i].index(tok.eos_token_id)] if tok.eos_token_id in ids[i] else ids[i]
            ok += arith.score(tok.decode(row, skip_special_tokens=True), p.final)
        return ok / len(probs)

    whole, chunked = accuracy(None), accuracy(chunk)
    print(f"apd_arith[:40] accuracy: whole prompt {whole:.3f}, prefill_chunk={chunk} "
          f"(prompts {plen[0]}..{plen[-1]} tokens) {chunked:.3f}")
    # Measured (bench/NOTES.md): 0.90 whole vs 0.65 at chunk 9 on these 40; on
    # 100 problems 0.95 whole, 0.58 .. 0.81 for chunks 4 .. 32. The shipped pair
    # learnt its prompts whole and bidirectionally: chunks cost it accuracy,
    # which is why chunking is off by default. The bound only catches a broken path.
    assert whole >= 0.8, whole
    assert chunked >= 0.4, (chunked, whole)


# ------------------------------------------------------------------ apd serve


def test_serve_prefill_chunk_flag(capsys):
    pytest.importorskip("ray.serve")
    from apd_ext import cli, tiny
    from apd_ext.serve.app import APDServer

    assert cli.main(["serve", "--prefill-chunk", "-1"]) == 2
    assert "--prefill-chunk: expected an int >= 0, got -1" in capsys.readouterr().err
    d, a = tiny.paths()
    assert APDServer(d, a, threads=1, max_batch=2, max_len=128, M=8, prefill_chunk=16).engine.prefill_chunk == 16
    assert APDServer(d, a, threads=1, max_batch=2, max_len=128, M=8).engine.prefill_chunk is None
