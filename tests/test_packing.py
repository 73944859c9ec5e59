"""Packed variable-length windows (models/packing.py): a forward given the host
plan of its valid rows equals the forward without one (the CPU's own
nonzero() packing, bit for bit; the padded layout and each sequence alone,
within fp32 rounding), and the planned path reads no device value (run on
the meta device, where any such read raises)."""
import pytest
import torch

import apd_ext.models.qwen2 as qwen2
from apd_ext.models import Packing, random_model
from apd_ext.models.packing import pack_index

V = 509
CFG = {
    "model_type": "qwen2", "vocab_size": V, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "eos_token_id": 2,
}
# fp32: a packed GEMM of N rows vs a padded one of B * Lw rows, or one sequence
# alone, differ by accumulation order only (tests/test_models.py uses 2e-5).
ATOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def i64(*xs):
    return torch.tensor(xs, dtype=torch.int64)


@pytest.fixture(scope="module", params=["qwen2", "Dream"])
def model(request):
    cfg = {**CFG, "model_type": request.param, "mask_token_id": 508}
    return random_model(cfg, seed=3, std=0.08)


def _prefill(model, B, max_len, lens, seed):
    """A cache of B sequences holding lens[b] positions of random ids."""
    g = torch.Generator().manual_seed(seed)
    cache = model.new_cache(B, max_len)
    P = max(max(lens), 1)
    model.forward(torch.randint(0, V, (B, P), generator=g), cache, torch.zeros(B, dtype=torch.int64),
                  torch.tensor(lens))
    return cache


def _clone(cache):
    c = type(cache).__new__(type(cache))
    c.__dict__.update(cache.__dict__)
    c._k, c._v, c.lengths = cache._k.clone(), cache._v.clone(), cache.lengths.clone()
    return c


