"""Batched decoding (B >= 1, ragged prompts): every sequence of a batch gives
exactly the tokens and steps it gives alone with its own seed (CPU, fp32 tiny
checkpoints; the apd ops take no fp64, and the CPU forwards are row-wise, so
fp32 batching is bit-exact here)."""
from types import SimpleNamespace

import pytest
import torch

import apd_ext
from apd_ext import generate, generate_ar, generate_leftright
from tests.model_utils import make_tiny_dream, make_tiny_qwen2

MASK = 508
# Ragged: one-token, short, and longer-than-W prompts (cached prefixes differ per sequence).
PROMPTS = [[(7 * i + 11 + 13 * k) % 500 + 3 for i in range(n)] for k, n in enumerate((24, 3, 17, 1, 30))]
SEEDS = [3, 11, 5, 3, 8]
NEW = 20


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("apd_batch")
    make_tiny_dream(root / "dream", seed=0, mask_token_id=MASK)
    make_tiny_qwen2(root / "qwen", seed=1)
    return SimpleNamespace(dllm=apd_ext.load_model(root / "dream"), verifier=apd_ext.load_model(root / "qwen"))


def _apd(p, prompts, seeds, **kw):
    return generate(p.dllm, p.verifier, prompts, seeds=seeds, **kw)


def _assert_alone(batched, alone_fn, prompts, seeds):
    """Sequence b of `batched` == alone_fn(prompt b, seed b); returns the alone outputs."""
    alone = [alone_fn([p], [s]) for p, s in zip(prompts, seeds)]
    for b, a in enumerate(alone):
        assert batched.generated(b).tolist() == a.generated(0).tolist(), f"sequence {b}"
        assert batched.accepted_per_step[b] == a.accepted_per_step[0], f"sequence {b}"
        assert batched.sequences[b, : len(prompts[b])].tolist() == prompts[b]
    assert int(batched.num_generated.sum()) == batched.stats.generated_tokens
    assert batched.stats.batch_size == len(prompts)
    assert batched.stats.steps == max(len(a) for a in batched.accepted_per_step)
    assert batched.stats.sequence_steps == sum(len(a) for a in batched.accepted_per_step)
    return alone


def _mixed_eos(free_runs):
    """EOS ids that end some sequences early (fresh ids at depth >= 1 of their
    free runs) while at least one sequence never meets any of them, so that
    the batch mixes EOS times and budget ends."""
    gens = [o.generated(0).tolist() for o in free_runs]
    ids = []
    for g in gens:
        x = next((g[k] for k in range(1, len(g)) if g[k] not in g[:k]), None)
        if x is not None and x not in ids and any(not set(ids + [x]) & set(h) for h in gens):
            ids.append(x)
    if not ids:
        pytest.fail(f"no EOS candidate in {gens}")
    return ids


@pytest.mark.parametrize("tau", [0.0, 0.7])
@pytest.mark.parametrize("R,W,M", [(0.7, 16, 100), (0.5, 1, 8), (0.9, None, 32)])
def test_apd_batch_equals_alone(pair, R, W, M, tau):
    kw = dict(R=R, W=W, M=M, temperature=tau, top_p=0.95, max_new_tokens=NEW)
    free = [_apd(pair, [p], [s], eos_token_ids=[], **kw) for p, s in zip(PROMPTS, SEEDS)]
    eos = _mixed_eos(free)
    out = _apd(pair, PROMPTS, SEEDS, eos_token_ids=eos, **kw)
    _assert_alone(out, lambda p, s: _apd(pair, p, s, eos_token_ids=eos, **kw), PROMPTS, SEEDS)
    n = out.num_generated.tolist()
    assert min(n) < NEW and max(n) == NEW, n  # some end at an EOS, others at the budget


