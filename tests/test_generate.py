"""The APD loop and its baselines on tiny random checkpoints (CPU, fp32).

The oracle is apd_ext.reference_loop: transformers' Qwen2 modules plus the
pure-PyTorch reference ops. Random weights make acceptance meaningless as a
quality signal, but not as a contract: the fast loop must reproduce the
reference token for token, step for step.
"""
import copy
from types import SimpleNamespace

import pytest
import torch

import apd_ext
from apd_ext import APDConfig, generate, generate_ar, generate_diffusion, generate_leftright
from apd_ext.reference_loop import reference_generate
from tests.model_utils import make_tiny_dream, make_tiny_qwen2

MASK = 508
# 24 prompt tokens: long enough that W=16 leaves a cached prefix (left > 0).
PROMPT = [(7 * i + 11) % 500 + 3 for i in range(24)]
NEW = 20


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("apd_pair")
    hf_dllm = make_tiny_dream(root / "dream", seed=0, mask_token_id=MASK)
    hf_ver = make_tiny_qwen2(root / "qwen", seed=1)
    return SimpleNamespace(
        root=root,
        dllm=apd_ext.load_model(root / "dream"),
        verifier=apd_ext.load_model(root / "qwen"),
        hf_dllm=hf_dllm,
        hf_verifier=hf_ver,
    )


def _gen(p, **kw):
    return generate(p.dllm, p.verifier, [PROMPT], **kw)


def _tokens(out):
    return out.sequences[0, : len(PROMPT) + int(out.num_generated[0])].tolist()


def _first_new_token(ids, k):
    """An index >= k whose token does not occur before it, and that token."""
    for i in range(k, len(ids)):
        if ids[i] not in ids[:i]:
            return i, ids[i]
    pytest.fail(f"no fresh token after index {k} in {ids}")


# --------------------------------------------------------------- oracle


MODES = {
    "coupled": dict(acceptance="coupled"),
    "argmax": dict(acceptance="argmax"),
    "official": dict(compat="official"),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("tau", [0.0, 0.7])
@pytest.mark.parametrize("R,W,M", [(0.7, 16, 100), (0.5, 1, 8), (0.9, None, 32)])
def test_matches_reference_loop(pair, R, W, M, tau, mode):
    kw = dict(R=R, W=W, M=M, temperature=tau, top_p=0.95, max_new_tokens=NEW, seed=3, **MODES[mode])
    out = _gen(pair, **kw)
    ref = reference_generate(pair.hf_dllm, pair.hf_verifier, PROMPT, mask_token_id=MASK,
                             eos_token_ids=pair.dllm.config.eos_token_ids, **kw)
    assert _tokens(out) == ref.tokens
    assert out.accepted_per_step[0] == ref.accepted_per_step
    assert int(out.num_generated[0]) == ref.num_generated
    s = out.stats
    assert s.steps == len(ref.accepted_per_step) == s.dllm_forwards
    assert s.verifier_forwards == s.steps + 1  # + the prompt prefill
    assert s.generated_tokens == ref.num_generated
    assert s.seconds > 0 and s.tokens_per_second > 0


def test_reference_from_checkpoint_folders(pair):
    """The reference loop reading the folders with transformers (Dream's
    config.json mapped onto Qwen2Config) gives the fast loop's tokens."""
    from apd_ext.reference_loop import reference_generate_from_paths

    kw = dict(R=0.7, W=4, M=8, temperature=0.7, top_p=0.95, max_new_tokens=NEW, seed=1)
    ref = reference_generate_from_paths(str(pair.root / "dream"), str(pair.root / "qwen"), PROMPT, **kw)
    out = _gen(pair, **kw)
    assert _tokens(out) == ref.tokens and out.accepted_per_step[0] == ref.accepted_per_step


# --------------------------------------------------------------- properties


def test_R1_accepts_every_drafted_row(pair):
    out = _gen(pair, R=1.0, W=4, M=6, temperature=0.7, max_new_tokens=NEW, eos_token_ids=[])
    t, L, want = len(PROMPT), len(PROMPT) + NEW, []
    while t < L:
        want.append(min(6, L - t))
        t += want[-1]
    assert out.accepted_per_step[0] == want


@pytest.mark.parametrize("W", [None, 3])
def test_M1_equals_leftright_K1(pair, W):
    kw = dict(temperature=0.7, top_p=0.95, top_k=0, seed=5, max_new_tokens=12)
    a = _gen(pair, R=0.6, W=W, M=1, **kw)
    b = generate_leftright(pair.dllm, [PROMPT], K=1, W=W, M=1, **kw)
    assert _tokens(a) == _tokens(b)
    assert a.accepted_per_step == b.accepted_per_step
    assert all(n == 1 for n in a.accepted_per_step[0])
    assert b.stats.verifier_forwards == 0


def test_baseline_defaults_are_apdconfig_defaults(pair):
    cfg = APDConfig()
    a = _gen(pair, M=1, W=None, max_new_tokens=8)
    b = generate_leftright(pair.dllm, [PROMPT], K=1, W=None, M=1, max_new_tokens=8)
    assert _tokens(a) == _tokens(b)
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed) == (0.2, 0.95, 0, 0)