# Odd lengths: a long window beside short ones, q_len 0 rows, a 1-row window.
CASES = [
    # (prefix lengths, q_len, Lw, logit_rows (row_start, n_rows) or None)
    ([0, 5, 9, 3, 0], [17, 3, 0, 1, 5], 17, None),
    ([0, 5, 9, 3, 0], [17, 3, 0, 1, 5], 17, ((0, 2, 0, 0, 4), 1)),
    ([4, 0, 7], [2, 13, 1], 13, ((1, 3, 0), 5)),  # rows past a sequence's q_len: padding
    ([6, 2], [1, 0], 1, None),  # a 1-row window, one sequence idle
    ([6, 2], [1, 1], 1, ((0, 0), 1)),  # every row valid: dense
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_plan_equals_cpu_packing_and_padded(model, case, monkeypatch):
    prefix, q_len, Lw, lr = CASES[case]
    B = len(q_len)
    cache0 = _prefill(model, B, 40, prefix, seed=case)
    g = torch.Generator().manual_seed(100 + case)
    ids = torch.randint(0, V, (B, Lw), generator=g)
    q_start, ql = torch.tensor(prefix), torch.tensor(q_len)
    rows = None if lr is None else (torch.tensor(lr[0]), lr[1])
    plan = Packing.build(ql, Lw, "cpu")
    assert plan.n == sum(q_len) and plan.cu_seqlens.tolist()[-1] == sum(q_len)

    runs = {}
    for name in ("plan", "nonzero", "padded"):
        cache = _clone(cache0)
        monkeypatch.setattr(qwen2, "_PACK", name != "padded")
        out = model.forward(ids, cache, q_start, ql, logit_rows=rows, packing=plan if name == "plan" else None)
        runs[name] = out, cache
    out, cache = runs["plan"]
    # The same rows through the same ops: bit for bit.
    assert torch.equal(out, runs["nonzero"][0])
    assert torch.equal(cache._k, runs["nonzero"][1]._k) and torch.equal(cache._v, runs["nonzero"][1]._v)
    assert cache.lengths.tolist() == [p + n for p, n in zip(prefix, q_len)]
    # The padded layout: valid rows within rounding, the cache's valid positions too.
    pad_out, pad_cache = runs["padded"]
    for b in range(B):
        if lr is None:
            n = q_len[b]
            got, want = out[b, :n], pad_out[b, :n]
        else:
            keep = [r for r in range(lr[1]) if lr[0][b] + r < q_len[b]]
            got, want = out[b, keep], pad_out[b, keep]
        torch.testing.assert_close(got, want, atol=ATOL[torch.float32], rtol=1e-5)
        L = prefix[b] + q_len[b]
        torch.testing.assert_close(cache.k[:, b, :L], pad_cache.k[:, b, :L], atol=ATOL[torch.float32], rtol=1e-5)
    # Padding rows of the packed forward: zero logits (finite, meaningless).
    assert torch.isfinite(out).all()


def test_plan_equals_each_sequence_alone(model):
    # A long window (a joining prompt) beside short decoding windows, each
    # sequence then run alone in a batch of one: the batch invariance the
    # Engine relies on, through the planned path.
    prefix, q_len, Lw = [0, 11, 20, 6], [23, 4, 1, 0], 23
    B = len(q_len)
    cache = _prefill(model, B, 48, prefix, seed=7)
    alone = [_prefill(model, 1, 48, [prefix[b]], seed=7) for b in range(B)]
    for b in range(B):  # the same prefix K/V as the batched cache (the prefill was batched)
        alone[b]._k.copy_(cache._k[:, b : b + 1])
        alone[b]._v.copy_(cache._v[:, b : b + 1])
    ids = torch.randint(0, V, (B, Lw), generator=torch.Generator().manual_seed(8))
    rs = torch.tensor([0, 1, 0, 0])
    ql = torch.tensor(q_len)
    out = model.forward(ids, cache, torch.tensor(prefix), ql, logit_rows=(rs, 3), packing=Packing.build(ql, Lw, "cpu"))
    for b in range(B):
        if q_len[b] == 0:
            continue
        n = q_len[b]
        one = model.forward(ids[b : b + 1, :n], alone[b], i64(prefix[b]), i64(n),
                            logit_rows=(rs[b : b + 1], min(3, n)))
        k = min(3, n - int(rs[b]))
        torch.testing.assert_close(out[b, :k], one[0, :k], atol=ATOL[torch.float32], rtol=1e-5)
        L = prefix[b] + n
        torch.testing.assert_close(cache.k[:, b, :L], alone[b].k[:, 0, :L], atol=ATOL[torch.float32], rtol=1e-5)


def test_pack_index_is_cu_seqlens_order():
    idx = pack_index(i64(2, 0, 3, 1), 4)
    assert idx.tolist() == [0, 1, 8, 9, 10, 12]
    assert pack_index(i64(0, 0), 3).tolist() == []
    p = Packing.build(i64(2, 0, 3, 1), 4, "cpu")
    assert p.cu_seqlens.tolist() == [0, 2, 2, 5, 6] and not p.dense
    assert Packing.build(i64(0, 0), 3, "cpu").dense and Packing.build(i64(3, 3), 3, "cpu").dense


def test_plan_argument_errors(model):
    cache = model.new_cache(2, 8)
    ids = torch.zeros(2, 4, dtype=torch.int64)
    z, ql = i64(0, 0), i64(4, 2)
    with pytest.raises(ValueError, match="q_len"):
        Packing.build(i64(5, 0), 4, "cpu")
    with pytest.raises(ValueError, match="window"):
        Packing.build(ql, 0, "cpu")
    with pytest.raises(TypeError, match="packing"):
        model.forward(ids, cache, z, ql, packing=(ql, 4))
    with pytest.raises(ValueError, match="packing"):
        model.forward(ids, cache, z, ql, packing=Packing.build(ql, 5, "cpu"))  # another window
    with pytest.raises(ValueError, match="packing"):
        model.forward(ids, cache, z, ql, packing=Packing.build(i64(4, 1), 4, "cpu"))  # other lengths
    with pytest.raises(ValueError, match="index"):
        Packing(ql, 4, torch.arange(5))  # 6 valid rows, 5 listed


# ------------------------------------------------------------------- no sync
def _meta_model(kind):
    # The same model on the meta device: no data, so any read of a device value
    # (.item(), bool(), tolist(), nonzero(), a data-dependent shape) raises.
    cpu = random_model({**CFG, "model_type": kind, "mask_token_id": 508}, seed=3)
    tensors = {}
    for i, L in enumerate(cpu.layers):
        p = f"model.layers.{i}."
        for n, t in (("self_attn.qkv_proj.weight", L.w_qkv), ("self_attn.qkv_proj.bias", L.b_qkv),
                     ("self_attn.o_proj.weight", L.w_o), ("mlp.gate_proj.weight", L.w_gate),
                     ("mlp.up_proj.weight", L.w_up), ("mlp.gate_up_proj.weight", L.w_gate_up),
                     ("mlp.down_proj.weight", L.w_down), ("input_layernorm.weight", L.ln_attn),
                     ("post_attention_layernorm.weight", L.ln_mlp)):
            tensors[p + n] = t.to("meta")
    tensors["model.embed_tokens.weight"] = cpu.embed.to("meta")
    tensors["lm_head.weight"] = cpu.lm_head.to("meta")
    tensors["model.norm.weight"] = cpu.norm.to("meta")
    return qwen2.Qwen2Runtime(cpu.kind, cpu.config, tensors)


def _attention_shape_only(q, k_cache, v_cache, q_start, q_len, kv_len, causal):
    # The kernel's registered fake (shapes only), as torch.compile / meta see it.
    return torch.ops.apd.window_attention(q, k_cache, v_cache, q_start, q_len, kv_len, causal, q.shape[-1] ** -0.5)


@pytest.mark.parametrize("kind", ["qwen2", "Dream"])
def test_planned_forward_reads_no_device_value(kind, monkeypatch):
    monkeypatch.setattr(qwen2, "_window_attention", _attention_shape_only)
    model = _meta_model(kind)
    meta = torch.device("meta")
    q_len_host, Lw = i64(17, 3, 0, 1, 5), 17
    B = q_len_host.numel()
    cache = model.new_cache(B, 40)
    ids = torch.zeros(B, Lw, dtype=torch.int64, device=meta)
    q_start, q_len = torch.zeros(B, dtype=torch.int64, device=meta), q_len_host.to(meta)
    plan = Packing.build(q_len_host, Lw, meta)
    assert plan.index.device == meta and plan.index.shape == (26,)
    out = model.forward(ids, cache, q_start, q_len, logit_rows=(q_start, 4), packing=plan)
    assert out.shape == (B, 4, V) and out.device == meta
    out = model.forward(ids, cache, q_start, q_len, packing=plan)
    assert out.shape == (B, Lw, V)
    # The guard bites: the CPU's own packing (valid.nonzero(), after reading
    # the row count) is a device read, and raises here. (Patching the planned
    # path to do either makes this test fail, checked by hand.)
    valid = torch.arange(Lw, device=meta) < q_len[:, None]
    with pytest.raises((RuntimeError, NotImplementedError)):
        int(valid.sum())
    with pytest.raises((RuntimeError, NotImplementedError)):
        valid.view(-1).nonzero()


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["qwen2", "Dream"])
def test_cuda_planned_forward_equals_padded_without_a_sync(kind, monkeypatch):
    # On the device: the planned forward under CUDA's sync debug mode "error"
    # (any synchronising call raises), against the padded forward of the same
    # step, valid rows within bf16 rounding of the row count's GEMM shapes.
    dev = torch.device("cuda")
    model = random_model({**CFG, "model_type": kind, "mask_token_id": 508}, dtype=torch.bfloat16, device=dev,
                         init_device="cpu", seed=3, std=0.08)
    prefix, q_len, Lw = [0, 5, 9, 3, 0], [17, 3, 0, 1, 5], 17
    B = len(q_len)
    ids = torch.randint(0, V, (B, Lw), generator=torch.Generator().manual_seed(4)).to(dev)
    q_start, ql = torch.tensor(prefix).to(dev), torch.tensor(q_len).to(dev)
    rs = torch.tensor([0, 2, 0, 0, 4]).to(dev)
    caches = [model.new_cache(B, 40) for _ in range(2)]
    for c in caches:
        c.lengths.copy_(q_start)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = Packing.build(torch.tensor(q_len), Lw, dev)
        got = model.forward(ids, caches[0], q_start, ql, logit_rows=(rs, 2), packing=plan)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setattr(qwen2, "_PACK", False)
    want = model.forward(ids, caches[1], q_start, ql, logit_rows=(rs, 2))
    for b in range(B):
        keep = [r for r in range(2) if int(rs[b]) + r < q_len[b]]
        torch.testing.assert_close(got[b, keep].float(), want[b, keep].float(), atol=0.1, rtol=0.05)
    assert torch.equal(caches[0].lengths, caches[1].lengths)