def test_one_finishes_at_step_one_another_runs_to_the_budget(pair, monkeypatch):
    kw = dict(R=0.7, W=4, M=8, temperature=0.7, max_new_tokens=NEW)
    free = [_apd(pair, [p], [s], eos_token_ids=[], **kw) for p, s in zip(PROMPTS, SEEDS)]
    eos = free[1].generated(0).tolist()[0]  # sequence 1's first token: it ends at step 1
    full = next((b for b in range(len(PROMPTS)) if eos not in free[b].generated(0).tolist()), None)
    if full is None:
        pytest.fail(f"every free run contains id {eos}")
    sizes = []
    forward = pair.dllm.forward
    def counting(ids, *a, **k):
        sizes.append(ids.shape[0])
        return forward(ids, *a, **k)
    monkeypatch.setattr(pair.dllm, "forward", counting)
    seen = []
    out = _apd(pair, PROMPTS, SEEDS, eos_token_ids=[eos], callback=lambda step, toks: seen.append(toks), **kw)
    monkeypatch.undo()
    assert out.accepted_per_step[1] == [1] and out.generated(1).tolist() == [eos]
    assert int(out.num_generated[full]) == NEW
    _assert_alone(out, lambda p, s: _apd(pair, p, s, eos_token_ids=[eos], **kw), PROMPTS, SEEDS)
    # Finished sequences leave the batch (compaction): the dLLM's forward shrinks.
    assert sizes[0] == len(PROMPTS) and sizes[1] < len(PROMPTS) and sizes == sorted(sizes, reverse=True)
    # The callback streams each sequence's commits, in batch order; [] once finished.
    for b in range(len(PROMPTS)):
        assert sum((s[b] for s in seen), []) == out.generated(b).tolist()
    assert seen[1][1] == []


@pytest.mark.parametrize("W,M", [(4, 8), (None, 32)])
def test_per_row_budgets_equal_alone_with_that_budget(pair, W, M):
    # Each sequence's own max_new_tokens: what it gets alone with that budget
    # (windows clipped at its own end), in one batched call.
    budgets = [5, 20, 1, 12, 9]
    kw = dict(R=0.7, W=W, M=M, temperature=0.7, top_p=0.95, max_new_tokens=NEW)
    out = _apd(pair, PROMPTS, SEEDS, eos_token_ids=[], max_new_tokens_per_row=budgets, **kw)
    assert out.num_generated.tolist() == budgets  # no EOS: each runs to its own budget
    assert out.sequences.shape[1] == max(map(len, PROMPTS)) + max(budgets)
    for b, n in enumerate(budgets):
        alone = _apd(pair, [PROMPTS[b]], [SEEDS[b]], eos_token_ids=[], **dict(kw, max_new_tokens=n))
        assert out.generated(b).tolist() == alone.generated(0).tolist(), f"sequence {b}"
        assert out.accepted_per_step[b] == alone.accepted_per_step[0], f"sequence {b}"
    for bad, what in (([5, 20], "expected 5 budgets"), ([5, 0, 1, 1, 1], r"max_new_tokens_per_row\[1\]"),
                      ([5, 2.0, 1, 1, 1], r"max_new_tokens_per_row\[1\]")):
        with pytest.raises(ValueError, match=what):
            _apd(pair, PROMPTS, SEEDS, max_new_tokens_per_row=bad, **kw)


def test_leftright_batch_equals_alone(pair):
    kw = dict(K=3, W=4, M=8, temperature=0.7, max_new_tokens=NEW)
    free = [generate_leftright(pair.dllm, [p], seeds=[s], eos_token_ids=[], **kw) for p, s in zip(PROMPTS, SEEDS)]
    eos = _mixed_eos(free)
    # [B, L] right-padded with an attention mask.
    L = max(len(p) for p in PROMPTS)
    ids = torch.tensor([p + [0] * (L - len(p)) for p in PROMPTS])
    mask = torch.tensor([[1] * len(p) + [0] * (L - len(p)) for p in PROMPTS])
    out = generate_leftright(pair.dllm, ids, attention_mask=mask, seeds=SEEDS, eos_token_ids=eos, **kw)
    _assert_alone(out, lambda p, s: generate_leftright(pair.dllm, p, seeds=s, eos_token_ids=eos, **kw),
                  PROMPTS, SEEDS)