def test_W_beyond_sequence_equals_no_cache(pair):
    kw = dict(R=0.5, M=8, temperature=0.7, seed=2, max_new_tokens=NEW)
    a = _gen(pair, W=1000, **kw)
    b = _gen(pair, W=None, **kw)
    assert _tokens(a) == _tokens(b) and a.accepted_per_step == b.accepted_per_step


def test_window_changes_the_result_of_stale_caches(pair):
    # W=1 reuses stale KV, W=None recomputes all: the dLLM sees different
    # contexts, so at least the logits (and, with these weights, the tokens) move.
    kw = dict(R=0.5, M=8, temperature=0.7, seed=2, max_new_tokens=NEW)
    assert _tokens(_gen(pair, W=1, **kw)) != _tokens(_gen(pair, W=None, **kw))


def test_seeds(pair):
    kw = dict(R=0.5, W=4, M=8, temperature=0.7, max_new_tokens=16, eos_token_ids=[])
    a, b, c = _gen(pair, seed=11, **kw), _gen(pair, seed=11, **kw), _gen(pair, seed=12, **kw)
    assert _tokens(a) == _tokens(b)
    assert _tokens(a) != _tokens(c)


def test_config_object_and_overrides(pair):
    cfg = APDConfig(R=0.5, W=2, M=4, temperature=0.7, max_new_tokens=8, seed=9)
    a = generate(pair.dllm, pair.verifier, torch.tensor([PROMPT]), cfg)
    b = _gen(pair, R=0.5, W=2, M=4, temperature=0.7, max_new_tokens=8, seed=9)
    c = generate(pair.dllm, pair.verifier, [PROMPT], cfg, seed=10)
    assert _tokens(a) == _tokens(b)
    assert _tokens(a) != _tokens(c)
    assert cfg.seed == 9  # overrides never mutate the caller's config


def test_callback_streams_every_commit(pair):
    seen = []
    out = _gen(pair, R=0.5, W=4, M=8, temperature=0.7, max_new_tokens=NEW,
               callback=lambda step, toks: seen.append((step, list(toks[0]))))
    assert [s for s, _ in seen] == list(range(1, out.stats.steps + 1))
    assert [len(t) for _, t in seen] == out.accepted_per_step[0]
    assert sum((t for _, t in seen), []) == out.generated(0).tolist()


def test_max_new_tokens(pair):
    out = _gen(pair, R=0.9, W=4, M=32, temperature=0.7, max_new_tokens=7, eos_token_ids=[])
    assert out.sequences.shape == (1, len(PROMPT) + 7)
    assert int(out.num_generated[0]) == 7 == sum(out.accepted_per_step[0])
    assert out.sequences[0, : len(PROMPT)].tolist() == PROMPT


def test_eos_stops_and_is_counted(pair):
    kw = dict(R=0.5, W=4, M=8, temperature=0.7, seed=4, max_new_tokens=NEW)
    free = _gen(pair, eos_token_ids=[], **kw).generated(0).tolist()
    k, eos = _first_new_token(free, 5)
    out = _gen(pair, eos_token_ids=[eos], **kw)
    assert int(out.num_generated[0]) == k + 1 == out.stats.generated_tokens
    assert out.generated(0).tolist() == free[: k + 1]
    pad = pair.dllm.config.pad_token_id
    assert out.sequences[0, len(PROMPT) + k + 1 :].tolist() == [pad] * (NEW - k - 1)


