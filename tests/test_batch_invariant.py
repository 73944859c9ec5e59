"""Batch invariance of the logits, not only of the tokens (DESIGN.md §8,
docs/SEMANTICS.md "Batch invariance"): with the per-request plan
(Packing.per_request, Engine(batch_invariant=True)) every GEMM of a forward
runs over one request's own rows, so a request's logits, K/V and logprobs are
bit-identical alone and inside any batch. The attention and sampling kernels
are batch-invariant by construction (tests/test_attention_cuda.py,
tests/test_sampling_cuda.py); these tests cover what the GEMMs add."""
import pytest
import torch

import apd_ext
from apd_ext import APDConfig, Engine, tiny
from apd_ext.models import Packing, random_model

V = 509
CFG = {
    "model_type": "qwen2", "vocab_size": V, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "eos_token_id": 2,
    "mask_token_id": 508,
}
# What a per-request plan may change against the one-GEMM forward: rounding
# of the GEMMs' reduction order only.
ATOL = {torch.float32: 2e-5, torch.bfloat16: 0.1}


def i64(*xs):
    return torch.tensor(xs, dtype=torch.int64)


@pytest.fixture(scope="module", params=[("qwen2", torch.float32), ("Dream", torch.float32),
                                        ("qwen2", torch.bfloat16), ("Dream", torch.bfloat16)],
                ids=lambda p: f"{p[0]}-{str(p[1])[6:]}")
def model(request):
    kind, dtype = request.param
    return random_model({**CFG, "model_type": kind}, seed=3, std=0.08, dtype=dtype)


# Requests as (cached prefix, window rows, logit row start, own logit rows);
# their batches put long windows and long caches beside short ones.
REQS = [(0, 37, 0, 37), (5, 3, 1, 2), (9, 1, 0, 1), (12, 20, 4, 9), (0, 6, 0, 6)]
BATCHES = [[0], [1, 0, 2], [2, 3, 1, 4], [4, 1]]


def _forward(model, idx, ids, with_rows: bool, per_request: bool = True):
    """Sequences REQS[i] for i in idx: each cache filled with its own prefix,
    then its window; returns (logits of its own rows [own, V] each, K of its
    window [layers, rows, Hkv, D] each)."""
    B = len(idx)
    pre = i64(*[REQS[i][0] for i in idx])
    q_len = i64(*[REQS[i][1] for i in idx])
    Lw = int(q_len.max())
    if with_rows:  # as the Engine sizes it: every row_start + n_rows inside the window
        Lw = max(Lw, max(REQS[i][2] for i in idx) + max(REQS[i][3] for i in idx))
    cache = model.new_cache(B, 64)
    P = int(pre.max())
    if P:  # the prefix, one sequence at a time (its own GEMM shapes whatever the batch)
        for b, i in enumerate(idx):
            view = cache.view(b, b + 1)
            if REQS[i][0]:
                model.forward(ids[i][None, : REQS[i][0]], view, i64(0), i64(REQS[i][0]))
    win = torch.zeros(B, Lw, dtype=torch.int64)
    for b, i in enumerate(idx):
        p, n = REQS[i][0], REQS[i][1]
        win[b, :n] = ids[i][p : p + n]
    if with_rows:
        rs, own = i64(*[REQS[i][2] for i in idx]), i64(*[REQS[i][3] for i in idx])
        n_rows = int(own.max())
        plan = Packing.build(q_len, Lw, "cpu", per_request=per_request, logit_counts=own if per_request else None)
        out = model.forward(win, cache, pre, q_len, logit_rows=(rs, n_rows), packing=plan)
        logits = [out[b, : REQS[i][3]] for b, i in enumerate(idx)]
    else:
        plan = Packing.build(q_len, Lw, "cpu", per_request=per_request)
        out = model.forward(win, cache, pre, q_len, packing=plan)
        logits = [out[b, : REQS[i][1]] for b, i in enumerate(idx)]
    k = [cache._k[:, b, REQS[i][0] : REQS[i][0] + REQS[i][1]] for b, i in enumerate(idx)]
    return logits, k