def test_ar_batch_equals_alone(pair):
    kw = dict(temperature=0.7, top_p=0.95, max_new_tokens=12)
    free = [generate_ar(pair.verifier, [p], seeds=[s], eos_token_ids=[], **kw) for p, s in zip(PROMPTS, SEEDS)]
    eos = _mixed_eos(free)
    # [B, L] left-padded with an attention mask.
    L = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in PROMPTS])
    out = generate_ar(pair.verifier, ids, attention_mask=mask, seeds=SEEDS, eos_token_ids=eos, **kw)
    _assert_alone(out, lambda p, s: generate_ar(pair.verifier, p, seeds=s, eos_token_ids=eos, **kw),
                  PROMPTS, SEEDS)
    greedy = generate_ar(pair.verifier, PROMPTS, temperature=0.0, max_new_tokens=6, eos_token_ids=[])
    _assert_alone(greedy, lambda p, s: generate_ar(pair.verifier, p, temperature=0.0, max_new_tokens=6,
                                                   eos_token_ids=[]), PROMPTS, [0] * len(PROMPTS))


def test_default_seed_is_the_same_for_every_sequence(pair):
    kw = dict(R=0.5, W=4, M=8, temperature=0.7, max_new_tokens=10, eos_token_ids=[], seed=7)
    out = generate(pair.dllm, pair.verifier, [PROMPTS[0], PROMPTS[2], PROMPTS[0]], **kw)
    assert out.generated(0).tolist() == out.generated(2).tolist()
    assert out.generated(0).tolist() == generate(pair.dllm, pair.verifier, [PROMPTS[0]], **kw).generated(0).tolist()
    assert out.sequence_stats(1)["generated_tokens"] == 10


def test_bad_batch_inputs(pair):
    g = lambda ids, **kw: generate(pair.dllm, pair.verifier, ids, max_new_tokens=4, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="seeds"):
        g(PROMPTS[:3], seeds=[1, 2])
    with pytest.raises(ValueError, match=r"seeds\[1\]"):
        g(PROMPTS[:2], seeds=[1, -2])
    with pytest.raises(ValueError, match="seeds"):
        generate_ar(pair.verifier, PROMPTS[:2], seeds=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"input_ids\[1\].*empty prompt"):
        g([PROMPTS[0], []])
    with pytest.raises(ValueError, match=r"input_ids\[2\].*token ids in"):
        g([PROMPTS[0], PROMPTS[1], [3, 9999]])
    ids = torch.tensor([PROMPTS[0][:5], PROMPTS[2][:5]])
    with pytest.raises(ValueError, match="attention_mask"):
        g(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))  # shape
    with pytest.raises(ValueError, match=r"attention_mask\[1\]"):
        g(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0]]))  # not padding
    with pytest.raises(ValueError, match=r"attention_mask\[0\]"):
        g(ids, attention_mask=torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]))  # empty prompt
    with pytest.raises(ValueError, match="attention_mask"):
        g(ids, attention_mask=torch.full((2, 5), 2))
    with pytest.raises(ValueError, match="attention_mask"):
        g(PROMPTS[:2], attention_mask=torch.ones(2, 5, dtype=torch.long))  # a list carries its lengths
    with pytest.raises(ValueError, match="attention_mask"):
        generate_leftright(pair.dllm, ids, attention_mask=torch.ones(3, 5, dtype=torch.long))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,min_agree", [(torch.float32, 1.0), (torch.bfloat16, 0.99)])
def test_cuda_batch_invariance(pair, tmp_path, dtype, min_agree):
    """On CUDA the GEMMs may tile differently per batch size: fp32 must still
    be exact, bf16 must agree on >= 99% of the tokens (positionwise)."""
    make_tiny_dream(tmp_path / "dream", seed=0, mask_token_id=MASK)
    make_tiny_qwen2(tmp_path / "qwen", seed=1)
    dllm = apd_ext.load_model(tmp_path / "dream", dtype=dtype, device="cuda")
    ver = apd_ext.load_model(tmp_path / "qwen", dtype=dtype, device="cuda")
    agree = total = 0
    for R, W, M in [(0.7, 16, 100), (0.5, 1, 8), (0.9, None, 32)]:
        kw = dict(R=R, W=W, M=M, temperature=0.7, max_new_tokens=NEW, eos_token_ids=[])
        out = generate(dllm, ver, PROMPTS, seeds=SEEDS, **kw)
        for b, (p, s) in enumerate(zip(PROMPTS, SEEDS)):
            a = generate(dllm, ver, [p], seeds=[s], **kw).generated(0).tolist()
            g = out.generated(b).tolist()
            agree += sum(x == y for x, y in zip(a, g))
            total += max(len(a), len(g))
    assert agree >= min_agree * total, f"{agree}/{total} tokens agree"