def test_checkpoint_eos_is_the_default(pair, tmp_path):
    """The same weights saved with an EOS id the loop is known to draft: without
    eos_token_ids, generation stops at the checkpoint's EOS and counts it."""
    kw = dict(R=0.5, W=4, M=8, temperature=0.7, seed=4, max_new_tokens=NEW)
    free = _gen(pair, eos_token_ids=[], **kw).generated(0).tolist()
    k, eos = _first_new_token(free, 6)
    make_tiny_dream(tmp_path / "dream", seed=0, mask_token_id=MASK, eos_token_id=eos)
    make_tiny_qwen2(tmp_path / "qwen", seed=1, eos_token_id=eos)
    dllm, ver = apd_ext.load_model(tmp_path / "dream"), apd_ext.load_model(tmp_path / "qwen")
    assert dllm.config.eos_token_ids == [eos]
    out = generate(dllm, ver, [PROMPT], **kw)
    assert out.generated(0).tolist() == free[: k + 1]
    assert out.stats.generated_tokens == k + 1


# --------------------------------------------------------------- baselines


def test_leftright_runs_and_stops(pair):
    out = generate_leftright(pair.dllm, [PROMPT], K=3, temperature=0.7, seed=1, max_new_tokens=NEW,
                             eos_token_ids=[])
    assert int(out.num_generated[0]) == NEW
    assert out.accepted_per_step[0] == [3] * 6 + [2]
    free = out.generated(0).tolist()
    k, eos = _first_new_token(free, 4)
    out = generate_leftright(pair.dllm, [PROMPT], K=3, temperature=0.7, seed=1, max_new_tokens=NEW,
                             eos_token_ids=[eos])
    assert out.generated(0).tolist() == free[: k + 1]


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
def test_diffusion_runs_and_stops(pair, alg):
    out = generate_diffusion(pair.dllm, [PROMPT], steps=4, alg=alg, temperature=0.7, seed=1,
                             max_new_tokens=10, eos_token_ids=[])
    assert out.stats.steps == 4 == out.stats.dllm_forwards
    assert int(out.num_generated[0]) == 10 == sum(out.accepted_per_step[0])
    gen = out.generated(0)
    assert not (gen == MASK).any()
    again = generate_diffusion(pair.dllm, [PROMPT], steps=4, alg=alg, temperature=0.7, seed=1,
                               max_new_tokens=10, eos_token_ids=[])
    assert torch.equal(out.sequences, again.sequences)


def test_diffusion_one_step_is_the_argmax_of_one_forward(pair):
    out = generate_diffusion(pair.dllm, [PROMPT], steps=1, alg="entropy", temperature=0.0, max_new_tokens=6,
                             eos_token_ids=[])
    x = torch.tensor([PROMPT + [MASK] * 6])
    logits = pair.hf_dllm(input_ids=x, attention_mask={"full_attention": torch.zeros(1, 1, 30, 30)}).logits
    assert out.generated(0).tolist() == logits[0, len(PROMPT) - 1 : -1].argmax(-1).tolist()


def test_ar_greedy_matches_transformers(pair):
    out = generate_ar(pair.verifier, [PROMPT], temperature=0.0, max_new_tokens=10, eos_token_ids=[])
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(pair.hf_verifier(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert _tokens(out) == ids
    assert out.stats.steps == 10 == out.stats.verifier_forwards


def test_ar_sampled_runs_and_stops_at_eos(pair):
    free = generate_ar(pair.verifier, [PROMPT], temperature=0.7, top_p=0.95, seed=3, max_new_tokens=12,
                       eos_token_ids=[]).generated(0).tolist()
    k, eos = _first_new_token(free, 3)
    out = generate_ar(pair.verifier, [PROMPT], temperature=0.7, top_p=0.95, seed=3, max_new_tokens=12,
                      eos_token_ids=eos)
    assert out.generated(0).tolist() == free[: k + 1]


# --------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("field,value", [("R", 1.5), ("R", -0.1), ("W", 0), ("M", 0), ("temperature", -1.0),
                                         ("max_new_tokens", 0), ("acceptance", "soft")])
def test_bad_config(pair, field, value):
    with pytest.raises(ValueError, match=field):
        APDConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        _gen(pair, **{field: value})


def test_unknown_override(pair):
    with pytest.raises(TypeError, match="unknown APDConfig field"):
        _gen(pair, RR=0.5)


def test_prompt_longer_than_context(pair):
    with pytest.raises(ValueError, match="context"):
        generate(pair.dllm, pair.verifier, [list(range(3, 515))], max_new_tokens=4)
    with pytest.raises(ValueError, match="context"):
        generate_ar(pair.verifier, [list(range(3, 600))], max_new_tokens=4)