@pytest.mark.parametrize("with_rows", [False, True], ids=["all-rows", "logit-rows"])
def test_per_request_forward_is_bit_identical_alone_and_batched(model, with_rows):
    g = torch.Generator().manual_seed(7)
    ids = [torch.randint(3, V - 1, (r[0] + r[1],), generator=g) for r in REQS]
    alone = {i: _forward(model, [i], ids, with_rows) for i in range(len(REQS))}
    checked = 0
    for idx in BATCHES:
        logits, k = _forward(model, idx, ids, with_rows)
        for b, i in enumerate(idx):
            assert torch.equal(logits[b], alone[i][0][0]), f"request {i} in batch {idx}: logits"
            assert torch.equal(k[b], alone[i][1][0]), f"request {i} in batch {idx}: K cache"
            checked += 1
    assert checked == sum(map(len, BATCHES))
    # ... and the per-request GEMMs compute the same function as the one-GEMM forward.
    logits, _ = _forward(model, BATCHES[2], ids, with_rows, per_request=False)
    for b, i in enumerate(BATCHES[2]):
        torch.testing.assert_close(logits[b].float(), alone[i][0][0].float(), atol=ATOL[model.dtype], rtol=0)


def test_per_request_plan_errors(model):
    q_len = i64(3, 1)
    ids = torch.randint(3, V - 1, (2, 3))
    cache = model.new_cache(2, 8)
    plan = Packing.build(q_len, 3, "cpu", per_request=True)
    with pytest.raises(ValueError, match="packing"):  # logit_rows without logit_counts
        model.forward(ids, cache, i64(0, 0), q_len, logit_rows=(i64(0, 0), 1), packing=plan)
    plan = Packing.build(q_len, 3, "cpu", per_request=True, logit_counts=i64(2, 1))
    with pytest.raises(ValueError, match="packing"):  # more own rows than logit_rows asks for
        model.forward(ids, cache, i64(0, 0), q_len, logit_rows=(i64(0, 0), 1), packing=plan)
    with pytest.raises(ValueError, match="logit_counts"):
        Packing.build(q_len, 3, "cpu", per_request=True, logit_counts=i64(4, 0))


# ------------------------------------------------------------------ Engine
@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def pair(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d, a = tiny.paths()
    yield apd_ext.load_model(d, dtype=request.param), apd_ext.load_model(a, dtype=request.param)
    torch.set_num_threads(threads)


def _serve(pair, arrivals, batch_invariant=True):
    """arrivals: [(step, request_id, prompt, params)] -> {request_id: (tokens, logprobs)}."""
    engine = Engine(*pair, APDConfig(R=0.6, W=4, M=12), max_batch=4, max_len=160,
                    batch_invariant=batch_invariant)
    got, step, todo = {}, 0, sorted(arrivals, key=lambda a: a[0])
    while todo or engine.has_unfinished():
        while todo and todo[0][0] <= step:
            _, rid, prompt, params = todo.pop(0)
            engine.add_request(prompt, params, request_id=rid)
        for o in engine.step():
            toks, lps = got.setdefault(o.request_id, ([], []))
            assert o.finish_reason != "error", o.error
            toks += o.new_tokens
            lps += o.logprobs or []
        step += 1
        assert step < 400
    return got


def test_engine_logprobs_are_bit_identical_alone_and_batched(pair):
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 560, (n,), generator=g).tolist() for n in (31, 5, 58, 12)]
    params = [dict(temperature=t, seed=s, max_new_tokens=m, logprobs=3, stop_token_ids=[])
              for t, s, m in ((0.8, 1, 30), (0.0, 2, 12), (1.0, 3, 40), (0.5, 4, 20))]
    alone = {f"r{i}": _serve(pair, [(0, f"r{i}", prompts[i], params[i])])[f"r{i}"] for i in range(4)}
    for order in ([0, 1, 2, 3], [2, 0, 3, 1]):
        arrivals = [(2 * k, f"r{i}", prompts[i], params[i]) for k, i in enumerate(order)]
        got = _serve(pair, arrivals)
        for rid, (toks, lps) in alone.items():
            assert got[rid][0] == toks, f"{rid}: tokens"
            assert len(lps) == len(toks) and got[rid][1] == lps, f"{rid}: logprobs"


def test_batch_invariant_argument_errors(pair):
    with pytest.raises(ValueError, match="cuda_graphs"):
        Engine(*pair, batch_invariant=True, cuda_graphs=True)
    with pytest.raises(TypeError, match="batch_invariant"):
        Engine(*pair, batch_invariant=1)


def test_serve_batch_invariant_flag():
    pytest.importorskip("ray.serve")
    import argparse

    from apd_ext.serve.app import APDServer
    from apd_ext.serve.ray_app import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p, "d", "a")
    assert p.parse_args(["--batch-invariant"]).batch_invariant and not p.parse_args([]).batch_invariant
    d, a = tiny.paths()
    assert APDServer(d, a, threads=1, max_batch=2, max_len=128, M=8, batch_invariant=True).engine.batch_invariant
    assert not APDServer(d, a, threads=1, max_batch=2, max_len=128, M=8).engine.batch_invariant