class _EagerGraph:
    """CPU stand-in for models.graphs.GraphedForward with its contract: fixed
    [batch, window] inputs on a fixed cache object, padding rows/sequences of
    q_len 0, one output buffer overwritten by every call."""

    captured = []

    def __init__(self, model, cache, window, *, n_rows=None, warmup=2, pool=None):
        self.model, self.cache, self.window, self.n_rows = model, cache, window, n_rows
        self.logits = None
        _EagerGraph.captured.append((model.kind, cache.batch_size, window))

    def __call__(self, input_ids, q_start, q_len, row_start=None):
        assert tuple(input_ids.shape) == (self.cache.batch_size, self.window)
        rows = None if self.n_rows is None else (row_start, self.n_rows)
        out = self.model.forward(input_ids, self.cache, q_start, q_len, logit_rows=rows)
        if self.logits is None:
            self.logits = torch.empty_like(out)
        self.logits.copy_(out)
        return self.logits


def test_batched_graph_path_matches_eager_on_cpu(pair, monkeypatch):
    """cuda_graphs=True with B > 1: the verifier replays one M-row graph per
    batch bucket (1, 2, 4, B) on views of one cache, through compactions."""
    import apd_ext.decoding.apd as apd_mod
    import apd_ext.models.graphs as graphs

    kw = dict(R=0.7, W=4, M=8, temperature=0.7, max_new_tokens=NEW)
    free = [_apd(pair, [p], [s], eos_token_ids=[], **kw) for p, s in zip(PROMPTS, SEEDS)]
    eos = _mixed_eos(free)
    eager = _apd(pair, PROMPTS, SEEDS, eos_token_ids=eos, **kw)
    monkeypatch.setattr(graphs, "GraphedForward", _EagerGraph)
    monkeypatch.setattr(apd_mod, "_graphs_supported", lambda device: True)
    _EagerGraph.captured = []
    graphed = _apd(pair, PROMPTS, SEEDS, eos_token_ids=eos, cuda_graphs=True, **kw)
    assert graphed.accepted_per_step == eager.accepted_per_step
    assert torch.equal(graphed.sequences, eager.sequences)
    assert sorted(_EagerGraph.captured) == [("ar", b, 8) for b in (1, 2, 4, 5)]
    n = graphed.num_generated.tolist()
    assert min(n) < NEW and max(n) == NEW  # the batch shrank on the way


@pytest.mark.cuda
def test_cuda_batched_graphs_match_eager(pair, tmp_path):
    make_tiny_dream(tmp_path / "dream", seed=0, mask_token_id=MASK)
    make_tiny_qwen2(tmp_path / "qwen", seed=1)
    dllm = apd_ext.load_model(tmp_path / "dream", device="cuda")
    ver = apd_ext.load_model(tmp_path / "qwen", device="cuda")
    kw = dict(R=0.7, W=4, M=8, temperature=0.7, max_new_tokens=NEW, seeds=SEEDS)
    free = [generate(dllm, ver, [p], **dict(kw, seeds=[s]), eos_token_ids=[]) for p, s in zip(PROMPTS, SEEDS)]
    eos = _mixed_eos(free)
    eager = generate(dllm, ver, PROMPTS, eos_token_ids=eos, **kw)
    graphed = generate(dllm, ver, PROMPTS, eos_token_ids=eos, cuda_graphs=True, **kw)
    assert graphed.accepted_per_step == eager.accepted_per_step
    assert torch.equal(graphed.sequences, eager.sequences)