def test_bad_prompts(pair):
    # Batching is tested in tests/test_batch.py; the diffusion baseline stays B = 1.
    with pytest.raises(ValueError, match="not batched"):
        generate_diffusion(pair.dllm, [PROMPT, PROMPT[:5]], steps=2)
    with pytest.raises(ValueError, match="token ids in"):
        generate(pair.dllm, pair.verifier, [[3, 4, 9999]])
    with pytest.raises(ValueError, match="empty prompt"):
        generate(pair.dllm, pair.verifier, torch.zeros(1, 0, dtype=torch.long))


def test_models_in_the_wrong_roles(pair):
    with pytest.raises(ValueError, match="dllm"):
        generate(pair.verifier, pair.dllm, [PROMPT])
    with pytest.raises(ValueError, match="dllm"):
        generate_leftright(pair.verifier, [PROMPT])
    with pytest.raises(ValueError, match="model"):
        generate_ar(pair.dllm, [PROMPT])


def test_dllm_without_mask_id(pair, tmp_path):
    make_tiny_dream(tmp_path / "nomask", seed=0, mask_token_id=None)
    with pytest.raises(ValueError, match="mask"):
        generate(apd_ext.load_model(tmp_path / "nomask"), pair.verifier, [PROMPT])


@pytest.mark.parametrize("ids", [dict(bos_token_id=7), dict(eos_token_id=3)])
def test_mismatched_verifier(pair, tmp_path, ids):
    make_tiny_qwen2(tmp_path / "other", seed=1, **ids)
    other = apd_ext.load_model(tmp_path / "other")
    with pytest.raises(ValueError, match="mismatch"):
        generate(pair.dllm, other, [PROMPT], max_new_tokens=4)


def test_nan_row_names_step_and_position(pair):
    broken = copy.deepcopy(pair.hf_dllm)
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    dllm = apd_ext.load_model(broken, kind="dllm", mask_token_id=MASK)
    with pytest.raises(RuntimeError, match=f"step 0: .*position {len(PROMPT)}"):
        generate(dllm, pair.verifier, [PROMPT], max_new_tokens=4)
    with pytest.raises(RuntimeError, match=f"step 0: .*position {len(PROMPT)}"):
        generate_leftright(dllm, [PROMPT], max_new_tokens=4)


# --------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_matches_cpu_with_one_sync_per_step(pair):
    """On CUDA the loop gives the CPU's tokens and synchronises the host at most
    once per step (reading n_accept), plus a few times around the loop."""
    import warnings

    dllm = apd_ext.load_model(pair.root / "dream", device="cuda")
    ver = apd_ext.load_model(pair.root / "qwen", device="cuda")
    kw = dict(R=0.5, W=4, M=8, temperature=0.7, acceptance="argmax", seed=6, max_new_tokens=NEW, eos_token_ids=[])
    cpu = _gen(pair, **kw)
    generate(dllm, ver, [PROMPT], **kw)  # warm-up: lazy CUDA init, allocator
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = generate(dllm, ver, [PROMPT], **kw)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert out.stats.steps >= 12  # argmax acceptance at tau 0.7: about one token per step
    assert len(syncs) <= out.stats.steps + 6, [str(w.message) for w in syncs[:5]]
    assert _tokens(out) == _tokens(cpu)
    assert out.stats.dllm_seconds > 0 and out.stats.verifier_seconds > 0


def test_smaller_verifier_vocab_and_one_token_prompt(pair, tmp_path):
    """V_A < V_D (Qwen2.5's 151936 vs Dream's 152064): the mixture runs over the
    shared ids, draft ids >= V_A never match; still equal to the reference. A
    one-token prompt leaves the verifier nothing to prefill."""
    hf_small = make_tiny_qwen2(tmp_path / "small", vocab=200, seed=1)
    small = apd_ext.load_model(tmp_path / "small")
    committed = []
    for prompt in (PROMPT[:5], PROMPT[:1]):
        for kw in (dict(R=0.9, W=2, M=8, temperature=1.5, top_p=1.0), dict(R=0.5, W=None, M=4, temperature=0.0)):
            kw.update(max_new_tokens=NEW, seed=8, eos_token_ids=[])
            out = generate(pair.dllm, small, [prompt], **kw)
            ref = reference_generate(pair.hf_dllm, hf_small, prompt, mask_token_id=MASK, **kw)
            assert out.sequences[0, : len(prompt) + NEW].tolist() == ref.tokens
            assert out.accepted_per_step[0] == ref.accepted_per_step
            committed += out.generated(0).tolist()
    # The dLLM committed ids the verifier lacks (step-first tokens), and the loop went on.
    assert any(v >= 200 for v in committed)


