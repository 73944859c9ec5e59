"""Window bounds of the APD step (DESIGN.md §6), checked against a table and
step by step against the reference loop.

Token-only comparisons barely see an off-by-one in `left` (one more stale or
recomputed KV entry changes the logits only a little), so these tests compare
the bounds themselves: a hand-written table for the bound function, and the
per-step (left, right, n_accept) of generate against reference_generate, and
both against the formula applied to the accepted counts.
"""
from types import SimpleNamespace

import pytest
import torch

import apd_ext
from apd_ext.decoding.runner import window_bounds
from apd_ext.reference_loop import reference_generate
from tests.model_utils import make_tiny_dream, make_tiny_qwen2

MASK = 508
PROMPT = [(5 * i + 7) % 500 + 3 for i in range(20)]  # 20 tokens: W <= 16 leaves left > 0
NEW = 14


def _bounds(W, M, t, n_prev, total, first):
    as_t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    n = len(t)
    left, right = window_bounds(as_t(t), as_t(n_prev), as_t(total), as_t([-1 if W is None else W] * n),
                                as_t([M] * n), torch.full((n,), bool(first)))
    return left.tolist(), right.tolist()


# (W, M, t, n_prev, total, first) -> (left, right), worked out by hand from
# left = max(t - n_prev - W + 1, 0) (0 on the first step or W None), right = min(t + M, total).
TABLE = [
    # first step: the whole prefix is computed, whatever W
    ((16, 100, 24, 0, 44, True), (0, 44)),
    ((1, 8, 24, 0, 44, True), (0, 32)),
    # W None: no cache, always from 0
    ((None, 8, 30, 3, 44, False), (0, 38)),
    ((None, 1, 43, 1, 44, False), (0, 44)),
    # W = 1: only the n_prev tokens accepted last step are recomputed
    ((1, 8, 30, 3, 44, False), (27, 38)),
    ((1, 8, 30, 1, 44, False), (29, 38)),
    # paper setting: 3 new tokens and the 15 before them
    ((16, 100, 30, 3, 144, False), (12, 130)),
    # left exactly at 0, and one above
    ((17, 4, 20, 4, 44, False), (0, 24)),
    ((16, 4, 20, 4, 44, False), (1, 24)),
    # W far beyond the sequence: clamped at 0
    ((1000, 8, 30, 3, 44, False), (0, 38)),
    # near the end: right clamped to the sequence's total
    ((4, 8, 40, 2, 44, False), (35, 44)),
    ((4, 100, 43, 5, 44, False), (35, 44)),
    ((2, 1, 43, 1, 44, False), (41, 44)),
]


@pytest.mark.parametrize("args,want", TABLE)
def test_bounds_table(args, want):
    W, M, t, n_prev, total, first = args
    left, right = _bounds(W, M, [t], [n_prev], [total], first)
    assert (left[0], right[0]) == want


def test_bounds_are_per_sequence_in_a_batch():
    # Rows of one batch with different t, n_prev and totals get their own bounds
    # (W = 4, M = 8): rows 0-1 as in the table, row 2 near its own end.
    left, right = _bounds(4, 8, [40, 30, 12], [2, 3, 1], [44, 144, 14], False)
    assert left == [35, 24, 8] and right == [44, 38, 14]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds_pair")
    hf_dllm = make_tiny_dream(root / "dream", seed=3, mask_token_id=MASK)
    hf_ver = make_tiny_qwen2(root / "qwen", seed=4)
    return SimpleNamespace(dllm=apd_ext.load_model(root / "dream"), verifier=apd_ext.load_model(root / "qwen"),
                           hf_dllm=hf_dllm, hf_verifier=hf_ver)


def _expected_bounds(P, accepted, W, M, L):
    """(left, right) per step from the accepted counts alone (DESIGN §6)."""
    out, t, n_prev = [], P, 0
    for step, n in enumerate(accepted):
        left = 0 if step == 0 or W is None else max(t - n_prev - W + 1, 0)
        out.append((left, min(t + M, L), n))
        t, n_prev = t + n, n
    return out


# R = 0.5 with random weights accepts a mix of 1s and longer runs, so n_prev
# varies; W = 1 and 3 keep left well inside the prompt-plus-generation.
@pytest.mark.parametrize("R,W,M,tau", [(0.5, 1, 6, 0.7), (0.5, 3, 4, 0.0), (0.8, 16, 100, 0.7),
                                       (0.5, None, 5, 0.7)])
def test_per_step_bounds_match_reference_loop(pair, R, W, M, tau):
    kw = dict(R=R, W=W, M=M, temperature=tau, top_p=0.95, max_new_tokens=NEW, seed=11)
    trace, ref_trace = [], []
    out = apd_ext.generate(pair.dllm, pair.verifier, [PROMPT], _trace=trace, eos_token_ids=[], **kw)
    ref = reference_generate(pair.hf_dllm, pair.hf_verifier, PROMPT, mask_token_id=MASK, eos_token_ids=[],
                             trace=ref_trace, **kw)
    mine = [(l, r, n) for ((b, l, r, n),) in trace]  # B = 1: one tuple per step
    assert mine == ref_trace
    assert mine == _expected_bounds(len(PROMPT), out.accepted_per_step[0], W, M, len(PROMPT) + NEW)
    assert sum(n for _, _, n in mine) == NEW
    if W is not None and W < 16:
        assert any(l > 0 for l, _, _ in mine[1:])  # the cache really supplied a prefix


def test_per_step_bounds_batched(pair):
    # Ragged batch: each sequence's bounds are those it has alone.
    prompts = [PROMPT, PROMPT[:9], PROMPT[3:17]]
    kw = dict(R=0.5, W=2, M=5, temperature=0.7, top_p=0.95, max_new_tokens=NEW, seed=2)
    trace = []
    out = apd_ext.generate(pair.dllm, pair.verifier, prompts, _trace=trace, eos_token_ids=[], **kw)
    for b, p in enumerate(prompts):
        mine = [(l, r, n) for step in trace for (bb, l, r, n) in step if bb == b]
        ref_trace = []
        reference_generate(pair.hf_dllm, pair.hf_verifier, p, mask_token_id=MASK, eos_token_ids=[],
                           trace=ref_trace, **kw)
        assert mine == ref_trace, b
        assert mine == _expected_bounds(len(p), out.accepted_per_step[b], 2, 5, len(p) + NEW)