def test_engine_forwards_run_packed(tiny_pair_fp32, monkeypatch):
    # A long prompt joins short decoding rows: every forward the Engine runs
    # carries a plan of exactly its q_len (so it computes sum(q_len) rows),
    # and the join step's dLLM forward is the ragged one the plan exists for.
    from apd_ext.config import APDConfig
    from apd_ext.decoding.engine import Engine

    seen = []  # (kind, B * Lw, plan rows, sum(q_len))
    orig = qwen2.Qwen2Runtime.forward

    def forward(model, input_ids, cache, q_start, q_len, logit_rows=None, packing=None):
        assert packing is not None, f"a {model.kind} forward without a plan"
        assert torch.equal(packing.q_len, q_len.cpu()) and packing.window == input_ids.shape[1]
        seen.append((model.kind, input_ids.numel(), packing.n, int(q_len.sum())))
        return orig(model, input_ids, cache, q_start, q_len, logit_rows, packing=packing)

    monkeypatch.setattr(qwen2.Qwen2Runtime, "forward", forward)
    dllm, ver = tiny_pair_fp32
    engine = Engine(dllm, ver, APDConfig(M=8, W=4), max_batch=4, max_len=160)
    params = dict(max_new_tokens=40, stop_token_ids=[], seed=0)
    for i in range(3):
        engine.add_request(list(range(5, 9 + i)), params, f"s{i}")
    engine.step()
    engine.step()
    seen.clear()
    engine.add_request(list(range(5, 95)), params, "long")
    engine.step()
    assert all(n == s for _, _, n, s in seen)
    d = [(pad, n) for kind, pad, n, _ in seen if kind == "dllm"]
    assert len(d) == 1 and d[0][1] < d[0][0] / 2, d  # 3 short windows + one of 98 rows, vs 4 x 98