@pytest.mark.cuda
@pytest.mark.parametrize("W,M", [(4, 8), (16, 100), (None, 8)])
def test_cuda_graphs_match_eager(pair, W, M):
    dllm = apd_ext.load_model(pair.root / "dream", device="cuda")
    ver = apd_ext.load_model(pair.root / "qwen", device="cuda")
    kw = dict(R=0.7, W=W, M=M, temperature=0.7, seed=2, max_new_tokens=NEW, eos_token_ids=[])
    eager = generate(dllm, ver, [PROMPT], **kw)
    graphed = generate(dllm, ver, [PROMPT], cuda_graphs=True, **kw)
    assert _tokens(graphed) == _tokens(eager)
    assert graphed.accepted_per_step == eager.accepted_per_step
    lr = dict(temperature=0.7, seed=2, max_new_tokens=NEW, eos_token_ids=[])
    assert _tokens(generate_leftright(dllm, [PROMPT], K=3, W=W, M=M, cuda_graphs=True, **lr)) == _tokens(
        generate_leftright(dllm, [PROMPT], K=3, W=W, M=M, **lr))


def test_cuda_graphs_need_cuda(pair):
    with pytest.raises(ValueError, match="cuda_graphs"):
        _gen(pair, cuda_graphs=True, max_new_tokens=4)


class _EagerGraph:
    """A CPU stand-in for models.graphs.GraphedForward with its contract: a
    fixed window of rows, padding rows beyond q_len, and one output buffer that
    every call overwrites. It lets the CPU suite check the loop's graph path
    (bucket choice, padding, row slicing, aliasing) without a GPU."""

    windows = []

    def __init__(self, model, cache, window, *, n_rows=None, warmup=2, pool=None):
        self.model, self.cache, self.window, self.n_rows = model, cache, window, n_rows
        self.logits = None
        _EagerGraph.windows.append((model.kind, window))

    def __call__(self, input_ids, q_start, q_len, row_start=None):
        assert input_ids.shape[1] == self.window
        rows = None if self.n_rows is None else (row_start, self.n_rows)
        out = self.model.forward(input_ids, self.cache, q_start, q_len, logit_rows=rows)
        if self.logits is None:
            self.logits = torch.empty_like(out)
        self.logits.copy_(out)
        return self.logits


@pytest.mark.parametrize("W,M,new", [(4, 8, NEW), (16, 100, 40), (3, 5, 13)])
def test_graph_path_matches_eager_on_cpu(pair, monkeypatch, W, M, new):
    import apd_ext.decoding.apd as apd_mod
    import apd_ext.models.graphs as graphs

    monkeypatch.setattr(graphs, "GraphedForward", _EagerGraph)
    monkeypatch.setattr(apd_mod, "_graphs_supported", lambda device: True)
    _EagerGraph.windows = []
    kw = dict(R=0.9, W=W, M=M, temperature=0.7, seed=2, max_new_tokens=new, eos_token_ids=[])
    eager = _gen(pair, **kw)
    graphed = _gen(pair, cuda_graphs=True, **kw)
    assert _tokens(graphed) == _tokens(eager)
    assert graphed.accepted_per_step == eager.accepted_per_step
    # Captured before the loop: the verifier's min(M, new)-row graph and the
    # dLLM buckets covering windows of W + M .. 2M + W - 1 rows.
    L = len(PROMPT) + new
    lo, hi = min(M + W, L), min(2 * M + W - 1, L)
    dllm_windows = sorted(w for k, w in _EagerGraph.windows if k == "dllm")
    assert ("ar", min(M, new)) in _EagerGraph.windows
    assert dllm_windows[0] >= lo and dllm_windows[0] // 2 < lo and dllm_windows[-1] >= hi


def test_diffusion_confidence_filter():
    """The filtered distribution behind the diffusion confidences: top-k, then
    the shortest highest-first prefix reaching top_p of the kept mass, ties by
    lower index, renormalised."""
    from apd_ext.decoding.baselines import _filtered_probs

    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    p = _filtered_probs(logits, 0.0, 0, 0.8)
    assert torch.allclose(p, torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    p = _filtered_probs(logits, 1.0, 1, 1.0)
    assert torch.equal(p, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    p = _filtered_probs(torch.zeros(1, 4), 1.0, 0, 0.5)  # ties: the two lowest ids
    assert torch.allclose(p, torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    p = _filtered_probs(logits, 2.0, 0, 1.0)  # temperature flattens, keeps all
    assert torch.allclose(p, torch.softmax(logits / 2.0, dim=-1))
